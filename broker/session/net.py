"""The connection layer every TCP adapter shares: accept, connect, handshake, upgrade to TLS.

A `Conduit` is one connection while an adapter drives its protocol handshake with a sans-IO
codec: `receive()` what arrived, feed the codec, `unread()` what it did not consume, `write()`
what it produced, `start_tls()` in place when the protocol upgrades mid-stream (PostgreSQL
``SSLRequest``, MySQL ``CLIENT_SSL``). Afterwards the adapter hands both conduits to
`broker.session.splice.splice`, which takes over the transports.

Blame is decided here, once: every conduit knows whether its peer is the client or the
upstream, so a timeout or a failed TLS handshake raises `ClientError` for a client peer and
`UpstreamTimeout` / `UpstreamError` for an upstream peer. Adapters need not translate.

`serve()` runs one task per accepted connection, caps how many run at once, and always
closes the conduit when the handler returns or is cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import ssl
import stat
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Literal, cast

from broker.config import DEFAULT_SOCKET_MODE, ListenAddress
from broker.errors import ClientError, SidekeyError, TlsRefused, UpstreamError, UpstreamTimeout
from broker.identity.local import PeerCredentials, peer_credentials
from broker.identity.tls import unsent_alert

log = logging.getLogger(__name__)

Side = Literal["client", "upstream"]

# Bytes a conduit buffers while nobody calls receive() before it pauses reading. Handshake
# messages are small (PostgreSQL caps a startup packet at 10000 bytes, MySQL's handshake
# response is a few hundred), so this only bounds a peer that floods during the handshake.
HANDSHAKE_BUFFER_LIMIT = 64 * 1024
# A TLS handshake on a LAN or loopback takes milliseconds; asyncio's default of 60 s would let
# a silent peer hold a connection slot (and a max_connections unit) for a minute.
DEFAULT_TLS_HANDSHAKE_TIMEOUT = 10.0
# How long close() lets already-written bytes drain to a peer before aborting: a peer that
# stops reading must not pin the transport and its buffer forever.
CLOSE_LINGER_TIMEOUT = 5.0
# How long a failed handshake's socket stays open after its alert, discarding what the
# client still sends, so that closing it with unread bytes does not reset the connection
# before the client has read the alert (see _send_alert); and how much it discards.
ALERT_LINGER_TIMEOUT = 1.0
ALERT_LINGER_BYTES = 64 * 1024
# At most this many such sockets at once, in the process: they are outside max_connections,
# and a flood of refused handshakes from clients that never close must not pile up
# descriptors. Past it a socket is closed right after its alert (the client may then see a
# reset rather than the alert).
ALERT_LINGER_MAX = 256
_lingering: set[socket.socket] = set()
# Listen backlog: the value nginx and Redis use (511); asyncio's default of 100 drops SYNs
# under a connection burst before max_connections can answer them.
LISTEN_BACKLOG = 511
# Unix socket mode: owner and group may connect (the app's group), others may not
# (a service's `socket_mode` changes it).
UNIX_SOCKET_MODE = DEFAULT_SOCKET_MODE
# A connection over max_connections is told so in its protocol by the `on_overload` handler,
# which may need the client's hello (and a TLS handshake) first: it gets this long.
OVERLOAD_TIMEOUT = 5.0
# Over-limit connections being told so at once; beyond this, further ones are closed without
# a word, so under a connection flood the answer costs no more than refusing does.
MAX_OVERLOAD_ANSWERS = 64
# Relayed and parsed bytes are read into one buffer per thread (its event loop), shared by
# every connection: a transport fills it and calls buffer_updated() synchronously, which
# copies the bytes out before returning. With a plain Protocol, uvloop's TLS layer hands over
# bytes from SSLObject.read(256 KiB) calls, each allocating 256 KiB (mmap, mremap, munmap)
# and failing once per event with SSLWantReadError; reading into this buffer instead cut
# relay CPU per small round trip (TLS both legs, uvloop) from ~100 to ~42 us in a
# side-by-side run (median of 4, noisy 2-core VM).
READ_BUFFER_BYTES = 256 * 1024
_buffers = threading.local()


def read_buffer() -> memoryview:
    """This thread's shared read buffer (see READ_BUFFER_BYTES)."""
    view: memoryview | None = getattr(_buffers, "view", None)
    if view is None:
        view = _buffers.view = memoryview(bytearray(READ_BUFFER_BYTES))
    return view


class _LostTransport(asyncio.Transport):
    """What a protocol holds instead of its transport once the connection is lost."""

    __slots__ = ()

    def is_closing(self) -> bool:
        return True

    def write(self, data: bytes | bytearray | memoryview) -> None:
        return None

    def close(self) -> None:
        return None

    def abort(self) -> None:
        return None

    def pause_reading(self) -> None:
        return None

    def resume_reading(self) -> None:
        return None


