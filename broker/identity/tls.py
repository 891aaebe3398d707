"""TLS contexts: the broker's serving contexts, which follow its rotating identity material,
and its upstream client contexts.

A listener binds one `ssl.SSLContext` for its life (asyncio's and uvloop's servers keep the
one they were given), while the broker's certificate and the trust bundles change under it.
`ServerTLS` keeps that bound context as a front: until the first change it is the serving
context itself; afterwards its SNI callback, which OpenSSL calls on every ClientHello (with or
without a server name), moves the new connection onto the newest context with
``SSL_set_SSL_CTX``. That context brings the certificate, the key and the verify store, so the
next handshake uses the new material and open connections keep what they started with. The
callback costs ~1 us per handshake (Python call plus ``SSL_set_SSL_CTX``, 1.08 us measured on
its own here, against ~800 us of server CPU for a mutual-TLS handshake) and is installed only
once the material has changed.

Contexts are built from the material in memory: the chain and key go to OpenSSL through
anonymous memory files (``memfd_create``), never to disk; without memfd (not Linux) through a
private temporary directory. Every problem with a file becomes a located ConfigError, so
`sidekey check` reports it before a single connection is accepted.
"""

from __future__ import annotations

import contextlib
import logging
import os
import ssl
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.serialization import Encoding

from broker.errors import ConfigError

from .session_cache import bound_session_cache
from .trust import Bundle, Snapshot, Svid

log = logging.getLogger("sidekey.identity")

# TLS 1.2 is the oldest version without known protocol-level breaks; 1.3 is preferred.
MIN_TLS_VERSION = ssl.TLSVersion.TLSv1_2
# TLS 1.3 session tickets the server sends after each handshake, with resumption on (a
# service's `tls_resumption`, default on). They are stateful (OP_NO_TICKET: the ticket is a
# session ID into the listener's own session cache, as TLS 1.2 resumption is), because a
# stateless ticket (the session, client certificate included, encrypted into it) is what
# made tickets cost: server CPU per mutual-TLS handshake, in memory, P-256, OpenSSL 3.0.19,
# 300 each on a loaded box: full without tickets 1,538 us, full + one stateless ticket
# 1,911 us, resumed from it 1,184 us; full + one stateful ticket 1,477 us, resumed 493 us.
# (2 stateless tickets were measured at 2.4 ms against 1.7 ms without: why 0 was the setting
# before.) The cache is per listener and per process: a resumed session never crosses
# services, and with `workers: N` a caller resumes only on the worker it reached before. A
# resumed session skips OpenSSL's chain and validity checks, so the broker identifies it
# only from what a full handshake verified (ServiceContext.identify_tls).
SERVER_SESSION_TICKETS = 1
# Issuers followed from the serving certificate into the trust bundle (OpenSSL's default
# verification depth is 100; real chains are leaf, one or two intermediates, root).
MAX_CHAIN_DEPTH = 8


def server_context(
    cert: Path,
    key: Path,
    bundle: Path | None,
    *,
    where: str = "tls",
    alpn: list[str] | None = None,
    client_cert: ssl.VerifyMode = ssl.CERT_REQUIRED,
    resumption: bool = True,
) -> ssl.SSLContext:
    """A serving context from files. With `bundle`, a client certificate chaining to it is
    asked for as `client_cert` says: CERT_REQUIRED (mtls), CERT_OPTIONAL (mtls+jwt: one, if
    sent, must chain to the bundle), CERT_NONE (jwt: server-authenticated TLS only)."""
    from .files import read_bundle, read_svid  # noqa: PLC0415 - files imports nothing of ours

    svid = read_svid(cert, key, where)
    bundles = [read_bundle("", bundle, "identity.x509_bundle")] if bundle is not None else []
    verify = client_cert if bundle is not None else ssl.CERT_NONE
    return context_for(svid, bundles, verify=verify, alpn=alpn, where=where, resumption=resumption)


