"""A lean, pooled HTTP/1.1 client for the HTTP adapter's one upstream.

The adapter forwards every request to the same origin, so it needs no URL parsing, cookie jar,
redirects, proxies or per-request timeout objects: aiohttp's ClientSession spent ~30% of the
broker's CPU per proxied request on exactly those (py-spy, 32 keep-alive mTLS clients, trivial
nginx upstream). This client keeps only what the adapter uses:

- one `asyncio.Protocol` per upstream connection, fed into aiohttp's C response parser
  (llhttp), whose payload `StreamReader` pauses the socket when the client side is slow;
- a LIFO pool of idle keep-alive connections, closed after `IDLE_TIMEOUT_SECONDS`, with at
  most `limit` connections open (idle or busy) at once;
- the request head in one write; the body streamed with Content-Length when the client gave
  one, else chunked, with the transport's write backpressure;
- one silence timer per exchange, re-armed lazily rather than per received chunk: the
  upstream may stay silent `read_timeout` before its response head, and `stream_idle_timeout`
  between body bytes once the head has come (an SSE or long-poll stream is quiet for minutes).

An upgrade (`upgrade()`: a WebSocket handshake) is one exchange whose 101 ends HTTP on that
connection: `UpstreamResponse.take_over()` hands its transport and the bytes after the 101 to
the caller, and the connection never returns to the pool.

Retry rule: a request that fails on a *reused* connection before any response byte arrived
(the upstream closed it while idle, racing our write) is retried once on a fresh connection,
but only if it has no body: idempotency is unknown, and a streamed body cannot be replayed.
A request with a body fails with `UpstreamProtocolError` instead (502).

Errors are the broker's upstream errors (`broker.errors`), split so the adapter can map them:
`UpstreamConnectError` (refused, unreachable), `UpstreamTLSError`, `UpstreamTimeout` (connect
or silence), `UpstreamProtocolError` (malformed, oversized, closed or reset). A failure reading
the *client's* body is a `RequestBodyError`, the client's fault.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterable, Callable, Iterable
from typing import Any, cast

from aiohttp.base_protocol import BaseProtocol
from aiohttp.http_exceptions import LineTooLong
from aiohttp.http_parser import HttpResponseParser
from aiohttp.streams import StreamReader
from multidict import CIMultiDictProxy

from adapters.http.head import render_head
from broker.errors import ClientError, UpstreamError, UpstreamTimeout
from broker.session.net import BufferedReads

# An idle keep-alive connection is closed after this long: under nginx's 75 s keepalive_timeout
# default and most load balancers' 60 s, so we usually close first. Servers with shorter ones
# (Apache, Node.js: 5 s) close first instead: their close is seen while idle and the connection
# dropped, and the rare close racing a reuse is retried (see above).
IDLE_TIMEOUT_SECONDS = 30.0
# The whole response head (status line and headers), the default of the service's
# limits.max_head_bytes, which bounds request heads too. Real API responses carry a few KiB;
# 64 KiB is twice the most nginx accepts in a request head (large_client_header_buffers
# 4 x 8 KiB) and one aiohttp read buffer. One line or field may take all of it: the parser's
# line and field limits are set to the same number (aiohttp's are 8190 bytes).
MAX_RESPONSE_HEAD_BYTES = 64 * 1024
# aiohttp's default field count.
MAX_HEADER_FIELDS = 128
# The payload reader pauses the upstream socket above 2x this many buffered bytes: one 64 KiB
# read buffer in flight, like aiohttp's own client (read_bufsize=2**16).
READ_BUFFER_BYTES = 64 * 1024

_EMPTY: tuple[()] = ()


class UpstreamConnectError(UpstreamError):
    """The upstream refused the connection or could not be reached."""


class UpstreamTLSError(UpstreamError):
    """The TLS handshake with the upstream failed (usually certificate verification)."""


class UpstreamProtocolError(UpstreamError):
    """The upstream broke HTTP/1.1: malformed or oversized response, or closed/reset early."""


class _ClosedBeforeResponse(UpstreamProtocolError):
    """Closed or reset before any response byte: retryable on a fresh connection."""


class RequestBodyError(ClientError):
    """Reading the client's request body failed (the client went away mid-upload)."""


class InvalidRequestHead(ClientError):
    """A request line or header would contain CR, LF or NUL on the wire."""