# Buffered protocols drop what points back at their transport in connection_lost. The TLS
# layer of both event loops (CPython's and uvloop's SSLProtocol) keeps the bound get_buffer
# and buffer_updated of its app protocol after the connection is lost, so a protocol that
# still refers to the TLS transport closes a reference cycle around the SSLProtocol, its
# SSL object and its 256 KiB read buffer, which only the cyclic GC's rare full collections
# free. That was issue 19.3: 150 PostgreSQL sessions left ~45 MB of TLS state in use per
# burst (mallinfo, 205 MB in use after 600 sessions; gc.collect() freed 14,039 objects and
# 190 MB), and the heap, fragmented by it, grew ~10 MB of RSS per burst without end.
LOST_TRANSPORT: asyncio.Transport = _LostTransport()


class BufferedReads(asyncio.BufferedProtocol):
    """What a transport sees in front of a plain `asyncio.Protocol`: reads go through the
    shared read buffer and reach `protocol.data_received` as a copy.

    uvloop's TLS layer reads into a caller's buffer only for a BufferedProtocol that is not
    also an asyncio.Protocol, which rules out subclassing one (aiohttp's BaseProtocol is).
    """

    __slots__ = ("_buffer", "protocol")

    def __init__(self, protocol: asyncio.Protocol) -> None:
        self.protocol = protocol
        self._buffer = read_buffer()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.protocol.connection_made(transport)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.protocol.data_received(self._buffer[:nbytes].tobytes())

    def eof_received(self) -> bool | None:
        return self.protocol.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        protocol = self.protocol
        # The TLS layer keeps our bound methods, and the protocol its transport: see
        # LOST_TRANSPORT.
        self.protocol = _LOST_PROTOCOL
        protocol.connection_lost(exc)

    def pause_writing(self) -> None:
        self.protocol.pause_writing()

    def resume_writing(self) -> None:
        self.protocol.resume_writing()


_LOST_PROTOCOL = asyncio.Protocol()


def close_with_linger(transport: asyncio.Transport, linger: float = CLOSE_LINGER_TIMEOUT) -> None:
    """Close `transport`, flushing what it buffered, but abort it if that takes over `linger`."""
    if transport.is_closing():
        return
    # Not isinstance(asyncio.WriteTransport): uvloop's transports do not register with the ABCs.
    pending = transport.get_write_buffer_size()
    transport.close()
    if pending:
        asyncio.get_running_loop().call_later(linger, transport.abort)