def context_for(
    svid: Svid | None,
    bundles: Iterable[Bundle],
    *,
    verify: ssl.VerifyMode = ssl.CERT_REQUIRED,
    alpn: Sequence[str] | None = None,
    where: str = "tls",
    resumption: bool = True,
) -> ssl.SSLContext:
    """A serving context for `svid` (none yet: handshakes fail until one arrives) that
    verifies client certificates against every bundle in `bundles` under `verify`. With
    `resumption`, a stateful TLS 1.3 ticket (SERVER_SESSION_TICKETS); without, none. TLS 1.2
    resumes by session ID either way (OpenSSL's server cache, which Python cannot turn off;
    a session resumed through it is identified under the same rules)."""
    bundles = list(bundles)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.sslobject_class = AlertingSSLObject
    ctx.minimum_version = MIN_TLS_VERSION
    ctx.num_tickets = SERVER_SESSION_TICKETS if resumption else 0
    ctx.options |= ssl.OP_NO_TICKET  # stateful tickets: see SERVER_SESSION_TICKETS
    bound_session_cache(ctx)  # one cached session per handshake, ~12 KB each
    if svid is not None:
        pool = [c for b in bundles for c in b.authorities]
        _load_svid(ctx, svid, pool, where)
    if verify != ssl.CERT_NONE:
        cadata = "".join(b.pem().decode() for b in bundles)
        if cadata:
            try:
                ctx.load_verify_locations(cadata=cadata)
            except ssl.SSLError as exc:
                raise ConfigError(f"trust bundle: OpenSSL cannot load it: {_why(exc)}") from None
        ctx.verify_mode = verify
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    return ctx


# Where a failed handshake's SSLError carries the alert the event loop did not send.
_UNSENT_ALERT = "sidekey_unsent_alert"


class DirectSSLObject(ssl.SSLObject):
    """An `SSLObject` whose `read`, `write` and `pending` are the C methods themselves.

    `ssl.SSLObject` is a Python class around `_ssl._SSLSocket` whose methods each add a Python
    frame and nothing else; the event loop's TLS layer calls three or four of them per record
    relayed (uvloop: `pending` twice and `read` per record in, `write` per record out).
    Binding the C methods on the instance (a function on the class is a non-data descriptor,
    so the instance's own attribute wins) takes those frames off the data path. The broker's
    instructions per `pgbench -S` transaction under callgrind: 66.6k -> 61.4k with TLS on both
    legs, 38.7k -> 36.4k on the sidecar path (unix socket in, TLS upstream). The C methods
    take positional arguments only, as both event loops call them."""

    @classmethod
    def _create(cls, *args: Any, **kwargs: Any) -> DirectSSLObject:
        obj = super()._create(*args, **kwargs)  # type: ignore[misc]
        c_obj = getattr(obj, "_sslobj", None)  # a Python without it keeps the wrappers
        if c_obj is not None:
            vars(obj).update(read=c_obj.read, write=c_obj.write, pending=c_obj.pending)
        return cast(DirectSSLObject, obj)


class AlertingSSLObject(DirectSSLObject):
    """A server-side TLS object whose failed handshake hands its alert to the caller.

    OpenSSL writes the alert (unknown_ca, bad_certificate, ...) into the outgoing memory BIO,
    and both asyncio's and uvloop's TLS layers then close the socket without sending it, so
    the client sees an unexplained EOF ("server closed the connection unexpectedly").
    `do_handshake` attaches the alert to the SSLError it raises; both loops hand that same
    exception to whoever awaits `loop.start_tls`, where `unsent_alert` reads it and
    `Conduit.start_tls` writes it to the socket (which it keeps open for that). The exception
    is the one per-handshake object that passes from here to the caller on both loops: this
    object cannot be told its socket, since uvloop creates it in one context shared by every
    connection of the listener and keeps its TLS protocol's state out of Python's reach. The
    listeners that do TLS from the first byte (HTTP, Redis) run their handshakes through
    `Conduit.start_tls` too (broker.session.net.TlsFirst), never the loop's ``ssl=``."""

    _alert_bio: ssl.MemoryBIO | None

    @classmethod
    def _create(
        cls, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO, *args: Any, **kwargs: Any
    ) -> AlertingSSLObject:
        obj = cast(AlertingSSLObject, super()._create(incoming, outgoing, *args, **kwargs))
        obj._alert_bio = outgoing
        return obj

    def do_handshake(self) -> None:
        try:
            super().do_handshake()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise
        except ssl.SSLError as exc:
            bio = getattr(self, "_alert_bio", None)
            if bio is not None and bio.pending:
                setattr(exc, _UNSENT_ALERT, bio.read())
            raise


def unsent_alert(exc: BaseException) -> bytes:
    """The TLS alert a failed server-side handshake (AlertingSSLObject) left unsent, or b""."""
    alert = getattr(exc, _UNSENT_ALERT, b"")
    return alert if isinstance(alert, bytes) else b""