class UpstreamResponse:
    """The status, reason and headers of an upstream response, and its body chunk by chunk.

    Call `release()` exactly once when done (also on errors): it returns the connection to the
    pool only if the whole body was read and the response allowed keep-alive.
    """

    __slots__ = ("_complete", "_conn", "_payload", "_released", "headers", "reason", "status")

    def __init__(
        self,
        conn: _UpstreamConnection,
        status: int,
        reason: str,
        headers: CIMultiDictProxy[str],
        payload: StreamReader,
    ) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self._conn = conn
        self._payload = payload
        self._complete = False
        self._released = False

    @property
    def trailers(self) -> list[tuple[str, str]] | None:
        """None: llhttp parses a chunked body's trailer section but does not keep it."""
        return None

    async def read_chunk(self) -> bytes:
        """The next body chunk, or b"" at the end. Raises UpstreamError if the upstream fails."""
        chunk = await self._payload.readany()
        if not chunk:
            self._complete = True
        return chunk

    def read_buffered(self) -> bytes | None:
        """The whole body if all of it has already arrived, else None (then use `read_chunk`).

        A small response usually arrives with its head: taking it here saves the chunk loop's
        two awaits and the separate end of the response (300k -> 289k instructions per
        request through the broker, callgrind).
        """
        payload = self._payload
        if not payload.is_eof() or payload.exception() is not None:
            return None
        self._complete = True
        return payload.read_nowait()

    def take_over(self) -> tuple[asyncio.Transport, bytes]:
        """After a 101 to `UpstreamPool.upgrade()`: the transport and the bytes the upstream
        sent after the 101's head. The caller must set its own protocol on the transport
        before it next yields to the loop; `release()` afterwards, as always, only frees the
        connection's slot (the transport is the caller's to close)."""
        conn = self._conn
        assert conn._switched, "take_over() needs the upstream's 101 to an upgrade"
        transport = conn.transport
        if transport is None or transport.is_closing():
            raise UpstreamProtocolError("upstream closed the connection right after its 101")
        tail, conn._tail = conn._tail, b""
        return transport, tail

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        conn = self._conn
        conn.finish(reusable=self._complete)
        conn._pool._release_slot()