class Conduit(asyncio.Protocol):
    """One connection during the handshake phase, with a bounded receive buffer.

    Only one `receive()` may wait at a time. After `splice()` took the transport over, the
    conduit must not be read or written; `close()` and `abort()` still work.
    """

    __slots__ = (
        "_buffer",
        "_drain_waiter",
        "_eof",
        "_lost",
        "_on_made",
        "_read_paused",
        "_receive_waiter",
        "_spliced",
        "_write_paused",
        "credentials",
        "error",
        "peer",
        "side",
        "transport",
    )

    def __init__(
        self, side: Side, *, on_connection_made: Callable[[Conduit], None] | None = None
    ) -> None:
        self.side: Side = side
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.credentials: PeerCredentials | None = None
        # Why the connection was lost, if it was lost to an error (reset, TLS failure).
        self.error: BaseException | None = None
        self._on_made = on_connection_made
        self._buffer = bytearray()
        self._eof = False
        self._lost = False
        self._read_paused = False
        self._write_paused = False
        self._spliced = False
        self._receive_waiter: asyncio.Future[None] | None = None
        self._drain_waiter: asyncio.Future[None] | None = None

    @classmethod
    def adopt(cls, side: Side, transport: asyncio.Transport, buffered: bytes = b"") -> Conduit:
        """A conduit for a connection another protocol has spoken on until now (an HTTP
        upgrade, before its splice): it becomes the transport's protocol at once, holding
        `buffered`, the bytes that protocol read past its own messages."""
        conduit = cls(side)
        conduit.transport = transport
        conduit.peer, conduit.credentials = describe_peer(transport)
        conduit._buffer += buffered
        transport.set_protocol(conduit)
        return conduit

    # -- asyncio.Protocol callbacks ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.peer, self.credentials = describe_peer(self.transport)
        # No TCP_NODELAY here: asyncio and uvloop both set it on every TCP socket they accept
        # or connect, which test_tcp_nodelay_on_accepted_and_connected_sockets checks.
        if self._on_made is not None:
            self._on_made(self)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if len(self._buffer) > HANDSHAKE_BUFFER_LIMIT and not self._read_paused:
            self._read_paused = True
            assert self.transport is not None
            self.transport.pause_reading()
        self._wake_receiver()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake_receiver()
        # Keep the write side open: the adapter may still owe the peer an error message. For
        # TLS transports asyncio ignores this and closes (and warns if we return True).
        return not self.is_tls

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._eof = True
        if exc is not None:
            self.error = exc
        self._wake_receiver()
        self._wake_drainer()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake_drainer()

    # -- API for adapters --------------------------------------------------------------------

    @property
    def is_closed(self) -> bool:
        """True once the connection is lost or being closed."""
        return self._lost or self.transport is None or self.transport.is_closing()

    @property
    def at_eof(self) -> bool:
        """True once the peer sent EOF (or the connection was lost)."""
        return self._eof

    @property
    def is_tls(self) -> bool:
        return self.ssl_object is not None

    @property
    def ssl_object(self) -> ssl.SSLObject | None:
        """The TLS session (peer certificate, cipher, ALPN) once TLS is up, else None."""
        if self.transport is None:
            return None
        return cast(ssl.SSLObject | None, self.transport.get_extra_info("ssl_object"))

    @property
    def socket(self) -> socket.socket | None:
        """The connection's socket (for its peer's credentials), or None once gone."""
        if self.transport is None:
            return None
        return cast(socket.socket | None, self.transport.get_extra_info("socket"))

    @property
    def buffered(self) -> int:
        """Bytes received (or unread) that nobody has consumed yet."""
        return len(self._buffer)

    async def receive(self, timeout: float) -> bytes:
        """Return and clear everything buffered, waiting up to `timeout` for at least one byte.

        Returns b"" once the peer sent EOF or the connection is lost (see `error`). Raises
        `ClientError` (client peer) or `UpstreamTimeout` (upstream peer) on timeout.
        """
        self._check_usable()
        if not self._buffer and not self._eof:
            if self._receive_waiter is not None:
                raise RuntimeError("Conduit.receive() is already being awaited")
            waiter = asyncio.get_running_loop().create_future()
            self._receive_waiter = waiter
            try:
                async with asyncio.timeout(timeout):
                    await waiter
            except TimeoutError:
                raise self._timeout_error(f"sent nothing for {timeout:g}s") from None
            finally:
                self._receive_waiter = None
        data = bytes(self._buffer)
        self._buffer.clear()
        if self._read_paused and not self._lost:
            self._read_paused = False
            assert self.transport is not None
            self.transport.resume_reading()
        return data

    def unread(self, data: bytes) -> None:
        """Push back bytes the codec did not consume; `receive()` or `splice()` delivers them
        before anything received later."""
        self._check_usable()
        if data:
            self._buffer[:0] = data

    def write(self, data: bytes) -> None:
        """Queue `data` for the peer. Dropped silently once the connection is closing: the
        next `receive()` reports the loss."""
        self._check_usable()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    async def drain(self, timeout: float) -> None:
        """Wait until the write buffer is below its low-water mark (or the connection is lost).

        Raises the side's timeout error if the peer does not read for `timeout` seconds.
        """
        if not self._write_paused or self._lost:
            return
        waiter = self._drain_waiter
        if waiter is None:
            waiter = self._drain_waiter = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(waiter)
        except TimeoutError:
            raise self._timeout_error(f"did not read for {timeout:g}s") from None

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        *,
        server_side: bool,
        server_hostname: str | None = None,
        timeout: float = DEFAULT_TLS_HANDSHAKE_TIMEOUT,
        early_tls: bool = False,
    ) -> None:
        """Upgrade this connection to TLS in place; afterwards `ssl_object` is set.

        Refuses to start if plaintext bytes are still buffered: they arrived before the
        handshake and must not be treated as if they were protected (the PostgreSQL
        buffer-stuffing bugs CVE-2021-23214 and CVE-2021-23222). With `early_tls`, the
        protocol's peer starts TLS without waiting for an answer (a MySQL client sends its
        ClientHello right behind its SSLRequest): buffered bytes are then the first TLS
        records and go to the TLS layer, never to the application. On failure or timeout
        the connection is aborted and the side's error is raised.
        """
        self._check_usable()
        assert self.transport is not None
        if self.is_closed:
            raise self._error(f"closed before the TLS handshake ({self._where})")
        early = b""
        if self._buffer:
            if not early_tls:
                self.abort()
                raise self._error(
                    f"{self._where} sent {len(self._buffer)} bytes before the TLS handshake"
                )
            early = bytes(self._buffer)
            self._buffer.clear()
        loop = asyncio.get_running_loop()
        # Both loops close a failed handshake's socket before this task hears of it, with the
        # TLS alert unsent (AlertingSSLObject): a duplicate of the socket keeps the connection
        # open to send it then. The dup() and close() cost 3.0 us a handshake on the 2-core
        # VM here (a syscall 1.7 us; the context variable this replaced, 0.6 us), against
        # 2.5-3.0 ms of server CPU per in-protocol mutual-TLS handshake measured there too.
        kept = _duplicate(self.transport.get_extra_info("socket")) if server_side else None
        try:
            # The outer timeout is a backstop: ssl_handshake_timeout covers the handshake, this
            # also covers a peer that never lets the TCP layer make progress.
            async with asyncio.timeout(timeout + 1.0):
                upgrade = loop.start_tls(
                    self.transport,
                    self,
                    ssl_context,
                    server_side=server_side,
                    server_hostname=server_hostname,
                    ssl_handshake_timeout=timeout,
                )
                if early:
                    # Runs after start_tls's first step (below, before it waits) has put
                    # its TLS protocol on the transport: see _feed_protocol.
                    loop.call_soon(_feed_protocol, self.transport, early)
                tls_transport = await upgrade
        except TimeoutError:
            self.abort()
            raise self._timeout_error(f"did not finish the TLS handshake in {timeout:g}s") from None
        except ConnectionAbortedError as exc:
            # asyncio reports its own ssl_handshake_timeout as ConnectionAbortedError.
            self.abort()
            if "longer than" in str(exc):
                raise self._timeout_error(
                    f"did not finish the TLS handshake in {timeout:g}s"
                ) from None
            raise self._error(f"TLS handshake with {self._where} failed: {exc}") from None
        except (OSError, ssl.SSLError, EOFError) as exc:
            alert = unsent_alert(exc)
            if kept is not None and alert:
                _send_alert(loop, kept, alert)
                kept = None  # _send_alert closes it
            self.abort()
            reason = getattr(exc, "reason", None) or exc.__class__.__name__
            message = f"TLS handshake with {self._where} failed: {reason}"
            if alert and self.side == "client":
                raise TlsRefused(message) from None
            raise self._error(message) from None
        except BaseException:
            self.abort()
            raise
        finally:
            if kept is not None:
                os.close(kept)
        if tls_transport is None:  # pragma: no cover - only for transports without TLS support
            self.abort()
            raise self._error(f"TLS handshake with {self._where} failed: transport closed")
        plain, self.transport = self.transport, tls_transport
        if self._read_paused:
            # data_received paused the plain transport under the TLS layer, which does not
            # know it: what the client sent right behind its handshake (an HTTP body) went
            # past HANDSHAKE_BUFFER_LIMIT before start_tls returned. Paused there, the
            # connection would never be read again, nor its loss seen.
            plain.resume_reading()
        # Fresh state for the protected stream.
        self._read_paused = False
        self._write_paused = False

    def close(self) -> None:
        """Close, flushing what was written (aborting if that takes over CLOSE_LINGER_TIMEOUT)."""
        if self.transport is not None:
            close_with_linger(self.transport)

    def abort(self) -> None:
        """Close at once, discarding anything not yet sent."""
        if self.transport is not None:
            self.transport.abort()
        self._lost = True
        self._eof = True
        self._wake_receiver()
        self._wake_drainer()

    def hand_over(self, protocol: asyncio.BaseProtocol) -> bool:
        """Make `protocol` this connection's protocol (a TLS-first listener's application,
        once `start_tls` is done), giving it what arrived meanwhile; False if the connection
        is already gone (then `protocol` is never told of it)."""
        data, eof, lost, write_paused = self._detach()
        transport = self.transport
        if lost or transport is None or transport.is_closing():
            self.abort()
            return False
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if write_paused:
            protocol.pause_writing()
        if data:
            if isinstance(protocol, asyncio.BufferedProtocol):
                _feed(protocol, data)
            else:
                cast(asyncio.Protocol, protocol).data_received(data)
        if self._read_paused:
            transport.resume_reading()
        if eof and not cast(asyncio.Protocol, protocol).eof_received():
            transport.close()
        return True

    # -- for broker.session.splice ---------------------------------------------------------

    def _detach(self) -> tuple[bytes, bool, bool, bool]:
        """Hand the connection over: (buffered bytes, eof seen, lost, writing paused)."""
        self._check_usable()
        self._spliced = True
        data = bytes(self._buffer)
        self._buffer.clear()
        return data, self._eof, self._lost, self._write_paused

    def _reattach(self) -> None:
        """Take the connection back from a splice that kept it (session reuse): this conduit
        is its protocol again, with nothing buffered, and reading on."""
        assert self.transport is not None
        self._spliced = False
        self._buffer.clear()
        self._read_paused = self._write_paused = False
        self.transport.set_protocol(self)
        self.transport.resume_reading()

    # -- helpers -------------------------------------------------------------------------------

    @property
    def _where(self) -> str:
        return f"{self.side} {self.peer}"

    def _check_usable(self) -> None:
        if self._spliced:
            raise RuntimeError("Conduit was handed to splice(); use the splice instead")

    def _error(self, message: str) -> SidekeyError:
        return ClientError(message) if self.side == "client" else UpstreamError(message)

    def _timeout_error(self, what: str) -> SidekeyError:
        message = f"{self._where} {what}"
        return ClientError(message) if self.side == "client" else UpstreamTimeout(message)

    def _wake_receiver(self) -> None:
        waiter = self._receive_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _wake_drainer(self) -> None:
        waiter = self._drain_waiter
        if waiter is not None:
            self._drain_waiter = None
            if not waiter.done():
                waiter.set_result(None)