def check_loadable(svid: Svid, where: str = "tls") -> None:
    """Raise ConfigError unless OpenSSL takes `svid` as a serving certificate and key."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _load_svid(ctx, svid, [], where)


class ServerTLS:
    """The serving TLS of one listener, following the broker's identity material.

    `context` is the stable context to hand the listener; `update(snapshot)` makes new
    handshakes use the snapshot's certificate and bundles (see the module docstring)."""

    __slots__ = ("_alpn", "_resumption", "_verify", "_where", "context", "current")

    def __init__(
        self,
        snapshot: Snapshot,
        *,
        verify: ssl.VerifyMode = ssl.CERT_REQUIRED,
        alpn: Sequence[str] | None = None,
        where: str = "tls",
        resumption: bool = True,
    ) -> None:
        self._verify = verify
        self._alpn = tuple(alpn) if alpn else None
        self._where = where
        self._resumption = resumption
        self.context = context_for(
            snapshot.svid, snapshot.bundles.values(), verify=verify, alpn=alpn, where=where,
            resumption=resumption,
        )  # fmt: skip
        self.current = self.context
        if snapshot.svid is None:
            # Nothing to serve yet: every handshake goes to whatever arrives first.
            self.context.sni_callback = self._switch

    def update(self, snapshot: Snapshot) -> None:
        """Serve `snapshot` from the next handshake on. Keeps the current context if the new
        one cannot be built (the material was checked before it got here)."""
        try:
            new = context_for(
                snapshot.svid,
                snapshot.bundles.values(),
                verify=self._verify,
                alpn=self._alpn,
                where=self._where,
                resumption=self._resumption,
            )
        except ConfigError as exc:
            log.error("%s: kept the current TLS context: %s", self._where, exc)
            return
        self.current = new
        if self.context.sni_callback is None:
            self.context.sni_callback = self._switch

    def _switch(self, conn: Any, server_name: str | None, front: ssl.SSLContext) -> None:
        conn.context = self.current


def verified_anchor(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> bytes | None:
    """The DER of the trust anchor that ends the chain OpenSSL verified for the peer, or None.

    Python 3.13 made ``get_verified_chain`` public (a list of DER); 3.11 and 3.12 have it on
    the private ``_sslobj`` (certificate objects). About 2 us per call."""
    public = getattr(ssl_object, "get_verified_chain", None)
    if public is not None:
        chain = public()
        return bytes(chain[-1]) if chain else None
    inner = getattr(ssl_object, "_sslobj", None)
    chain = inner.get_verified_chain() if inner is not None else None
    if not chain:
        return None
    der: bytes = chain[-1].public_bytes(_ENCODING_DER)
    return der


# _ssl.ENCODING_DER, which the ssl module does not re-export.
_ENCODING_DER = 2


def _load_svid(
    ctx: ssl.SSLContext, svid: Svid, pool: Sequence[x509.Certificate], where: str
) -> None:
    chain = list(svid.chain)
    if len(chain) == 1:
        chain = _with_issuers_from(chain[0], pool)
    pem = b"".join(c.public_bytes(Encoding.PEM) for c in chain)
    try:
        with _secret_files(pem, svid.key_pem()) as (cert_path, key_path):
            ctx.load_cert_chain(cert_path, key_path)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"{where}.cert: cannot load certificate/key pair: {_why(exc)}") from None


@contextlib.contextmanager
def _secret_files(*blobs: bytes) -> Iterator[list[str]]:
    """Paths OpenSSL can open that hold `blobs`, for the moment it takes to load them."""
    memfd = getattr(os, "memfd_create", None)
    if memfd is not None and os.path.isdir("/proc/self/fd"):
        fds: list[int] = []
        try:
            for blob in blobs:
                fd = memfd("sidekey-tls", os.MFD_CLOEXEC)
                fds.append(fd)
                os.write(fd, blob)
            yield [f"/proc/self/fd/{fd}" for fd in fds]
        finally:
            for fd in fds:
                os.close(fd)
        return
    with tempfile.TemporaryDirectory(prefix="sidekey-tls-") as tmp:
        paths = []
        for i, blob in enumerate(blobs):
            path = Path(tmp) / f"{i}.pem"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(blob)
            paths.append(str(path))
        yield paths


def _with_issuers(cert: Path, bundle: Path) -> bytes | None:
    """`_with_issuers_from` for files: the chain as PEM, or None when nothing is added."""
    certs = x509.load_pem_x509_certificates(cert.read_bytes())
    if len(certs) != 1:
        return None
    chain = _with_issuers_from(certs[0], x509.load_pem_x509_certificates(bundle.read_bytes()))
    if len(chain) == 1:
        return None
    return b"".join(c.public_bytes(Encoding.PEM) for c in chain)


