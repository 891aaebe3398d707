"""A lean HTTP/1.1 server for the HTTP adapter's client side.

aiohttp's low-level `web.Server` spent ~35% of the broker's CPU per proxied request (py-spy,
32 keep-alive mTLS clients, trivial upstream) building Request and StreamResponse objects and
writing a response head and body as separate TLS records. A one-upstream reverse proxy needs
much less, so this server keeps only that:

- one `asyncio.Protocol` per client connection (behind `broker.session.net.BufferedReads`, so TLS
  records are decrypted into a shared buffer), fed into aiohttp's C request parser (llhttp),
  whose payload `StreamReader` pauses the socket while the upstream is slow to take a body;
- requests handled one at a time per connection and in order; pipelined requests wait in a
  short queue, and the socket is paused while it is full;
- a response head is held back and sent with the first body bytes, so a small response is one
  transport write: one TLS record and one send;
- one coarse timer per connection: a connection with no request in progress is closed
  `idle_timeout` after its last request ended (nginx's keepalive_timeout), which also bounds
  a client that dribbles a request head;
- request heads over `max_head_bytes` (one line or the whole head) or with more than
  `MAX_HEADER_FIELDS` fields get a 431; malformed requests a 400; both close;
- a WebSocket upgrade request (``Connection: Upgrade``, ``Upgrade: websocket``) is the
  connection's last: nothing after its head is parsed, and the handler may answer it with
  `switch_protocols()`, which sends the 101 and hands it the connection (the bytes the client
  sent after its head included) until the handler returns.

The handler gets a `Request` and must answer it exactly once: `respond()` for a whole
response, or `start()`, `write()`… and `end()` for a streamed one. Framing is this server's
job: a Content-Length among the given headers is kept, otherwise the body is chunked (or
close-delimited for an HTTP/1.0 client); HEAD, 1xx, 204 and 304 responses have no body.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from typing import Generic, Protocol, TypeVar, cast

from aiohttp.base_protocol import BaseProtocol
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from aiohttp.http_parser import HttpRequestParser, RawRequestMessage
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from multidict import CIMultiDictProxy

from adapters.http.head import render_head
from broker.errors import ClientError
from broker.session.net import BufferedReads

log = logging.getLogger("sidekey.http")

# The payload reader pauses the client socket above 2x this many buffered body bytes: one
# 64 KiB read buffer in flight, aiohttp's own server default (read_bufsize=2**16).
READ_BUFFER_BYTES = 64 * 1024
# aiohttp's default field count: 128 fields of up to the head limit each.
MAX_HEADER_FIELDS = 128
# A whole request head, the default of limits.max_head_bytes. nginx accepts at most 32 KiB
# (large_client_header_buffers 4 x 8k) and real clients send well under 8 KiB. One line or
# field may take all of it: the parser's line and field limits are set to the same number
# (aiohttp's 8190-byte defaults refused a single longer header inside a 64 KiB head).
MAX_REQUEST_HEAD_BYTES = 64 * 1024
# Pipelined requests parsed ahead of the one being handled before the socket is paused.
# Clients rarely pipeline at all; the bound keeps a flood of tiny requests from queueing
# without limit.
MAX_PIPELINED_REQUESTS = 8

_EMPTY_BODY = b""
_LAST_CHUNK = b"0\r\n\r\n"
_NO_BODY_STATUSES = frozenset({204, 304})
_HTTP_11 = (1, 1)

T = TypeVar("T")


class RequestBodyBroken(ClientError):
    """The client's request body ended early or broke its framing (raised by its reader)."""


class InvalidResponseHead(ClientError):
    """A status reason or header would contain CR, LF or NUL on the wire."""