class _UpstreamConnection(BaseProtocol):
    """One upstream connection: feeds bytes to the parser, carries one exchange at a time."""

    __slots__ = (
        "_awaiting_client",
        "_got_bytes",
        "_head_bytes",
        "_keep_alive",
        "_last",
        "_payload",
        "_pool",
        "_response_parser",
        "_switched",
        "_tail",
        "_timer",
        "_upgrade_asked",
        "_upload",
        "_upload_done",
        "_waiter",
        "_with_body",
        "idle_since",
    )

    def __init__(self, pool: UpstreamPool) -> None:
        super().__init__(pool._loop)
        self._pool = pool
        self._with_body = True
        # BaseProtocol pauses and resumes `_parser`; `_response_parser` is the same object,
        # typed for the calls made here.
        self._response_parser = self._new_parser(True)
        self._parser = self._response_parser
        self._waiter: asyncio.Future[tuple[object, StreamReader]] | None = None
        self._payload: StreamReader | None = None
        self._keep_alive = False
        self._last = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._head_bytes = 0
        self._got_bytes = False
        self._upload: asyncio.Task[None] | None = None
        self._upload_done = True
        # The upload is waiting for the client's next body bytes (not the upstream).
        self._awaiting_client = False
        # The exchange asked to switch protocols, and the upstream did (its 101 arrived):
        # what it sends next is the new protocol's, kept in `_tail` for `take_over()`.
        self._upgrade_asked = False
        self._switched = False
        self._tail = b""
        self.idle_since = 0.0

    def _new_parser(self, with_body: bool) -> HttpResponseParser:
        return HttpResponseParser(
            self,
            self._loop,
            READ_BUFFER_BYTES,
            max_line_size=self._pool.max_head_bytes,
            max_field_size=self._pool.max_head_bytes,
            max_headers=MAX_HEADER_FIELDS,
            payload_exception=UpstreamProtocolError,
            response_with_body=with_body,
            read_until_eof=True,
            auto_decompress=False,
        )

    @property
    def usable(self) -> bool:
        transport = self.transport
        return transport is not None and not transport.is_closing()

    # ------------------------------------------------------------------- one exchange

    def begin(
        self, with_body: bool, upgrade: bool = False
    ) -> asyncio.Future[tuple[object, StreamReader]]:
        """Start an exchange: arm the silence timer and return the response-head future."""
        self._upgrade_asked = upgrade
        if with_body is not self._with_body:
            # HEAD responses carry no body whatever their headers say; the parser must know.
            self._with_body = with_body
            self._parser = self._response_parser = self._new_parser(with_body)
        waiter: asyncio.Future[tuple[object, StreamReader]] = self._loop.create_future()
        self._waiter = waiter
        self._payload = None
        self._head_bytes = 0
        self._got_bytes = False
        self._keep_alive = False
        self._upload_done = True
        self._last = now = self._loop.time()
        if self._timer is None:
            # One timer per connection, left running across exchanges and re-armed only when
            # it fires early, instead of a call_at() and a cancel() per request (~1.4 us each).
            self._timer = self._loop.call_at(now + self._pool.read_timeout, self._on_silence)
        return waiter

    def touch(self) -> None:
        """Upload progress counts as activity for the silence timer."""
        self._last = self._loop.time()

    def finish(self, *, reusable: bool) -> None:
        """The exchange is over: pool the connection if it can carry another, else close it."""
        upload = self._upload
        if upload is not None:
            self._upload = None
            if not upload.done():
                upload.cancel()
        reuse = reusable and self._keep_alive and self._upload_done and self.usable
        self._waiter = None
        self._payload = None
        if not reuse and self.transport is not None:
            if reusable:
                self.transport.close()  # complete, but the upstream asked to close
            else:
                self.transport.abort()
        self._pool._finished(self, reuse)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def fail(self, exc: BaseException) -> None:
        """Fail the current exchange (headers or body) with `exc` and drop the connection."""
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
        elif self._payload is not None and not self._payload.is_eof():
            self._payload.set_exception(exc)
        self._keep_alive = False
        self.abort()

    def _silence_limit(self) -> float:
        """How long the upstream may be silent now: before the head, or within the body."""
        if self._head_pending:
            return self._pool.read_timeout
        return self._pool.stream_idle_timeout

    @property
    def _head_pending(self) -> bool:
        waiter = self._waiter
        return waiter is not None and not waiter.done()

    def _on_silence(self) -> None:
        self._timer = None
        if self._waiter is None and self._payload is None:
            return  # between exchanges: the next begin() arms it again
        if self._reading_paused:
            return  # our pause (slow client), not the upstream's silence; resume re-arms
        timeout = self._silence_limit()
        if self._awaiting_client:
            # The upload waits for the client's next bytes: the upstream may well wait for
            # them too. That silence is the client's, bounded by the adapter
            # (limits.body_idle_timeout); look again a full limit after now.
            self._timer = self._loop.call_at(self._loop.time() + timeout, self._on_silence)
            return
        due = self._last + timeout
        if due > self._loop.time():
            self._timer = self._loop.call_at(due, self._on_silence)
            return
        if self._head_pending:
            why = f"upstream sent nothing for {timeout:g} s (upstream.timeout)"
        else:
            why = f"upstream sent nothing for {timeout:g} s mid-body (upstream.stream_idle_timeout)"
        self.fail(UpstreamTimeout(why))

    # ------------------------------------------------------------------- asyncio.Protocol

    def data_received(self, data: bytes) -> None:
        if self._switched:
            # The new protocol's bytes, arriving before the new owner set its protocol.
            self._tail += data
            return
        if data:
            self._got_bytes = True
            # One loop.time() per read (~0.08 us) instead of cancelling and re-arming a timer
            # handle per read like aiohttp's _reschedule_timeout (~1.4 us, uvloop).
            self._last = self._loop.time()
        waiter = self._waiter
        if waiter is None and self._payload is None:
            if data:
                # Bytes nobody asked for (on an idle connection): not an HTTP/1.1 peer we
                # can trust with the next request.
                self.abort()
            return
        try:
            messages, upgraded, tail = self._response_parser.feed_data(data)
        except LineTooLong:
            self.fail(UpstreamProtocolError(self._pool.head_too_large))
            return
        except Exception as exc:
            self.fail(UpstreamProtocolError(f"malformed response: {short_error(exc)}"))
            return
        limit = self._pool.max_head_bytes
        if waiter is not None and not waiter.done():
            self._head_bytes += len(data)
            if not messages and self._head_bytes > limit:
                self.fail(UpstreamProtocolError(self._pool.head_too_large))
                return
        if upgraded:
            self._switch(messages, bytes(tail))
            return
        for message, payload in messages:
            code = message.code
            if code < 200:
                # Interim responses (103 Early Hints, a stray 100) are not relayed; 101 would
                # need an Upgrade we never send.
                if code == 101:
                    why = (
                        "upstream answered 101 without an Upgrade header"
                        if self._upgrade_asked
                        else "upstream switched protocols unasked"
                    )
                    self.fail(UpstreamProtocolError(why))
                    return
                continue
            if waiter is None or waiter.done():
                # A second final response to one request.
                self.fail(UpstreamProtocolError("more responses than requests"))
                return
            if self._head_bytes > limit and _head_size(message) > limit:
                self.fail(UpstreamProtocolError(self._pool.head_too_large))
                return
            self._keep_alive = not message.should_close and message.version == (1, 1)
            self._payload = payload
            waiter.set_result((message, payload))
            pool = self._pool
            if pool.stream_idle_timeout < pool.read_timeout and self._timer is not None:
                # The timer is due at the longer head limit; the body's is shorter.
                self._timer.cancel()
                self._timer = self._loop.call_at(
                    self._last + pool.stream_idle_timeout, self._on_silence
                )

    def _switch(self, messages: list[tuple[Any, StreamReader]], tail: bytes) -> None:
        """The parser stopped at a 101: the exchange's answer if it asked to upgrade."""
        waiter = self._waiter
        final = [(m, p) for m, p in messages if m.code >= 200 or m.code == 101]
        if (
            not self._upgrade_asked
            or waiter is None
            or waiter.done()
            or len(final) != 1
            or final[0][0].code != 101
        ):
            self.fail(UpstreamProtocolError("upstream switched protocols unasked"))
            return
        self._switched = True
        self._keep_alive = False
        self._tail = tail
        if self._timer is not None:
            # Silence on the new protocol is the splice's to judge, not this timer's.
            self._timer.cancel()
            self._timer = None
        waiter.set_result(final[0])

    def eof_received(self) -> bool:
        return False  # close the transport: half-closed upstreams are not reused

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        waiter, payload = self._waiter, self._payload
        if waiter is not None and not waiter.done():
            why = f": {short_error(exc)}" if exc is not None else ""
            cls = UpstreamProtocolError if self._got_bytes else _ClosedBeforeResponse
            waiter.set_exception(cls(f"upstream closed the connection before responding{why}"))
        elif payload is not None and not payload.is_eof():
            try:
                # Ends a read-until-close body; a short Content-Length or chunked body raises.
                self._response_parser.feed_eof()
            except Exception as err:
                payload.set_exception(
                    UpstreamProtocolError(f"upstream closed mid-body: {short_error(err)}")
                )
            else:
                if not payload.is_eof():
                    payload.set_exception(UpstreamProtocolError("upstream closed mid-body"))
        elif waiter is None:
            self._pool._discard(self)

    def resume_reading(self, resume_parser: bool = True) -> None:
        # The payload reader calls this on every read under its low-water mark; only an actual
        # pause needs undoing (BaseProtocol's version re-feeds the parser each time).
        if not self._reading_paused:
            return
        self._last = self._loop.time()
        super().resume_reading(resume_parser)
        if self._timer is None and self._payload is not None and self.transport is not None:
            self._timer = self._loop.call_at(self._last + self._silence_limit(), self._on_silence)


