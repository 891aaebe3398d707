"""A bound on OpenSSL's server-side session cache, which Python's ssl module cannot set.

A serving context caches one session per full handshake (stateful TLS 1.3 tickets and TLS 1.2
session IDs, see broker.identity.tls.SERVER_SESSION_TICKETS), client certificate included,
for OpenSSL's default timeout of 7,200 s and up to its default of 20,480 sessions per context:
~12 KB each with a P-256 SVID chain (mallinfo of a broker process: in use grew 0.6 MB per
burst of 50 PostgreSQL sessions, 201 sessions cached after 201 handshakes), so ~240 MB per
listener and per worker before OpenSSL evicts anything. `bound_session_cache` sets the
cache's size through libssl's own ``SSL_CTX_ctrl(SSL_CTRL_SET_SESS_CACHE_SIZE)``; when the
cache is full OpenSSL drops its oldest session, and a client that held it does a full
handshake.
"""

from __future__ import annotations

import ctypes
import logging
import ssl
import sys
from collections.abc import Callable
from typing import Any

log = logging.getLogger("sidekey.identity")

# Sessions kept per serving context: the last 512 full handshakes' callers may resume (a
# sidecar has a handful of callers). The cache then holds at most ~6 MB per listener and
# worker. 2,048 (~25 MB each) was too many: a 25-minute soak whose clients never resume
# (libpq does not; pgbench -C and reconnecting HTTP clients made thousands of handshakes)
# filled three listeners' caches to 83 MB of malloc'd memory in 6 minutes.
SERVER_SESSION_CACHE_SIZE = 512
# OpenSSL's SSL_CTX_ctrl commands (ssl.h) and its default cache size: a context must report
# that, ours or the one asked for before its size is changed (a check on the pointer).
_SSL_CTRL_SET_SESS_CACHE_SIZE = 42
_SSL_CTRL_GET_SESS_CACHE_SIZE = 43
_OPENSSL_DEFAULT_CACHE_SIZE = 1024 * 20


def _ssl_ctx_ctrl() -> Callable[..., Any] | None:
    """libssl's SSL_CTX_ctrl, from the library the ssl module itself loaded."""
    if sys.implementation.name != "cpython":
        return None
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "/libssl.so" in line}
    except OSError:
        return None
    if len(paths) != 1:
        return None
    try:
        ctrl = ctypes.CDLL(paths.pop()).SSL_CTX_ctrl
    except (OSError, AttributeError):
        return None
    ctrl.restype = ctypes.c_long
    ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
    found: Callable[..., Any] = ctrl
    return found


_ctrl = _ssl_ctx_ctrl()


def bound_session_cache(ctx: ssl.SSLContext, size: int = SERVER_SESSION_CACHE_SIZE) -> bool:
    """Limit `ctx`'s server session cache to `size` sessions; False where it cannot be set
    (not CPython on Linux, or a libssl it does not recognise), leaving OpenSSL's default."""
    if _ctrl is None:
        return False
    # CPython's PySSLContext starts with the object header, then its SSL_CTX pointer.
    pointer = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
    known = (_OPENSSL_DEFAULT_CACHE_SIZE, SERVER_SESSION_CACHE_SIZE, size)
    if not pointer or _ctrl(pointer, _SSL_CTRL_GET_SESS_CACHE_SIZE, 0, None) not in known:
        log.debug("TLS session cache left at OpenSSL's default: unexpected context layout")
        return False
    _ctrl(pointer, _SSL_CTRL_SET_SESS_CACHE_SIZE, size, None)
    return bool(_ctrl(pointer, _SSL_CTRL_GET_SESS_CACHE_SIZE, 0, None) == size)