class Request(Generic[T]):
    """One parsed request and the one response owed to it."""

    __slots__ = (
        "_chunked",
        "_conn",
        "_head",
        "_with_body",
        "body_exists",
        "content_length",
        "finished",
        "headers",
        "keep_alive",
        "method",
        "payload",
        "started",
        "taken",
        "target",
        "upgrade",
        "version",
    )

    def __init__(
        self, conn: ClientConnection[T], message: RawRequestMessage, payload: StreamReader
    ) -> None:
        self._conn = conn
        self.method = message.method
        # The request target exactly as sent: "/path?query" (origin-form) for a normal
        # request, a URL or authority for the forms a forward proxy would take.
        self.target = message.path
        self.version = message.version
        self.headers: CIMultiDictProxy[str] = message.headers
        self.payload = payload
        self.body_exists = payload is not EMPTY_PAYLOAD
        length = None
        if self.body_exists and not message.chunked:
            # llhttp has checked it is one decimal number (and refused conflicting ones).
            raw = message.headers.get("Content-Length")
            length = int(raw) if raw is not None else None
        self.content_length: int | None = length
        self.keep_alive = not message.should_close and not message.upgrade
        # The protocol a WebSocket upgrade request asks for ("websocket"), set by the
        # connection when the parser stopped at it; None for every other request.
        self.upgrade: str | None = None
        # The handler took the connection over with `switch_protocols()`.
        self.taken = False
        self.started = False
        self.finished = False
        self._chunked = False
        self._with_body = True
        self._head: bytes | None = None

    @property
    def info(self) -> T:
        """What the server's `connection_info` said about this request's connection."""
        return self._conn.info

    @property
    def transport(self) -> asyncio.Transport | None:
        return self._conn.transport

    def abort(self) -> None:
        """Cut the client's connection: a response that cannot be completed must not look
        complete."""
        self.keep_alive = False
        self.finished = True
        transport = self._conn.transport
        if transport is not None:
            transport.abort()

    def send_continue(self) -> None:
        """Answer ``Expect: 100-continue`` (before any response is started)."""
        transport = self._conn.transport
        if transport is not None and not transport.is_closing():
            transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def start(
        self,
        status: int,
        reason: str,
        headers: Iterable[tuple[str, str]],
        *,
        close: bool = False,
    ) -> None:
        """Render the response head; it goes out with the first `write()` or with `end()`.

        `headers` must not carry hop-by-hop fields (Connection, Transfer-Encoding, ...): this
        server adds its own. Raises `InvalidResponseHead` if a reason, name or value would
        break the head (llhttp already refuses such bytes from an upstream; this is the last
        line of defence).
        """
        assert not self.started, "response already started"
        conn = self._conn
        if close or conn.server.closing or (self.body_exists and not self.payload.is_eof()):
            # An unread body would be parsed as the next request: close instead of draining.
            self.keep_alive = False
        headers = list(headers)
        length_given = any(
            len(name) == 14 and name.lower() == "content-length" for name, _ in headers
        )
        extra: list[str] = []
        with_body = self.method != "HEAD" and status >= 200 and status not in _NO_BODY_STATUSES
        self._with_body = with_body
        if with_body and not length_given:
            if self.version == _HTTP_11:
                self._chunked = True
                extra.append("Transfer-Encoding: chunked")
            else:
                self.keep_alive = False  # close-delimited body, the HTTP/1.0 way
        if not self.keep_alive:
            extra.append("Connection: close")
        elif self.version != _HTTP_11:
            extra.append("Connection: keep-alive")
        try:
            text = render_head(f"HTTP/1.1 {status} {reason}", extra, headers)
        except ValueError:
            raise InvalidResponseHead("response reason or header contains CR, LF or NUL") from None
        self._head = text.encode("latin-1", "replace")
        self.started = True

    async def write(self, chunk: bytes) -> None:
        """Send body bytes (with the held-back head, the first time); waits while the client
        is slow. Raises ConnectionResetError if the client has gone."""
        if not chunk or not self._with_body:
            return  # a HEAD, 204 or 304 response has no body, whatever the caller has
        if self._chunked:
            data = b"".join((self._take_head(), b"%x\r\n" % len(chunk), chunk, b"\r\n"))
        elif self._head is not None:
            data = self._take_head() + chunk
        else:
            data = chunk
        await self._conn.send(data)

    async def end(
        self, body: bytes = _EMPTY_BODY, trailers: list[tuple[str, str]] | None = None
    ) -> None:
        """Finish the response, with `body` as its last bytes. `trailers` are dropped: an
        HTTP/1.1 client has not asked for them (they would need TE: trailers and a chunked
        body), and what gRPC puts there only works over HTTP/2 anyway."""
        head = self._take_head()
        if not self._with_body:
            body = _EMPTY_BODY
        if self._chunked:
            if body:
                data = b"".join((head, b"%x\r\n" % len(body), body, b"\r\n", _LAST_CHUNK))
            else:
                data = head + _LAST_CHUNK
        else:
            data = head + body if body else head
        self.finished = True
        if data:
            await self._conn.send(data)

    async def respond(
        self,
        status: int,
        reason: str,
        headers: Iterable[tuple[str, str]],
        body: bytes,
        *,
        close: bool = False,
    ) -> None:
        """A whole response in one write; Content-Length is added here."""
        self.start(status, reason, [*headers, ("Content-Length", str(len(body)))], close=close)
        await self.end(body)

    def switch_protocols(
        self, headers: Iterable[tuple[str, str]]
    ) -> tuple[asyncio.Transport, bytes]:
        """Answer an upgrade request with 101 and hand its connection over.

        `headers` (the upstream's 101 minus hop-by-hop fields: Sec-WebSocket-Accept, ...) go
        out after ``Connection: Upgrade`` and ``Upgrade``. Returns the transport and the bytes
        the client sent after its request head; from then on the server neither reads nor
        writes the connection, the caller must set its own protocol on the transport before
        it next yields to the loop, and the connection is forgotten when the handler returns.
        Raises InvalidResponseHead like `start()`, ConnectionResetError if the client is gone.
        """
        assert self.upgrade is not None and not self.started, "not an upgrade, or answered"
        conn = self._conn
        transport = conn.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("client disconnected")
        try:
            text = render_head(
                "HTTP/1.1 101 Switching Protocols",
                ("Connection: Upgrade", f"Upgrade: {self.upgrade}"),
                headers,
            )
        except ValueError:
            raise InvalidResponseHead("response header contains CR, LF or NUL") from None
        transport.write(text.encode("latin-1", "replace"))
        self.started = self.finished = self.taken = True
        self.keep_alive = False
        return transport, conn.hand_over()

    def _take_head(self) -> bytes:
        head = self._head
        if head is None:
            return _EMPTY_BODY
        self._head = None
        return head


