"""The HTTP adapter's client side over HTTP/2 (RFC 9113), on the sans-IO `h2` state machine.

A connection speaks HTTP/2 when TLS's ALPN chose ``h2``, or, on a connection without ALPN
(cleartext, or a TLS client that offered none), when its first bytes are the HTTP/2 client
preface ("prior knowledge", RFC 9113 section 3.3); otherwise it is HTTP/1.1 (`server.py`).
`negotiating(server)` is the listener's protocol factory that decides.

Every stream is one request handed to the same handler as an HTTP/1.1 request, as an
`H2Request` (an `adapters.http.exchange.ClientRequest`), each in its own task, so streams of
one connection are served concurrently. What the HTTP/1.1 server does per connection is done
here per connection too: `connection_info` once (the identity the certificate proves is
worked out on the first request and kept), the connection limit, the idle timeout, shutdown.

Memory is bounded by flow control rather than by pausing the socket: a request body is
acknowledged to the client (WINDOW_UPDATE) only as the handler reads it, so at most one
stream window (`STREAM_WINDOW_BYTES`) is buffered per stream, and at most
`MAX_CONCURRENT_STREAMS` streams are open per connection. The connection window is sized for
all of them at once, so one stream whose upstream is slow to take its body never stalls the
others. A response is sent no faster than the client's windows open. A stream the client
resets cancels its handler (whose upstream exchange is then abandoned: reset upstream, or the
HTTP/1.1 connection dropped); `abort()` resets the client's stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Generic, TypeVar, cast

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from h2.errors import ErrorCodes
from hyperframe.frame import GoAwayFrame
from multidict import CIMultiDict, CIMultiDictProxy

from adapters.http.exchange import ClientRequest
from adapters.http.h2frames import WindowWaiters, split_goaway
from adapters.http.server import (
    MAX_HEADER_FIELDS,
    ClientConnection,
    HttpServer,
    InvalidResponseHead,
    RequestBodyBroken,
    clock,
)
from broker.session.net import BufferedReads

log = logging.getLogger("sidekey.http")

# RFC 9113 section 3.4: what a client sends first on an HTTP/2 connection.
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# Streams a client may have open at once. RFC 9113 section 6.5.2 recommends no fewer than
# 100; nginx allows 128, Go's server 250. Each may buffer one stream window of body.
MAX_CONCURRENT_STREAMS = 100
# A stream's receive window, so the most request body buffered per stream: one HTTP/1.1 read
# buffer (server.READ_BUFFER_BYTES), the same bound as an HTTP/1.1 request body.
STREAM_WINDOW_BYTES = 64 * 1024
# The connection's receive window: every stream's window at once, so a stream that is not
# being read (its upstream slow to take the body) cannot starve the others (6.25 MiB).
CONNECTION_WINDOW_BYTES = MAX_CONCURRENT_STREAMS * STREAM_WINDOW_BYTES
# HTTP/2's default connection window, which the increment above is added to.
_DEFAULT_WINDOW = 65_535
# A header list over limits.max_head_bytes gets a 431 on its stream, as on HTTP/1.1, up to
# this many times the limit (SETTINGS_MAX_HEADER_LIST_SIZE, which h2's HPACK decoder
# enforces); a larger one ends the connection (GOAWAY), since it must be decoded to be read.
HEADER_LIST_HEADROOM = 2
# RFC 9113 section 6.5.2: a header list's size counts 32 bytes per field besides its bytes.
_FIELD_OVERHEAD = 32

_ALPN_H2 = "h2"
_NO_BODY_STATUSES = frozenset({204, 304})
_FORBIDDEN = ("\r", "\n", "\0")

T = TypeVar("T")

# The adapter's per-request handler: the same one the HTTP/1.1 server calls.
Handler = Callable[[ClientRequest[T]], Awaitable[None]]


def _encode(text: str) -> bytes:
    # The same bytes the HTTP/1.1 upstream client would put on the wire (upstream.py).
    return text.encode("utf-8", "surrogateescape")


def _decode(raw: bytes) -> str:
    # As aiohttp decodes HTTP/1.1 header bytes, so both versions hand the adapter the same str.
    return raw.decode("utf-8", "surrogateescape")


def _fields(headers: Iterable[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    """Response fields for h2: names lowercase (RFC 9113 section 8.2.2), none with CR, LF or
    NUL (h2 would send them; an HTTP/1.1 peer behind the client could be split by them)."""
    out: list[tuple[bytes, bytes]] = []
    for name, value in headers:
        if any(c in name or c in value for c in _FORBIDDEN):
            raise InvalidResponseHead("response header contains CR, LF or NUL")
        out.append((_encode(name.lower()), _encode(value)))
    return out


class StreamBody:
    """A request body as its DATA frames arrive; what is read is acknowledged to the client."""

    __slots__ = ("_chunks", "_conn", "_eof", "_error", "_stream_id", "_waiter")

    def __init__(self, conn: H2ClientConnection[object], stream_id: int) -> None:
        self._conn = conn
        self._stream_id = stream_id
        self._chunks: deque[tuple[bytes, int]] = deque()
        self._eof = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None

    def feed(self, data: bytes, flow_controlled: int) -> None:
        self._chunks.append((data, flow_controlled))
        self._wake()

    def feed_eof(self) -> None:
        self._eof = True
        self._wake()

    def set_exception(self, exc: BaseException) -> None:
        if not self._eof:
            self._error = exc
            self._wake()

    def is_eof(self) -> bool:
        return self._eof and not self._chunks

    def discard(self) -> int:
        """Drop what is buffered (the handler is done with the stream); its flow-controlled
        size, for the connection's window."""
        size = sum(n for _, n in self._chunks)
        self._chunks.clear()
        return size

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def iter_chunked(self, n: int) -> AsyncIterator[bytes]:
        """The body's chunks as they arrive (each at most one DATA frame, so under `n`)."""
        while True:
            while not self._chunks:
                if self._error is not None:
                    raise self._error
                if self._eof:
                    return
                self._waiter = asyncio.get_running_loop().create_future()
                try:
                    await self._waiter
                finally:
                    self._waiter = None
            data, flow_controlled = self._chunks.popleft()
            # Taken: the client may send that much more.
            self._conn.acknowledge(self._stream_id, flow_controlled)
            if data:
                yield data