def _duplicate(sock: socket.socket | None) -> int | None:
    """A second descriptor for `sock`'s connection, or None (no socket, or out of fds)."""
    if sock is None:
        return None
    try:
        return os.dup(sock.fileno())
    except (OSError, ValueError):
        return None


def _send_alert(loop: asyncio.AbstractEventLoop, fd: int, alert: bytes) -> None:
    """Send `alert` on `fd` (a failed handshake's duplicate socket), end the stream, and close
    `fd` once the client has closed its side, or after ALERT_LINGER_TIMEOUT.

    Best effort: the alert is a few dozen bytes into an idle connection's send buffer; a
    client that has gone already gets nothing. The linger is the lingering close of HTTP
    servers: a TLS 1.3 client sends its next bytes (curl's HTTP/2 preface) before it reads
    the alert, and a socket closed with unread bytes sends a reset, which can reach the
    client before it reads the alert (curl then reports "getpeername() failed"); reading and
    discarding until the client's FIN leaves it the alert to read.
    """
    sock = socket.socket(fileno=fd)
    try:
        sock.send(alert)
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        sock.close()
        return
    if len(_lingering) >= ALERT_LINGER_MAX:
        sock.close()
        return
    _lingering.add(sock)
    discarded = 0

    def readable() -> None:
        nonlocal discarded
        try:
            data = sock.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        discarded += len(data)
        if not data or discarded > ALERT_LINGER_BYTES:
            done()

    def done() -> None:
        if sock not in _lingering:  # done already
            return
        _lingering.discard(sock)
        timer.cancel()
        loop.remove_reader(sock)
        sock.close()

    timer = loop.call_later(ALERT_LINGER_TIMEOUT, done)
    try:
        loop.add_reader(sock, readable)
    except (OSError, ValueError):
        _lingering.discard(sock)
        timer.cancel()
        sock.close()