Handler = Callable[[Request[T]], Awaitable[None]]


class Served(Protocol):
    """What the server's shutdown needs of a connection, HTTP/1.1 or HTTP/2 (h2server.py)."""

    @property
    def idle(self) -> bool: ...

    @property
    def task(self) -> asyncio.Future[None] | None:
        """Done when the request in progress (all of them, on HTTP/2) has been answered."""

    transport: asyncio.Transport | None

    def stop_accepting(self) -> None:
        """Take no new request: close now if idle, else once the ones in progress are
        answered (an HTTP/2 connection says so first, with GOAWAY)."""


class HttpServer(Generic[T]):
    """The protocol factory for a listener, and the registry its shutdown works from.

    `connection_info(transport, over_limit)` is called once per connection, when it is made
    (after the TLS handshake); its result is `request.info` for every request on it.
    """

    def __init__(
        self,
        handler: Handler[T],
        connection_info: Callable[[asyncio.Transport, bool], T],
        *,
        max_connections: int,
        idle_timeout: float,
        connection_lost: Callable[[T], None] | None = None,
        negotiate: Callable[[HttpServer[T]], BufferedReads] | None = None,
        max_head_bytes: int = MAX_REQUEST_HEAD_BYTES,
    ) -> None:
        self.handler = handler
        # A request head, and any one line or field of it, is at most this many bytes.
        self.max_head_bytes = max_head_bytes
        self.connection_info = connection_info
        # Makes a new connection's protocol instead of HTTP/1.1 alone: the HTTP adapter's
        # picks HTTP/2 or HTTP/1.1 per connection (h2server.Negotiating).
        self.negotiate = negotiate
        # Told when a connection is gone (with its info), to forget what was kept for it.
        self.connection_lost = connection_lost
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.connections: set[Served] = set()
        self.closing = False

    def __call__(self) -> BufferedReads:
        if self.negotiate is not None:
            return self.negotiate(self)
        return BufferedReads(ClientConnection(self))

    def close_idle(self) -> None:
        """Stop taking requests: close idle connections now, busy ones after their response."""
        self.closing = True
        for conn in list(self.connections):
            conn.stop_accepting()

    async def shutdown(self, timeout: float) -> None:
        """Give in-flight requests `timeout` seconds to finish, then cut what is left."""
        self.close_idle()
        busy = [c.task for c in self.connections if c.task is not None and not c.idle]
        if busy:
            await asyncio.wait(busy, timeout=timeout)
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.abort()  # still busy after the drain timeout