class H2Request(Generic[T]):
    """One HTTP/2 stream's request and the response owed to it (a `ClientRequest`)."""

    __slots__ = (
        "_conn",
        "_head",
        "_head_soon",
        "_with_body",
        "body_exists",
        "close_after",
        "content_length",
        "finished",
        "headers",
        "method",
        "payload",
        "reset",
        "started",
        "stream_id",
        "target",
        "task",
    )

    def __init__(
        self,
        conn: H2ClientConnection[T],
        stream_id: int,
        method: str,
        target: str,
        headers: CIMultiDictProxy[str],
        *,
        body_exists: bool,
        content_length: int | None,
    ) -> None:
        self._conn = conn
        self.stream_id = stream_id
        self.method = method
        self.target = target
        self.headers = headers
        self.body_exists = body_exists
        self.content_length = content_length
        self.payload = StreamBody(conn, stream_id)  # type: ignore[arg-type]
        if not body_exists:
            self.payload.feed_eof()
        self.started = False
        self.finished = False
        # The client reset the stream: nothing more may be sent on it.
        self.reset = False
        # The response asked for the connection to close (a refusal): GOAWAY after it.
        self.close_after = False
        self._with_body = True
        self._head: list[tuple[bytes, bytes]] | None = None
        self._head_soon: asyncio.Handle | None = None
        self.task: asyncio.Task[None] | None = None

    @property
    def info(self) -> T:
        return self._conn.info

    @property
    def transport(self) -> asyncio.Transport | None:
        return self._conn.transport

    def abort(self) -> None:
        """Reset the stream: a response that cannot be completed must not look complete."""
        if self.finished:
            return
        self.finished = True
        self._drop_head_soon()
        self._conn.reset(self, ErrorCodes.INTERNAL_ERROR)

    def send_continue(self) -> None:
        """Answer ``Expect: 100-continue`` with an informational 100 (RFC 9113 8.1)."""
        if not self.started and not self.reset:
            self._conn.send_headers(self, [(b":status", b"100")], end=False)

    def start(
        self,
        status: int,
        reason: str,
        headers: Iterable[tuple[str, str]],
        *,
        close: bool = False,
    ) -> None:
        """Prepare the response head; it goes out with the first `write()`, `end()`, or on
        the next turn of the loop, whichever is first. HTTP/2 has no reason phrase."""
        assert not self.started, "response already started"
        self._head = [(b":status", str(status).encode()), *_fields(headers)]
        self._with_body = (
            self.method != "HEAD" and status >= 200 and status not in _NO_BODY_STATUSES
        )
        self.close_after = close or self._conn.server.closing
        self.started = True
        # Held back one turn so that a response whose end follows at once (the whole body
        # already read, or none: gRPC's trailers-only answer) goes out as one HEADERS frame
        # with END_STREAM; a streamed one still shows its head without waiting for data.
        self._head_soon = asyncio.get_running_loop().call_soon(self._send_head)

    def _drop_head_soon(self) -> None:
        if self._head_soon is not None:
            self._head_soon.cancel()
            self._head_soon = None

    def _send_head(self, end: bool = False) -> None:
        self._head_soon = None
        head = self._head
        if head is None:
            return
        self._head = None
        if not self.reset:
            self._conn.send_headers(self, head, end=end)

    async def write(self, chunk: bytes) -> None:
        """Send body bytes as the client's windows allow. Raises ConnectionResetError if the
        client reset the stream or went away."""
        self._drop_head_soon()
        self._send_head()
        if not chunk or not self._with_body:
            return
        await self._conn.send_data(self, chunk, end=False)

    async def end(self, body: bytes = b"", trailers: list[tuple[str, str]] | None = None) -> None:
        """Finish the response: `body` as its last bytes, then `trailers` (gRPC's status)."""
        self._drop_head_soon()
        if not self._with_body:
            body = b""
        trailer_fields = _fields(trailers) if trailers else None
        conn = self._conn
        if self._head is not None and not body and trailer_fields is None:
            self._send_head(end=True)  # the whole response in one HEADERS frame
        else:
            self._send_head()
            if body:
                await conn.send_data(self, body, end=trailer_fields is None)
            if trailer_fields is not None:
                conn.send_headers(self, trailer_fields, end=True)
            elif not body:
                conn.send_data_end(self)
        self.finished = True

    async def respond(
        self,
        status: int,
        reason: str,
        headers: Iterable[tuple[str, str]],
        body: bytes,
        *,
        close: bool = False,
    ) -> None:
        """A whole response; Content-Length is added here."""
        self.start(status, reason, [*headers, ("Content-Length", str(len(body)))], close=close)
        await self.end(body)