def _feed_protocol(transport: asyncio.Transport, data: bytes) -> None:
    """Hand `data`, TLS records that arrived before `loop.start_tls`, to the TLS protocol
    that start_tls's first step put on `transport`, before anything read later.

    Both loops' start_tls, in that step, pause reading, set the TLS protocol, and schedule
    its connection_made and then resume_reading with call_soon; this, scheduled before that
    step, runs ahead of them, so no read comes first. The TLS protocol is not yet started
    then: asyncio's and uvloop's SSLProtocol.buffer_updated in that state only write into
    its incoming memory BIO, which connection_made's handshake reads first. (This replaced
    running start_tls as a task of its own to schedule the bytes behind connection_made:
    a task and a loop iteration for most TLS-first handshakes under uvloop, which reads the
    ClientHello before the handshake's task first runs.)
    """
    protocol = transport.get_protocol()
    # Both TLS protocols are buffered ones (uvloop's does not register with the ABC).
    if hasattr(protocol, "get_buffer"):
        _feed(cast(asyncio.BufferedProtocol, protocol), data)


def _feed(protocol: asyncio.BufferedProtocol, data: bytes) -> None:
    view = memoryview(data)
    while view:
        buffer = memoryview(protocol.get_buffer(len(view)))
        n = min(len(buffer), len(view))
        buffer[:n] = view[:n]
        protocol.buffer_updated(n)
        view = view[n:]


def describe_peer(transport: asyncio.BaseTransport) -> tuple[str, PeerCredentials | None]:
    """How audit lines name the peer (``host:port``, ``[v6]:port`` or ``unix:pid=…``), and
    its kernel-verified credentials on a unix socket."""
    peername = transport.get_extra_info("peername")
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family == socket.AF_UNIX:
        creds = peer_credentials(sock)
        if creds is None:
            return "unix", None
        return f"unix:pid={creds.pid},uid={creds.uid},gid={creds.gid}", creds
    if isinstance(peername, tuple) and len(peername) >= 2:
        host = peername[0]
        return (f"[{host}]:{peername[1]}" if ":" in host else f"{host}:{peername[1]}"), None
    return str(peername), None