def _head_size(message: object) -> int:
    raw: Iterable[tuple[bytes, bytes]] = getattr(message, "raw_headers", _EMPTY)
    return sum(len(name) + len(value) + 4 for name, value in raw)


def short_error(exc: BaseException | None) -> str:
    """An exception as one bounded line (parser errors quote the offending bytes)."""
    text = f"{type(exc).__name__}: {exc}" if exc is not None else "closed"
    return text.splitlines()[0][:200]


async def open_buffered(
    loop: asyncio.AbstractEventLoop,
    protocol: Callable[[], Any],
    host: str,
    port: int,
    *,
    tls: ssl.SSLContext | None,
    timeout: float,
) -> tuple[asyncio.BaseTransport, BufferedReads]:
    """Connect to an upstream (TLS when `tls` is set, named by `host`) within `timeout`,
    reading through BufferedReads; the failures are the pool's UpstreamError kinds."""
    try:
        async with asyncio.timeout(timeout):
            return await loop.create_connection(
                lambda: BufferedReads(protocol()),
                host,
                port,
                ssl=tls,
                server_hostname=host if tls is not None else None,
                ssl_handshake_timeout=timeout if tls is not None else None,
            )
    except TimeoutError:
        raise UpstreamTimeout(f"connecting took longer than {timeout:g} s") from None
    except ssl.SSLError as exc:  # includes certificate verification failures
        raise UpstreamTLSError(f"TLS handshake failed: {short_error(exc)}") from None
    except OSError as exc:
        raise UpstreamConnectError(f"cannot connect: {short_error(exc)}") from None