class H2ClientConnection(asyncio.Protocol, Generic[T]):
    """One client's HTTP/2 connection: its streams, each served by its own handler task."""

    __slots__ = (
        "_closing",
        "_drained",
        "_flush_soon",
        "_h2",
        "_idle_since",
        "_loop",
        "_partial",
        "_preface_left",
        "_timer",
        "_window_waiters",
        "_write_paused",
        "_write_waiters",
        "handler",
        "info",
        "server",
        "streams",
        "transport",
    )

    def __init__(self, server: HttpServer[T], handler: Handler[T]) -> None:
        self.server = server
        self.handler = handler
        self._loop = asyncio.get_running_loop()
        config = h2.config.H2Configuration(
            client_side=False,
            header_encoding=None,
            # What the client sends is checked (RFC 9113 section 8.2: malformed requests are
            # refused by h2); what the broker sends is built here already lowercase, without
            # connection-specific fields and checked for CR, LF and NUL (_fields), so h2's
            # own pass over it is skipped: it cost ~a quarter of the broker's CPU per gRPC
            # call (cProfile, 64-byte unary calls).
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
        )
        self._h2 = h2.connection.H2Connection(config=config)
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, H2Request[T]] = {}
        self._closing = False
        self._flush_soon: asyncio.Handle | None = None
        self._write_paused = False
        self._write_waiters: list[asyncio.Future[None]] = []
        # Writers waiting for the client to open a stream's window (or the connection's).
        self._window_waiters = WindowWaiters(self._loop)
        self._drained: asyncio.Future[None] | None = None
        # Bytes of the client preface still to come, then of an incomplete frame (h2frames).
        self._preface_left = len(PREFACE)
        self._partial = b""
        self._timer: asyncio.TimerHandle | None = None
        self._idle_since = 0.0
        self.info: T

    # ------------------------------------------------------------------- what the server reads

    @property
    def idle(self) -> bool:
        return not self.streams

    @property
    def task(self) -> asyncio.Future[None] | None:
        """Done when the last open stream has been answered (for the server's drain)."""
        if not self.streams:
            return None
        if self._drained is None or self._drained.done():
            self._drained = self._loop.create_future()
        return self._drained

    def stop_accepting(self) -> None:
        """Shutdown: tell the client (GOAWAY) that no new stream will be served, finish the
        open ones, then close."""
        if self._closing or self.transport is None:
            return
        self._closing = True
        self._goaway()
        if not self.streams:
            self.transport.close()

    def _goaway(self) -> None:
        """Send GOAWAY (NO_ERROR, the last stream taken) and let the open streams finish.

        Written as a frame of our own: h2's close_connection() moves its state machine to
        CLOSED, after which nothing more may be sent on the open streams."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        self._flush()
        frame = GoAwayFrame(0)
        frame.last_stream_id = self._h2.highest_inbound_stream_id
        frame.error_code = ErrorCodes.NO_ERROR
        transport.write(frame.serialize())

    # ------------------------------------------------------------------- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport, info: T | None = None) -> None:
        """Start serving on `transport`; `info` when an HTTP/1.1 connection handed over."""
        self.transport = tr = cast(asyncio.Transport, transport)
        server = self.server
        if info is None:
            over = len(server.connections) >= server.max_connections
            info = server.connection_info(tr, over)
        self.info = info
        server.connections.add(self)
        h2c = self._h2
        header_list_cap = server.max_head_bytes * HEADER_LIST_HEADROOM
        h2c.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: MAX_CONCURRENT_STREAMS,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW_BYTES,
                # limits.max_head_bytes, with room to answer a 431 (HEADER_LIST_HEADROOM).
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: header_list_cap,
            },
        )
        # h2 applies MAX_HEADER_LIST_SIZE to its HPACK decoder only once the peer ACKs our
        # SETTINGS (and keeps 64 KiB until then): the limit holds from the first frame.
        h2c.decoder.max_header_list_size = header_list_cap
        h2c.initiate_connection()
        h2c.increment_flow_control_window(CONNECTION_WINDOW_BYTES - _DEFAULT_WINDOW)
        self._flush()
        self._idle_since = self._loop.time()
        self._timer = self._loop.call_at(self._idle_since + server.idle_timeout, self._on_idle)

    def data_received(self, data: bytes) -> None:
        if self.transport is None:
            return
        preface = b""
        if self._preface_left:
            # The client preface (not a frame) goes to h2 as it is; frames follow it.
            preface, data = data[: self._preface_left], data[self._preface_left :]
            self._preface_left -= len(preface)
        frames, goaways, self._partial = split_goaway(
            self._partial + data if self._partial else data
        )
        data = preface + frames if preface else frames
        if goaways:
            # GOAWAY (h2frames.py): the client opens no new streams; the open ones finish.
            self._closing = True
            if not self.streams:
                self.transport.close()
                return
        if not data:
            return
        try:
            events = self._h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            # h2 has queued the GOAWAY that says why (or we add one); then the connection ends.
            log.info("HTTP/2 protocol error from client: %s", _short(exc))
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self._h2.close_connection(_error_code(exc))
            self._flush()
            self.transport.close()
            return
        for event in events:
            self._event(event)
        self._flush()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: BaseException | None) -> None:
        self.transport = None
        self.server.connections.discard(self)
        if self.server.connection_lost is not None:
            self.server.connection_lost(self.info)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for request in list(self.streams.values()):
            self._client_gone(request, "client disconnected")
        self._wake_writers(ConnectionResetError("client disconnected"))
        self._window_waiters.wake()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake_writers(None)

    # ------------------------------------------------------------------- events

    def _event(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.DataReceived):
            assert event.stream_id is not None and event.data is not None
            request = self.streams.get(event.stream_id)
            size = event.flow_controlled_length or 0
            if request is None or request.reset:
                self.acknowledge(event.stream_id, size)
            else:
                request.payload.feed(event.data, size)
        elif isinstance(event, h2.events.RequestReceived):
            self._request(event)
        elif isinstance(event, h2.events.StreamEnded):
            request = self.streams.get(event.stream_id or 0)
            if request is not None:
                request.payload.feed_eof()
        elif isinstance(event, h2.events.WindowUpdated):
            self._window_waiters.wake(event.stream_id or None)
        elif isinstance(event, h2.events.StreamReset):
            request = self.streams.get(event.stream_id or 0)
            if request is not None:
                self._client_gone(request, "client reset the stream")
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            self._window_waiters.wake()  # an initial window change opens every stream's
        # GOAWAY never reaches h2 (data_received).
        # Trailers of a request (gRPC sends none), PINGs (h2 answers them), priorities and
        # settings acknowledgements need nothing from us.

    def _request(self, event: h2.events.RequestReceived) -> None:
        stream_id = event.stream_id
        assert stream_id is not None
        if self._closing or self.server.closing:
            self._h2.reset_stream(stream_id, ErrorCodes.REFUSED_STREAM)
            return
        pseudo: dict[bytes, bytes] = {}
        fields: CIMultiDict[str] = CIMultiDict()
        cookies: list[str] = []
        count = 0
        size = 0
        for raw_name, raw_value in event.headers or ():
            name, value = bytes(raw_name), bytes(raw_value)
            size += len(name) + len(value) + _FIELD_OVERHEAD
            if name.startswith(b":"):
                pseudo[name] = value
                continue
            count += 1
            if name == b"cookie":
                # RFC 9113 section 8.2.3: split cookies are joined for an HTTP/1.1 hop.
                cookies.append(_decode(value))
                continue
            fields.add(_decode(name), _decode(value))
        if cookies:
            fields.add("cookie", "; ".join(cookies))
        authority = pseudo.get(b":authority")
        if authority is not None and "host" not in fields:
            # RFC 9113 section 8.3.1: :authority is what Host says on HTTP/1.1, and is read
            # as Host (X-Forwarded-Host, the HTTP/1.1 hop).
            fields.add("host", _decode(authority))
        method = _decode(pseudo.get(b":method", b""))
        target = _decode(pseudo.get(b":path", b""))
        ended = event.stream_ended is not None
        length: int | None = None
        raw_length = fields.get("content-length")
        if raw_length is not None:
            if not raw_length.isdigit() or len(fields.getall("content-length")) > 1:
                self._h2.reset_stream(stream_id, ErrorCodes.PROTOCOL_ERROR)
                return
            length = int(raw_length)
        if method == "CONNECT" and not target:
            target = _decode(pseudo.get(b":authority", b""))  # what the adapter refuses
        request = H2Request(
            self, stream_id, method, target, CIMultiDictProxy(fields),
            body_exists=not ended, content_length=length if not ended else None,
        )  # fmt: skip
        self.streams[stream_id] = request
        if count > MAX_HEADER_FIELDS:
            request.task = self._loop.create_task(
                self._answer(request, 431, f"request has over {MAX_HEADER_FIELDS} header fields")
            )
        elif size > self.server.max_head_bytes:
            message = (
                f"request header list of {size} bytes exceeds the limit of "
                f"{self.server.max_head_bytes} bytes (limits.max_head_bytes)"
            )
            request.task = self._loop.create_task(self._answer(request, 431, message))
        else:
            request.task = self._loop.create_task(self._serve(request))

    async def _answer(self, request: H2Request[T], status: int, message: str) -> None:
        """The server's own answer to a stream the handler never sees."""
        try:
            await _respond_plain(request, status, message)
        finally:
            self._done(request)

    async def _serve(self, request: H2Request[T]) -> None:
        """Run the handler on one stream, with the HTTP/1.1 server's rules for what it owes."""
        try:
            await self.handler(request)
            if not request.started:
                raise RuntimeError("the handler sent no response")
        except (ConnectionError, asyncio.CancelledError):
            request.abort()  # the client reset the stream or went away
        except Exception:
            log.exception("HTTP/2 handler failed method=%s", request.method)
            if request.started:
                request.abort()
            else:
                try:
                    await _respond_plain(request, 500, "internal error")
                except ConnectionError:
                    request.abort()
        finally:
            if not request.finished:
                request.abort()  # a handler that never ended its response
            self._done(request)

    def _done(self, request: H2Request[T]) -> None:
        stream_id = request.stream_id
        self.streams.pop(stream_id, None)
        self._window_waiters.forget(stream_id)
        unread = request.payload.discard()
        if self.transport is None:
            return
        if unread:
            self.acknowledge(stream_id, unread)
        if not request.reset and not request.payload.is_eof():
            # Answered before the client finished sending (a refusal, an upstream error):
            # RFC 9113 section 8.1 says to stop it with NO_ERROR.
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self._h2.reset_stream(stream_id, ErrorCodes.NO_ERROR)
            self._flush_later()
        if request.close_after and not self._closing:
            self._closing = True
            self._goaway()
        if not self.streams:
            self._idle_since = self._loop.time()
            drained = self._drained
            if drained is not None and not drained.done():
                drained.set_result(None)
            if self._closing or self.server.closing:
                self._flush()
                self.transport.close()

    def _client_gone(self, request: H2Request[T], why: str) -> None:
        request.reset = True
        request.payload.set_exception(RequestBodyBroken(why))
        waiter = self._window_waiters.forget(request.stream_id)
        if waiter is not None and not waiter.done():
            waiter.set_exception(ConnectionResetError(why))
        task = request.task
        if task is not None and not task.done() and not request.finished:
            # The handler's upstream exchange is abandoned with it (reset upstream).
            task.cancel(why)

    # ------------------------------------------------------------------- sending

    def acknowledge(self, stream_id: int, size: int) -> None:
        """The handler consumed `size` flow-controlled bytes of a stream's body."""
        if size <= 0 or self.transport is None:
            return
        try:
            self._h2.acknowledge_received_data(size, stream_id)
        except h2.exceptions.ProtocolError:
            return  # the connection is closing
        self._flush_later()

    def send_headers(
        self, request: H2Request[T], fields: list[tuple[bytes, bytes]], *, end: bool
    ) -> None:
        if request.reset or self.transport is None:
            return
        try:
            self._h2.send_headers(request.stream_id, fields, end_stream=end)
        except h2.exceptions.ProtocolError as exc:
            raise InvalidResponseHead(f"cannot send on this stream: {_short(exc)}") from None
        self._flush_later()

    def send_data_end(self, request: H2Request[T]) -> None:
        if request.reset or self.transport is None:
            return
        try:
            self._h2.end_stream(request.stream_id)
        except h2.exceptions.ProtocolError:
            request.reset = True
            return
        self._flush_later()

    async def send_data(self, request: H2Request[T], data: bytes, *, end: bool) -> None:
        """Send `data` on the stream as fast as the client's windows and socket allow."""
        h2c, stream_id = self._h2, request.stream_id
        offset, size = 0, len(data)
        while offset < size:
            if request.reset or self.transport is None:
                raise ConnectionResetError("client reset the stream")
            try:
                window = h2c.local_flow_control_window(stream_id)
            except h2.exceptions.ProtocolError:
                raise ConnectionResetError("client closed the stream") from None
            n = min(window, h2c.max_outbound_frame_size, size - offset)
            if n <= 0:
                await self._window(stream_id)
                continue
            last = end and offset + n == size
            h2c.send_data(stream_id, data[offset : offset + n], end_stream=last)
            offset += n
            self._flush_later()
            if self._write_paused:
                self._flush()
                await self._writable()
        if end and size == 0:
            self.send_data_end(request)

    async def _window(self, stream_id: int) -> None:
        self._flush()
        await self._window_waiters.wait(stream_id)

    async def _writable(self) -> None:
        if not self._write_paused:
            return
        if self.transport is None:
            raise ConnectionResetError("client disconnected")
        waiter = self._loop.create_future()
        self._write_waiters.append(waiter)
        await waiter

    def _wake_writers(self, exc: BaseException | None) -> None:
        waiters, self._write_waiters = self._write_waiters, []
        for waiter in waiters:
            if waiter.done():
                continue
            if exc is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(exc)

    def reset(self, request: H2Request[T], code: ErrorCodes) -> None:
        if request.reset or self.transport is None:
            return
        request.reset = True
        try:
            self._h2.reset_stream(request.stream_id, code)
        except h2.exceptions.ProtocolError:
            return  # already closed both ways
        self._flush_later()

    def _flush_later(self) -> None:
        """Write what h2 has queued on the next turn of the loop: the frames of every stream
        that ran in this turn go out in one write."""
        if self._flush_soon is None:
            self._flush_soon = self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        if self._flush_soon is not None:
            self._flush_soon.cancel()
            self._flush_soon = None
        data = self._h2.data_to_send()
        transport = self.transport
        if data and transport is not None and not transport.is_closing():
            transport.write(data)

    def _on_idle(self) -> None:
        self._timer = None
        transport = self.transport
        if transport is None:
            return
        timeout = self.server.idle_timeout
        due = self._idle_since + timeout
        if self.idle and self._loop.time() >= due:
            self.stop_accepting()
            return
        self._timer = self._loop.call_at(max(due, self._loop.time() + timeout / 8), self._on_idle)