class ClientConnection(BaseProtocol, Generic[T]):
    """One client connection: parses requests and runs the handler on them one by one."""

    __slots__ = (
        "_busy",
        "_handed_over",
        "_head_bytes",
        "_idle_since",
        "_next",
        "_queue",
        "_receiving",
        "_request_parser",
        "_stopped",
        "_tail",
        "_timer",
        "_upgrading",
        "info",
        "server",
        "task",
    )

    def __init__(self, server: HttpServer[T]) -> None:
        super().__init__(asyncio.get_running_loop())
        self.server = server
        self._request_parser = HttpRequestParser(
            self,
            self._loop,
            READ_BUFFER_BYTES,
            max_line_size=server.max_head_bytes,
            max_field_size=server.max_head_bytes,
            max_headers=MAX_HEADER_FIELDS,
            payload_exception=RequestBodyBroken,
            # Request bodies are forwarded as sent, Content-Encoding and all.
            auto_decompress=False,
        )
        # BaseProtocol pauses and resumes `_parser`; `_request_parser` is the same object,
        # typed for the calls made here.
        self._parser = self._request_parser
        self._queue: deque[Request[T]] = deque()
        # The body still arriving for the newest parsed request, if any.
        self._receiving: StreamReader | None = None
        self._head_bytes = 0
        # No further requests are read: after an Upgrade request or an unparseable head.
        self._stopped = False
        # Bytes after an upgrade request's head: the new protocol's, kept for whoever takes
        # the connection over.
        self._tail = b""
        self._upgrading = False
        self._handed_over = False
        # One serving task per connection, made by the first request. Between requests it
        # waits on `_next`; `_busy` is set while it works through the queue.
        self.task: asyncio.Task[None] | None = None
        self._next: asyncio.Future[None] | None = None
        self._busy = False
        self._timer: asyncio.TimerHandle | None = None
        self._idle_since = 0.0
        self.info: T

    @property
    def idle(self) -> bool:
        return not self._busy and not self._queue

    def stop_accepting(self) -> None:
        """Close now if idle; a busy connection's serving task sees `server.closing` after
        its response and closes then."""
        if self.idle and self.transport is not None:
            self.transport.close()

    def hand_over_to_h2(self) -> T:
        """The client opened with the HTTP/2 preface: stop serving this connection as
        HTTP/1.1 before any request, and return its info for the HTTP/2 side to keep."""
        self._stopped = True
        self.server.connections.discard(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.transport = None
        return self.info

    # ------------------------------------------------------------------- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Not BaseProtocol.connection_made: all it adds is a TCP_NODELAY setsockopt, which the
        # event loop already did on accept (test_tls_connections_have_nagle_off). Skipping it
        # saves two syscalls per connection (strace in the handshake bench: 19 -> 17, one
        # setsockopt and one getsockname); py-spy put 2 % of that bench's samples there.
        self.transport = cast(asyncio.Transport, transport)
        server = self.server
        over = len(server.connections) >= server.max_connections
        server.connections.add(self)
        self.info = server.connection_info(self.transport, over)
        self._idle_since = self._loop.time()
        self._timer = self._loop.call_at(self._idle_since + server.idle_timeout, self._on_idle)

    def data_received(self, data: bytes) -> None:
        if self._stopped:
            if self._upgrading:
                # Reading is paused, but a read already under way still lands here.
                self._tail += data
            return
        receiving = self._receiving
        if receiving is None or receiving.is_eof():
            self._head_bytes += len(data)
        try:
            messages, upgraded, tail = self._request_parser.feed_data(data)
        except LineTooLong:
            self._refuse_head(431, "Request Header Fields Too Large", self._too_large())
            return
        except HttpProcessingError as exc:
            # The parser's first line says what was wrong; later lines quote the request.
            reason = (str(exc.message).splitlines() or ["unparseable"])[0][:200]
            if reason.startswith("Too many headers"):
                self._refuse_head(
                    431, "Request Header Fields Too Large",
                    f"request head has more than {MAX_HEADER_FIELDS} header fields",
                )  # fmt: skip
                return
            self._refuse_head(400, "Bad Request", f"malformed request: {reason}")
            return
        except Exception as exc:  # the parser's own limits raise plain errors too
            self._refuse_head(400, "Bad Request", f"malformed request: {type(exc).__name__}")
            return
        if not messages:
            if self._head_bytes > self.server.max_head_bytes:
                self._refuse_head(431, "Request Header Fields Too Large", self._too_large())
            return
        if self._head_bytes > self.server.max_head_bytes and any(
            _head_size(message) > self.server.max_head_bytes for message, _ in messages
        ):
            # The whole head arrived in one read (only counted above when it did not):
            # measured from the parsed parts, only when the read was that large.
            self._refuse_head(431, "Request Header Fields Too Large", self._too_large())
            return
        self._head_bytes = 0
        for message, payload in messages:
            self._queue.append(Request(self, message, payload))
            self._receiving = payload if payload is not EMPTY_PAYLOAD else None
        if upgraded:
            # aiohttp's parser stops only at a WebSocket upgrade (h2c and others are parsed
            # on as plain requests, then the connection closes: keep_alive is False). What
            # follows the head is the new protocol's, for the handler's switch_protocols().
            self._queue[-1].upgrade = "websocket"
            self._tail = bytes(tail)
            self._upgrading = True
            self._stop_reading()
        elif len(self._queue) > MAX_PIPELINED_REQUESTS:
            self._pause_reading_for_buffer()
        if self.task is None:
            self.task = self._loop.create_task(self._serve())
        else:
            self._wake()

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        self.server.connections.discard(self)
        if self.server.connection_lost is not None:
            self.server.connection_lost(self.info)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        # Request bodies are never close-delimited: one still arriving is truncated.
        receiving = self._receiving
        if receiving is not None and not receiving.is_eof():
            receiving.set_exception(RequestBodyBroken("client disconnected mid-body"))
        self._queue.clear()
        self._wake()  # a serving task waiting for the next request ends

    # ------------------------------------------------------------------- requests

    async def _serve(self) -> None:
        """Run the handler on queued requests, in order; between requests, wait for more.

        One task for the connection's life instead of one per request: creating and
        registering a task per request cost more than a future to wait on (289k -> 285k
        instructions per request through the broker, callgrind).
        """
        queue, handler, server, loop = self._queue, self.server.handler, self.server, self._loop
        try:
            while True:
                self._busy = True
                while queue:
                    request = queue.popleft()
                    paused = self._buffer_paused and not self._stopped
                    if paused and len(queue) <= MAX_PIPELINED_REQUESTS:
                        self._resume_reading_for_buffer()
                    try:
                        await handler(request)
                        if not request.started and not request.finished:
                            # (An aborted request is finished: its client is gone.)
                            raise RuntimeError("the handler sent no response")
                    except ConnectionError:
                        request.abort()
                        return
                    except asyncio.CancelledError:
                        request.abort()
                        raise
                    except Exception:
                        log.exception("HTTP handler failed method=%s", request.method)
                        if request.started:
                            request.abort()
                        else:
                            await request.respond(
                                500, "Internal Server Error", [], b"sidekey: internal error\n",
                                close=True,
                            )  # fmt: skip
                    if request.taken:
                        return  # the handler had the connection and is done with it
                    if not request.finished:
                        request.abort()  # a handler that never ended its response
                    if not request.keep_alive or server.closing:
                        if self.transport is not None:
                            self.transport.close()
                        return
                self._busy = False
                self._idle_since = loop.time()
                if self._stopped or self.transport is None:
                    return
                self._next = loop.create_future()
                await self._next  # woken by new requests, or by the connection's loss
        except ConnectionError:
            pass  # the client went away while we answered it
        finally:
            if self._handed_over:
                # It ended under its new owner (a spliced WebSocket): nothing more comes
                # through this protocol, and connection_lost never will.
                self._forget()
            self.task = self._next = None
            self._busy = False
            self._idle_since = loop.time()

    def _wake(self) -> None:
        waiter = self._next
        if waiter is not None:
            self._next = None
            if not waiter.done():
                waiter.set_result(None)

    def _refuse_head(self, status: int, reason: str, message: str) -> None:
        """Answer an unparseable request head and close, after any request in progress."""
        transport = self.transport
        if transport is None:
            return
        self._stop_reading()
        body = f"sidekey: {message}\n".encode()
        head = (
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\n"
            f"Date: {clock.date()}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode()
        if self.task is None or not self._busy:
            transport.write(head + body)
            transport.close()
        else:
            # Pipelined behind a request in progress: that one's response comes first.
            self._queue.clear()
            task = self.task
            task.add_done_callback(lambda _: self._write_and_close(head + body))

    def hand_over(self) -> bytes:
        """Stop watching the connection for its new owner; the bytes read past the head."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._handed_over = True
        tail, self._tail = self._tail, b""
        return tail

    def _forget(self) -> None:
        """What connection_lost does, for a connection that ended under its new owner."""
        self.server.connections.discard(self)
        if self.server.connection_lost is not None:
            self.server.connection_lost(self.info)
        self.transport = None
        self._queue.clear()

    def _too_large(self) -> str:
        limit = self.server.max_head_bytes
        return f"request head exceeds the limit of {limit} bytes (limits.max_head_bytes)"

    def _stop_reading(self) -> None:
        self._stopped = True
        self._pause_reading_for_buffer()

    def _write_and_close(self, data: bytes) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(data)
            transport.close()

    async def send(self, data: bytes) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("client disconnected")
        transport.write(data)
        if self._paused:
            await self._drain_helper()

    def _on_idle(self) -> None:
        self._timer = None
        transport = self.transport
        if transport is None:
            return
        due = self._idle_since + self.server.idle_timeout
        if self.idle and self._loop.time() >= due:
            transport.close()
            return
        # Busy, or idle for less than the timeout: look again when it could next be due.
        # One timer per connection, re-armed at most once per idle_timeout, instead of a
        # cancel and a new handle per request (~1.4 us each).
        self._timer = self._loop.call_at(
            max(due, self._loop.time() + self.server.idle_timeout / 8), self._on_idle
        )


def _head_size(message: RawRequestMessage) -> int:
    """The bytes of a parsed request head: its request line and header lines."""
    size = len(message.method) + len(message.path) + len(" HTTP/1.1\r\n\r\n") + 1
    return size + sum(len(name) + len(value) + 4 for name, value in message.raw_headers)


class Clock:
    """The HTTP Date header value, formatted once per second (~4 us per strftime)."""

    __slots__ = ("_second", "_value")

    def __init__(self) -> None:
        self._second = -1
        self._value = ""

    def date(self) -> str:
        second = int(time.time())
        if second != self._second:
            self._second = second
            self._value = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(second))
        return self._value


# The one clock every response the broker writes or forwards takes its Date from.
clock = Clock()