class UpstreamPool:
    """Keep-alive connections to one origin (http or https), at most `limit` open at once."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        host_header: str,
        ssl_context: ssl.SSLContext | None,
        connect_timeout: float,
        read_timeout: float,
        limit: int,
        stream_idle_timeout: float | None = None,
        max_head_bytes: int = MAX_RESPONSE_HEAD_BYTES,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        # A response head, and any one line or field of it, is at most this many bytes.
        self.max_head_bytes = max_head_bytes
        self.head_too_large = (
            f"response head exceeds {max_head_bytes} bytes (limits.max_head_bytes)"
        )
        self._host = host
        self._port = port
        self._ssl = ssl_context
        self._host_line = f"Host: {host_header}"
        self.connect_timeout = connect_timeout
        # Silence allowed before the response head, and (default: the same) within a body.
        self.read_timeout = read_timeout
        self.stream_idle_timeout = (
            stream_idle_timeout if stream_idle_timeout is not None else read_timeout
        )
        self.limit = limit
        # HTTP/1.1 carries one request per connection at a time; the adapter never has more
        # than max_connections requests in flight, so this bound rarely makes one wait.
        self._slots = asyncio.Semaphore(limit)
        # LIFO: the most recently used connection is the least likely to have been closed by
        # the upstream's keep-alive timeout, and the oldest age out at the bottom.
        self._idle: list[_UpstreamConnection] = []
        self._sweeper: asyncio.TimerHandle | None = None
        self._closed = False
        self.opened = 0  # connections opened, for tests and metrics
        self.busy = 0  # requests holding a connection slot

    @property
    def idle(self) -> int:
        return len(self._idle)

    async def request(
        self,
        method: str,
        target: str,
        headers: Iterable[tuple[str, str]],
        body: AsyncIterable[bytes] | None,
        content_length: int | None,
    ) -> UpstreamResponse:
        """Send one request; return once the response head arrived.

        `target` is origin-form (``/path?query``). `headers` must not include Host,
        Content-Length or Transfer-Encoding: the client sets those for this hop. With `body`,
        `content_length` (if known) is sent as Content-Length, else the body is chunked.
        """
        head = self._head(method, target, headers, body is not None, content_length)
        return await self._send(method, head, body, content_length, False)

    async def upgrade(
        self, method: str, target: str, headers: Iterable[tuple[str, str]], protocol: str
    ) -> UpstreamResponse:
        """Send a bodiless request asking to switch to `protocol` (``Connection: Upgrade``,
        ``Upgrade: websocket``); return once the response head arrived. A 101 leaves the
        connection to `UpstreamResponse.take_over()`; any other status is a plain response
        (read and release it as usual)."""
        extra = ("Connection: Upgrade", f"Upgrade: {protocol}")
        head = self._head(method, target, headers, False, None, hop=extra)
        return await self._send(method, head, None, None, True)

    async def _send(
        self,
        method: str,
        head: bytes,
        body: AsyncIterable[bytes] | None,
        content_length: int | None,
        upgrade: bool,
    ) -> UpstreamResponse:
        chunked = body is not None and content_length is None
        await self._slots.acquire()
        self.busy += 1
        try:
            conn = self._take_idle()
            if conn is not None:
                try:
                    return await self._exchange(conn, method, head, body, chunked, upgrade=upgrade)
                except _ClosedBeforeResponse:
                    if body is not None:
                        raise
                    # The upstream closed the idle connection as we reused it; see the
                    # module docstring for why only bodiless requests are retried.
            conn = await self._connect()
            return await self._exchange(conn, method, head, body, chunked, upgrade=upgrade)
        except BaseException:
            self._release_slot()
            raise

    def _release_slot(self) -> None:
        self.busy -= 1
        self._slots.release()

    def _head(
        self,
        method: str,
        target: str,
        headers: Iterable[tuple[str, str]],
        has_body: bool,
        content_length: int | None,
        *,
        hop: Iterable[str] = (),
    ) -> bytes:
        extra = [self._host_line, *hop]
        if content_length is not None:
            extra.append(f"Content-Length: {content_length}")
        elif has_body:
            extra.append("Transfer-Encoding: chunked")
        try:
            # The method and target are checked too: they are part of the start line.
            text = render_head(f"{method} {target} HTTP/1.1", extra, headers)
        except ValueError:
            raise InvalidRequestHead("request line or header contains CR, LF or NUL") from None
        return text.encode("utf-8", "surrogateescape")

    def _take_idle(self) -> _UpstreamConnection | None:
        idle = self._idle
        if not idle:
            return None
        oldest = self._loop.time() - IDLE_TIMEOUT_SECONDS
        while idle:
            conn = idle.pop()
            if conn.usable and conn.idle_since > oldest:
                return conn
            conn.abort()
        return None

    async def _connect(self) -> _UpstreamConnection:
        _, reads = await open_buffered(
            self._loop,
            lambda: _UpstreamConnection(self),
            self._host,
            self._port,
            tls=self._ssl,
            timeout=self.connect_timeout,
        )
        self.opened += 1
        return cast(_UpstreamConnection, reads.protocol)

    async def _exchange(
        self,
        conn: _UpstreamConnection,
        method: str,
        head: bytes,
        body: AsyncIterable[bytes] | None,
        chunked: bool,
        *,
        upgrade: bool = False,
    ) -> UpstreamResponse:
        waiter = conn.begin(method != "HEAD", upgrade)
        transport = conn.transport
        assert transport is not None
        transport.write(head)
        if body is not None:
            conn._upload_done = False
            conn._upload = asyncio.get_running_loop().create_task(_upload(conn, body, chunked))
        try:
            message, payload = await waiter
        except BaseException:
            conn.finish(reusable=False)
            raise
        m = message
        return UpstreamResponse(
            conn,
            m.code,  # type: ignore[attr-defined]
            m.reason,  # type: ignore[attr-defined]
            m.headers,  # type: ignore[attr-defined]
            payload,
        )

    def _finished(self, conn: _UpstreamConnection, reuse: bool) -> None:
        if not reuse:
            return
        if self._closed:
            if conn.transport is not None:
                conn.transport.close()
            return
        conn.idle_since = self._loop.time()
        self._idle.append(conn)
        if self._sweeper is None:
            self._sweeper = self._loop.call_later(IDLE_TIMEOUT_SECONDS, self._sweep)

    def _discard(self, conn: _UpstreamConnection) -> None:
        if conn in self._idle:
            self._idle.remove(conn)

    def _sweep(self) -> None:
        self._sweeper = None
        oldest = self._loop.time() - IDLE_TIMEOUT_SECONDS
        idle = self._idle
        # The list is ordered by idle_since (appended on release), oldest first.
        while idle and idle[0].idle_since <= oldest:
            idle.pop(0).abort()
        if idle:
            due = idle[0].idle_since + IDLE_TIMEOUT_SECONDS
            self._sweeper = self._loop.call_at(due, self._sweep)

    async def close(self) -> None:
        """Close idle connections; busy ones close when their exchange finishes."""
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        idle, self._idle = self._idle, []
        for conn in idle:
            if conn.transport is not None:
                conn.transport.close()


async def _upload(conn: _UpstreamConnection, body: AsyncIterable[bytes], chunked: bool) -> None:
    """Stream the client's body upstream, concurrently with reading the response."""
    chunks = body.__aiter__()
    while True:
        conn._awaiting_client = True
        try:
            chunk = await chunks.__anext__()
        except StopAsyncIteration:
            break
        except Exception as exc:
            err = RequestBodyError(f"reading the client's body failed: {short_error(exc)}")
            err.__cause__ = exc  # the adapter tells a client gone from one gone quiet
            conn.fail(err)
            return
        finally:
            conn._awaiting_client = False
        transport = conn.transport
        if transport is None or transport.is_closing():
            return  # the response side reports why
        if not chunk:
            continue
        if chunked:
            transport.writelines((b"%x\r\n" % len(chunk), chunk, b"\r\n"))
        else:
            transport.write(chunk)
        conn.touch()
        if conn.writing_paused:
            try:
                await conn._drain_helper()
            except ConnectionError:
                return  # the upstream went away; the response side reports it
            conn.touch()
    transport = conn.transport
    if transport is None or transport.is_closing():
        return
    if chunked:
        transport.write(b"0\r\n\r\n")
    conn._upload_done = True