async def connect(
    host: str,
    port: int,
    *,
    timeout: float,
    ssl_context: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
) -> Conduit:
    """Open a TCP connection to an upstream (TLS from the first byte if `ssl_context`).

    Raises `UpstreamTimeout` if it takes over `timeout`, `UpstreamError` if refused,
    unreachable, unresolvable or the TLS handshake fails; messages name host:port.
    """
    loop = asyncio.get_running_loop()
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        async with asyncio.timeout(timeout):
            _, conduit = await loop.create_connection(
                lambda: Conduit("upstream"),
                host,
                port,
                ssl=ssl_context,
                server_hostname=server_hostname if ssl_context is not None else None,
                ssl_handshake_timeout=timeout if ssl_context is not None else None,
            )
    except TimeoutError:
        raise UpstreamTimeout(f"upstream {where}: no connection within {timeout:g}s") from None
    except ssl.SSLError as exc:
        reason = exc.reason or exc.__class__.__name__
        raise UpstreamError(f"upstream {where}: TLS handshake failed: {reason}") from None
    except OSError as exc:
        reason = exc.strerror or str(exc) or exc.__class__.__name__
        raise UpstreamError(f"upstream {where}: cannot connect: {reason}") from None
    return conduit


class TlsFirst:
    """A protocol factory for a listener that speaks TLS from the first byte (HTTPS, Redis):
    each connection's handshake is `Conduit.start_tls`, as an in-protocol upgrade's is, and
    only then is `factory`'s protocol made and given the TLS transport.

    Not the event loop's own server TLS (``ssl=`` to create_server): both loops close a
    failed handshake's socket there without the alert OpenSSL wrote, and no one hears of the
    failure, so curl saw "Empty reply from server" for an untrusted certificate. Through
    start_tls the client reads the alert (unknown_ca, ...), on either loop. As with ``ssl=``,
    the application protocol exists only once the handshake is done: a connection counts
    against max_connections from then, and a handshake gets `timeout` seconds. A handshake
    the broker refused (TlsRefused: an untrusted or missing certificate) is reported to
    `on_refused(peer, reason)`, for the audit trail; one the client broke off is not.

    Cost against ``ssl=``, server side of a full mutual-TLS handshake under uvloop (2-core
    VM): 7.96M -> 7.99M instructions (callgrind, +0.26 %), plus ~14 syscalls (the dup, three
    more loop iterations); server CPU time alternated old/new was within the box's noise
    (medians +0.5 % over 4x300 in separate processes; +7 % paired in one process with a
    sequential client: +3..+4 % on a quiet box, +7 % with the box loaded; -2..+5 % with 8
    concurrent ones).
    """

    __slots__ = ("_factory", "_handshakes", "_on_refused", "_ssl", "_timeout")

    def __init__(
        self,
        factory: Callable[[], asyncio.BaseProtocol],
        ssl_context: ssl.SSLContext,
        timeout: float = DEFAULT_TLS_HANDSHAKE_TIMEOUT,
        on_refused: Callable[[str, str], None] | None = None,
    ) -> None:
        self._factory = factory
        self._ssl = ssl_context
        self._timeout = timeout
        self._on_refused = on_refused
        self._handshakes: set[asyncio.Task[None]] = set()

    def __call__(self) -> Conduit:
        return Conduit("client", on_connection_made=self._accepted)

    def close(self) -> None:
        """Abort the handshakes under way (the listener is closing)."""
        for task in self._handshakes:
            task.cancel()

    def _accepted(self, conduit: Conduit) -> None:
        # asyncio: the ClientHello then stays in the socket until start_tls resumes reading.
        # uvloop starts reading after connection_made whatever it did, and polls before the
        # task first runs, so there most ClientHellos (63 of 100 on loopback) arrive early
        # and go in through start_tls's early_tls.
        assert conduit.transport is not None
        conduit.transport.pause_reading()
        task = asyncio.get_running_loop().create_task(self._handshake(conduit))
        self._handshakes.add(task)
        task.add_done_callback(self._handshakes.discard)

    async def _handshake(self, conduit: Conduit) -> None:
        try:
            # early_tls: the ClientHello may be buffered already, and is TLS's to read.
            await conduit.start_tls(
                self._ssl, server_side=True, timeout=self._timeout, early_tls=True
            )
        except TlsRefused as exc:
            # The client has read the alert; the trail records who was turned away.
            log.debug("%s", exc)
            if self._on_refused is not None:
                self._on_refused(conduit.peer, str(exc))
            return
        except ClientError as exc:
            # Any client can break off a handshake at will.
            log.debug("%s", exc)
            return
        except BaseException:
            conduit.abort()
            raise
        conduit.hand_over(self._factory())