def _with_issuers_from(
    leaf: x509.Certificate, pool: Sequence[x509.Certificate]
) -> list[x509.Certificate]:
    """The serving certificate followed by its issuers from the trust bundle: the chain
    OpenSSL would otherwise rebuild from the trust store in every handshake.

    With a certificate that comes alone (what `sidekey ca issue` writes, and SPIRE when it
    signs SVIDs with its own root), OpenSSL looks up and verifies the server's chain on each
    handshake and sends the leaf and every certificate it found. Handing it the same chain
    once, at load, sends the same bytes and cost ~0.1 ms less server CPU per mutual-TLS
    handshake: 862 -> 772 us on OpenSSL 3.0.19, 604 -> 514 us on 3.5.7 (in-memory, P-256,
    median of 3 x 300). Only the leaf when no issuer is in the bundle.
    """
    chain = [leaf]
    while len(chain) <= MAX_CHAIN_DEPTH and chain[-1].issuer != chain[-1].subject:
        issuer = next((c for c in pool if _issued_by(chain[-1], c)), None)
        if issuer is None:
            break
        chain.append(issuer)
    return chain


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    if cert.issuer != issuer.subject:
        return False
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


# Connections to a server that gave a session with neither ticket nor ID before its
# session is looked at again (a server's configuration can change; the look costs ~6 KB on
# Python 3.11, see ResumingContext).
NO_RESUMPTION_RECHECK = 1000


@dataclass(slots=True)
class _Resumption:
    """One server name's resumption state (ResumingContext)."""

    last: ssl.SSLObject | None = None  # the newest connection
    session: ssl.SSLSession | None = None  # what new connections are offered
    # Connections left before a server that does not resume is looked at again.
    skip: int = 0


class ResumingContext(ssl.SSLContext):
    """An upstream client context that offers each new connection the TLS session of an
    earlier one to the same server name, so a reconnect to an upstream that issues tickets
    (or keeps a session cache) resumes instead of paying a full handshake.

    asyncio's and uvloop's TLS layers both create a connection's `SSLObject` through
    `wrap_bio`, which is where the session is handed over: no adapter takes part. The newest
    connection's object is kept per server name and looked at when the next one starts (a
    TLS 1.3 ticket arrives after the handshake).

    Reading `SSLObject.session` leaks a copy of the session on Python 3.11 (CPython
    gh-116810, fixed in 3.12 and 3.13 only): ~6 KB each time, so it is read only when a
    session is needed: after a full handshake. A session that resumed is offered again
    until the server refuses it (a TLS 1.2 session ID, and the stateless TLS 1.3 tickets of
    OpenSSL's, nginx's and Go's defaults, resume many times; a server with single-use
    tickets resumes every other connection). A server that gives neither ticket nor session
    ID (PostgreSQL) is looked at again only every NO_RESUMPTION_RECHECK connections."""

    # Not __slots__: ssl.SSLContext instances already carry a __dict__.
    _servers: dict[str | None, _Resumption]

    def __new__(
        cls, protocol: int = ssl.PROTOCOL_TLS_CLIENT, *args: Any, **kwargs: Any
    ) -> ResumingContext:
        self: ResumingContext = super().__new__(cls, protocol, *args, **kwargs)
        self._servers = {}
        return self

    def wrap_bio(
        self,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        server_side: bool = False,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLObject:
        if server_side:
            return super().wrap_bio(incoming, outgoing, server_side, server_hostname, session)
        key = server_hostname.decode() if isinstance(server_hostname, bytes) else server_hostname
        server = self._servers.setdefault(key, _Resumption())
        if session is None:
            session = self._session(server)
        obj = super().wrap_bio(incoming, outgoing, server_side, server_hostname, session)
        server.last = obj
        return obj

    def session_for(self, server_name: str | None) -> ssl.SSLSession | None:
        """The session a new connection to `server_name` is offered, if there is one."""
        server = self._servers.get(server_name)
        return self._session(server) if server is not None else None

    @staticmethod
    def _session(server: _Resumption) -> ssl.SSLSession | None:
        last = server.last
        # version() is None until a handshake completes; session_reused costs nothing.
        if last is None or last.version() is None or last.session_reused:
            return server.session
        if server.skip > 0:
            server.skip -= 1
            return None
        server.last = None  # looked at: once per full handshake
        try:
            session = last.session
        except (ValueError, ssl.SSLError):
            session = None
        if session is None or not (session.has_ticket or session.id):
            server.session, server.skip = None, NO_RESUMPTION_RECHECK
        else:
            server.session = session
        return server.session


def client_context(
    *, verify: bool = True, ca: Path | None = None, where: str = "upstream.tls"
) -> ssl.SSLContext:
    """A context for connecting upstream: verifies against `ca` or the system store, and
    resumes TLS sessions per server name (`ResumingContext`)."""
    ctx = ResumingContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.sslobject_class = DirectSSLObject
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