async def _respond_plain(request: H2Request[T], status: int, message: str) -> None:
    await request.respond(
        status, "", [("Content-Type", "text/plain; charset=utf-8"), ("Date", clock.date())],
        f"sidekey: {message}\n".encode(),
    )  # fmt: skip


def _error_code(exc: h2.exceptions.ProtocolError) -> ErrorCodes:
    code = getattr(exc, "error_code", ErrorCodes.PROTOCOL_ERROR)
    return code if isinstance(code, ErrorCodes) else ErrorCodes.PROTOCOL_ERROR


def _short(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:200]


class Negotiating(BufferedReads):
    """The listener's protocol: picks HTTP/2 or HTTP/1.1 for a new connection.

    ALPN's choice decides on TLS. Without one, the connection starts as HTTP/1.1 (its idle
    timer and connection slot are taken at once) and the first bytes are watched for the
    HTTP/2 preface; if they are it, the connection is handed over before llhttp sees them.
    """

    __slots__ = ("_handler", "_seen", "_server", "_sniffing", "_transport")

    def __init__(self, server: HttpServer[T], handler: Handler[T]) -> None:
        super().__init__(ClientConnection(server))
        self._server: HttpServer[T] = server
        self._handler = handler
        self._sniffing = False
        self._seen = b""
        self._transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        ssl_object = transport.get_extra_info("ssl_object")
        chosen = ssl_object.selected_alpn_protocol() if ssl_object is not None else None
        if chosen == _ALPN_H2:
            self.protocol = H2ClientConnection(self._server, self._handler)
        elif chosen is None:
            self._sniffing = True
            self._transport = transport
        self.protocol.connection_made(transport)

    def buffer_updated(self, nbytes: int) -> None:
        if not self._sniffing:
            self.protocol.data_received(self._buffer[:nbytes].tobytes())
            return
        data = self._seen + self._buffer[:nbytes].tobytes()
        if len(data) < len(PREFACE) and PREFACE.startswith(data):
            self._seen = data  # too early to tell
            return
        self._sniffing = False
        self._seen = b""
        if data.startswith(PREFACE):
            h1 = self.protocol
            assert isinstance(h1, ClientConnection) and self._transport is not None
            info = h1.hand_over_to_h2()
            h2conn = H2ClientConnection(self._server, self._handler)
            self.protocol = h2conn
            h2conn.connection_made(self._transport, info)
        self.protocol.data_received(data)


def negotiating(server: HttpServer[T], handler: Handler[T]) -> Negotiating:
    """A new connection's protocol (the listener's protocol factory)."""
    return Negotiating(server, handler)