Handler = Callable[[Conduit], Awaitable[None]]


class Listener:
    """A bound listening socket running one handler task per accepted connection."""

    def __init__(
        self,
        handler: Handler,
        max_connections: int,
        on_reject: Callable[[], None] | None = None,
        on_overload: Handler | None = None,
    ) -> None:
        self._handler = handler
        self._max_connections = max_connections
        self._on_reject = on_reject
        self._on_overload = on_overload
        self._tasks: set[asyncio.Task[None]] = set()
        # Over-limit connections being told so (on_overload), capped by MAX_OVERLOAD_ANSWERS.
        self._refusing: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self._tls: TlsFirst | None = None
        self._closing = False
        self._unix_path: Path | None = None
        self.address = ListenAddress()
        # Counters for metrics: connections handed to the handler / refused over the cap.
        self.accepted = 0
        self.rejected = 0

    @property
    def active(self) -> int:
        """Connections whose handler is still running."""
        return len(self._tasks)

    def _conduit(self) -> Conduit:
        return Conduit("client", on_connection_made=self._on_connection_made)

    def _on_connection_made(self, conduit: Conduit) -> None:
        assert conduit.transport is not None
        if self._closing or len(self._tasks) >= self._max_connections:
            self.rejected += 1
            if self._on_reject is not None:
                self._on_reject()
            log.debug("refusing %s: %d connections in flight", conduit.peer, len(self._tasks))
            if (
                self._on_overload is not None
                and not self._closing
                and len(self._refusing) < MAX_OVERLOAD_ANSWERS
            ):
                refusal = asyncio.get_running_loop().create_task(self._refuse(conduit))
                self._refusing.add(refusal)
                refusal.add_done_callback(self._refusing.discard)
            else:
                conduit.abort()
            return
        self.accepted += 1
        task = asyncio.get_running_loop().create_task(self._run(conduit))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _refuse(self, conduit: Conduit) -> None:
        assert self._on_overload is not None
        try:
            async with asyncio.timeout(OVERLOAD_TIMEOUT):
                await self._on_overload(conduit)
        except asyncio.CancelledError:
            conduit.abort()
            raise
        except (SidekeyError, TimeoutError) as exc:
            log.debug("over-limit connection from %s: %s", conduit.peer, exc)
        except Exception:
            log.exception("overload handler failed for connection from %s", conduit.peer)
        finally:
            conduit.close()

    async def _run(self, conduit: Conduit) -> None:
        try:
            await self._handler(conduit)
        except asyncio.CancelledError:
            # Cancelled mid-handshake or mid-session (shutdown): nothing more will be said.
            conduit.abort()
            raise
        except ClientError as exc:
            # The client's doing (a reset mid-handshake, say): any client can cause it at
            # will, so it must not fill the log with warnings.
            log.info("connection from %s ended: %s", conduit.peer, exc)
        except SidekeyError as exc:
            log.warning("connection from %s ended: %s", conduit.peer, exc)
        except Exception:
            log.exception("handler failed for connection from %s", conduit.peer)
        finally:
            conduit.close()

    async def close(self, drain_timeout: float) -> None:
        """Stop accepting, give in-flight handlers `drain_timeout` seconds, then cancel the
        rest and wait for them."""
        self._closing = True
        if self._server is not None:
            self._server.close()
        if self._tls is not None:
            self._tls.close()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=drain_timeout)
        remaining = self._tasks | self._refusing
        for task in remaining:
            task.cancel()
        if remaining:
            await asyncio.gather(*remaining, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
        if self._unix_path is not None:
            with contextlib.suppress(FileNotFoundError):
                self._unix_path.unlink()
            self._unix_path = None


async def serve(
    listen: ListenAddress,
    handler: Handler,
    *,
    max_connections: int,
    ssl: ssl.SSLContext | None = None,
    ssl_handshake_timeout: float = DEFAULT_TLS_HANDSHAKE_TIMEOUT,
    on_reject: Callable[[], None] | None = None,
    on_overload: Handler | None = None,
    on_tls_refused: Callable[[str, str], None] | None = None,
    sock: socket.socket | None = None,
    shared: bool = False,
    socket_mode: int = UNIX_SOCKET_MODE,
) -> Listener:
    """Bind `listen` (TCP host/port, or unix path with `socket_mode`) and run
    `handler(conduit)` per connection.

    Connections over `max_connections` are refused, counted in `Listener.rejected` and
    reported to `on_reject` (for a metric). With `on_overload`, a refused connection is handed
    to it to be told so in its protocol (up to MAX_OVERLOAD_ANSWERS at once, each within
    OVERLOAD_TIMEOUT), else closed at once. Handler exceptions are logged; the conduit is
    always closed when the handler returns. With `ssl`, TLS from the first byte: the
    handshake (`TlsFirst`, within `ssl_handshake_timeout`) completes before the connection
    counts or the handler runs, and a handshake the broker refused goes to `on_tls_refused`.
    `sock` and `shared`: see `open_server`.
    """
    if max_connections < 1:
        raise ValueError("max_connections must be at least 1")
    listener = Listener(handler, max_connections, on_reject, on_overload)
    factory: Callable[[], asyncio.BaseProtocol] = listener._conduit
    if ssl is not None:
        factory = listener._tls = TlsFirst(factory, ssl, ssl_handshake_timeout, on_tls_refused)
    server, address, owned = await open_server(
        factory, listen, sock=sock, shared=shared, socket_mode=socket_mode
    )
    listener._unix_path = owned
    listener.address = address
    listener._server = server
    return listener


async def open_server(
    factory: Callable[[], asyncio.BaseProtocol],
    listen: ListenAddress,
    *,
    sock: socket.socket | None = None,
    shared: bool = False,
    socket_mode: int = UNIX_SOCKET_MODE,
) -> tuple[asyncio.Server, ListenAddress, Path | None]:
    """Start serving `factory` on `listen`: (server, the address bound, the unix socket
    path this call created and its closer must remove, else None). Plain TCP: a TLS-first
    listener's `factory` is a `TlsFirst`, never the loop's ``ssl=``.

    `sock`: an already bound, listening socket (a worker's, from its parent: see
    broker.supervisor); the server gets a dup of it, so closing one listener (a reload's
    retired service) leaves the socket to the next, and the parent owns the unix path.
    `shared`: a TCP port this process binds itself is shared with sibling workers
    (SO_REUSEPORT; the kernel spreads connections over them)."""
    loop = asyncio.get_running_loop()
    if sock is not None:
        own = sock.dup()
        own.setblocking(False)
        try:
            if own.family == socket.AF_UNIX:
                server = await loop.create_unix_server(factory, sock=own, backlog=LISTEN_BACKLOG)
            else:
                server = await loop.create_server(factory, sock=own, backlog=LISTEN_BACKLOG)
        except BaseException:
            own.close()
            raise
        return server, _bound_address(own), None
    if listen.path is not None:
        unix = bind_unix(listen.path, socket_mode)
        try:
            server = await loop.create_unix_server(
                factory,
                sock=unix,
                backlog=LISTEN_BACKLOG,
            )
        except BaseException:
            unix.close()
            with contextlib.suppress(FileNotFoundError):
                listen.path.unlink()
            raise
        return server, ListenAddress(path=listen.path), listen.path
    server = await loop.create_server(
        factory,
        listen.host,
        listen.port or 0,
        backlog=LISTEN_BACKLOG,
        reuse_address=True,
        reuse_port=shared or None,
    )
    return server, _bound_address(server.sockets[0]), None


def _bound_address(sock: socket.socket | Any) -> ListenAddress:
    name = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        return ListenAddress(path=Path(name))
    return ListenAddress(host=name[0], port=name[1])


def bind_shared(listen: ListenAddress, socket_mode: int = UNIX_SOCKET_MODE) -> socket.socket:
    """A listening socket for `listen` that worker processes can share (broker.supervisor):
    a unix socket (one for all workers, inherited), or a TCP one with SO_REUSEPORT, so more
    can be bound to its port (port 0 becomes the port the kernel chose)."""
    if listen.path is not None:
        sock = bind_unix(listen.path, socket_mode)
    else:
        infos = socket.getaddrinfo(
            listen.host or None, listen.port or 0, type=socket.SOCK_STREAM,
            flags=socket.AI_PASSIVE,
        )  # fmt: skip
        family, _, _, _, address = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
        except BaseException:
            sock.close()
            raise
    try:
        sock.listen(LISTEN_BACKLOG)
    except BaseException:
        sock.close()
        raise
    return sock


def bind_unix(path: Path, mode: int = UNIX_SOCKET_MODE) -> socket.socket:
    """Bind a unix socket at `path` with `mode`, replacing a stale socket file.

    The mode is set between bind() and listen(), so no one can connect in the window where
    the umask's mode applies (connect() to a bound, unlistened socket is refused).
    """
    _remove_stale_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        os.chmod(path, mode)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _remove_stale_socket(path: Path) -> None:
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(errno.EEXIST, f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except ConnectionRefusedError:
        path.unlink()  # Nobody listens: left behind by a crashed process.
        return
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, f"{path} is in use by a running process")
