"""HTTP/2 toward the upstream (``upstream: {url: ..., http2: true}``), on the sans-IO `h2`.

On https the broker offers ``h2`` and ``http/1.1`` by ALPN; an upstream that picks HTTP/1.1
(or none) is served by the HTTP/1.1 pool from then on (`upstream.py`). On http it speaks
HTTP/2 from the first byte ("prior knowledge", RFC 9113 section 3.3), as gRPC servers expect.

Requests are streams multiplexed on few connections: a new connection is opened only when
every open one is at the upstream's SETTINGS_MAX_CONCURRENT_STREAMS, up to `limit`
connections, and one idle for `IDLE_TIMEOUT_SECONDS` is closed. Each exchange is an
`H2Reply` (an `adapters.http.exchange.UpstreamReply`): its body is acknowledged to the
upstream only as the adapter reads it, so at most one stream window is buffered per stream
(flow control is the backpressure: a slow client stops the upstream's stream, not the
connection). The request body is sent as the upstream's windows allow, concurrently with the
response (gRPC's bidirectional streams need both at once). Releasing a reply that was not read
to its end resets the stream (CANCEL); a stream the upstream resets fails the exchange, and the
adapter resets the client's stream in turn.

Silence is timed per stream as on HTTP/1.1: `read_timeout` (upstream.timeout) until the
response head, `stream_idle_timeout` between body chunks. A gRPC call's own deadline
(``grpc-timeout``) extends the first for that call, so a long call the client allowed is not
cut by the broker first.

Errors are the same as the HTTP/1.1 client's: `UpstreamConnectError`, `UpstreamTLSError`,
`UpstreamTimeout`, `UpstreamProtocolError`; a failure reading the client's body is a
`RequestBodyError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import ssl
from collections import deque
from collections.abc import AsyncIterable, Iterable
from http import HTTPStatus
from typing import cast

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from h2.errors import ErrorCodes
from hyperframe.frame import GoAwayFrame
from multidict import CIMultiDict, CIMultiDictProxy

from adapters.http.exchange import UpstreamReply
from adapters.http.h2frames import WindowWaiters, split_goaway
from adapters.http.upstream import (
    IDLE_TIMEOUT_SECONDS,
    InvalidRequestHead,
    RequestBodyError,
    UpstreamConnectError,
    UpstreamPool,
    UpstreamProtocolError,
    open_buffered,
    short_error,
)
from broker.errors import UpstreamError, UpstreamTimeout

log = logging.getLogger("sidekey.http")

# A stream's receive window: the most response body buffered per stream before the upstream
# must wait for the client (one HTTP/1.1 read buffer, upstream.READ_BUFFER_BYTES).
STREAM_WINDOW_BYTES = 64 * 1024
# Streams the broker runs on one upstream connection at most, whatever the upstream allows
# (h2's default for an unbounded peer is unlimited); the connection window fits them all.
MAX_STREAMS_PER_CONNECTION = 100
CONNECTION_WINDOW_BYTES = MAX_STREAMS_PER_CONNECTION * STREAM_WINDOW_BYTES
_DEFAULT_WINDOW = 65_535
# A client's stream ids are odd and below 2**31 (RFC 9113 section 5.1.1); a connection this
# far along takes no new stream.
_LAST_STREAM_ID = 2**31 - 1 - 2 * MAX_STREAMS_PER_CONNECTION
# gRPC's deadline header (PROTOCOL-HTTP2.md): up to 8 digits and a unit.
_GRPC_TIMEOUT = re.compile(r"^(\d{1,8})([HMSmun])$")
_GRPC_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}
# Added to a gRPC deadline before the broker's own silence timeout fires: the upstream's
# DEADLINE_EXCEEDED answer should reach the client before the broker gives up.
GRPC_DEADLINE_GRACE_SECONDS = 1.0
_FORBIDDEN = ("\r", "\n", "\0")


def _decode(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def _encode(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def grpc_timeout(value: str | None) -> float | None:
    """The seconds a ``grpc-timeout`` value allows, or None if absent or malformed."""
    if value is None:
        return None
    match = _GRPC_TIMEOUT.match(value)
    if match is None:
        return None
    return int(match.group(1)) * _GRPC_UNITS[match.group(2)]


class UpstreamStreamReset(UpstreamProtocolError):
    """The upstream reset the stream (RST_STREAM) or went away (GOAWAY) before its end."""


class _Unprocessed(UpstreamStreamReset):
    """The upstream says it never processed the stream (REFUSED_STREAM, or above a GOAWAY's
    last stream id, RFC 9113 section 8.7): safe to send again on another connection."""


class _Stream:
    """One exchange's state on an upstream connection."""

    __slots__ = (
        "awaiting_client",
        "chunks",
        "conn",
        "ended",
        "error",
        "head",
        "last",
        "paused",
        "released",
        "stream_id",
        "timeout",
        "trailers",
        "upload",
        "waiter",
    )

    def __init__(self, conn: _H2Upstream, stream_id: int, timeout: float) -> None:
        self.conn = conn
        self.stream_id = stream_id
        self.timeout = timeout
        self.head: asyncio.Future[list[tuple[bytes, bytes]]] = conn.loop.create_future()
        self.chunks: deque[tuple[bytes, int]] = deque()
        self.ended = False
        self.error: BaseException | None = None
        self.trailers: list[tuple[str, str]] | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.upload: asyncio.Task[None] | None = None
        self.last = conn.loop.time()
        # Body buffered and not yet read by the adapter: the client is slow, not the upstream.
        self.paused = False
        # The upload waits for the client's next body bytes: the upstream may wait for them
        # too, and that silence is the client's (bounded by limits.body_idle_timeout).
        self.awaiting_client = False
        self.released = False

    def wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def fail(self, exc: BaseException) -> None:
        if self.error is None and not (self.ended and self.head.done()):
            self.error = exc
        if not self.head.done():
            self.head.set_exception(exc)
            # Retrieved here so that asyncio does not warn when nobody awaits it any more.
            self.head.exception()
        self.wake()


class H2Reply:
    """The upstream's response on one stream (an `UpstreamReply`)."""

    __slots__ = ("_stream", "headers", "reason", "status")

    def __init__(self, stream: _Stream, status: int, headers: CIMultiDictProxy[str]) -> None:
        self._stream = stream
        self.status = status
        # HTTP/2 has no reason phrase; an HTTP/1.1 client gets the standard one.
        try:
            self.reason = HTTPStatus(status).phrase
        except ValueError:
            self.reason = ""
        self.headers = headers

    @property
    def trailers(self) -> list[tuple[str, str]] | None:
        return self._stream.trailers

    async def read_chunk(self) -> bytes:
        """The next body chunk, or b"" at the end. Raises UpstreamError if the stream fails."""
        stream = self._stream
        while not stream.chunks:
            if stream.error is not None:
                raise stream.error
            if stream.ended:
                return b""
            stream.waiter = stream.conn.loop.create_future()
            try:
                await stream.waiter
            finally:
                stream.waiter = None
        data, flow_controlled = stream.chunks.popleft()
        if not stream.chunks:
            stream.paused = False
            stream.last = stream.conn.loop.time()
        stream.conn.acknowledge(stream.stream_id, flow_controlled)
        return data if data else await self.read_chunk()

    def read_buffered(self) -> bytes | None:
        """The whole body if the stream has already ended, else None."""
        stream = self._stream
        if not stream.ended or stream.error is not None:
            return None
        chunks = stream.chunks
        body = b"".join(data for data, _ in chunks)
        size = sum(n for _, n in chunks)
        chunks.clear()
        stream.conn.acknowledge(stream.stream_id, size)
        return body

    def release(self) -> None:
        self._stream.conn.release(self._stream)


class _H2Upstream(asyncio.Protocol):
    """One HTTP/2 connection to the upstream, carrying many streams."""

    __slots__ = (
        "_flush_soon",
        "_h2",
        "_partial",
        "_timer",
        "_window_waiters",
        "_write_paused",
        "_write_waiters",
        "alpn_refused",
        "gone",
        "idle_since",
        "loop",
        "pool",
        "streams",
        "transport",
    )

    def __init__(self, pool: H2UpstreamPool) -> None:
        self.pool = pool
        self.loop = pool.loop
        config = h2.config.H2Configuration(
            client_side=True,
            header_encoding=None,
            # The request fields are built by `H2UpstreamPool._fields` (lowercase, checked for
            # CR, LF and NUL, pseudo-fields first) and what comes back is filtered by the
            # adapter and checked again on the way to the client, so h2's per-field
            # generator passes both ways are skipped (~a quarter of the CPU per gRPC call).
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
            validate_inbound_headers=False,
        )
        self._h2 = h2.connection.H2Connection(config=config)
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, _Stream] = {}
        # The upstream sent GOAWAY or the connection failed: no new streams on it.
        self.gone = False
        # TLS negotiated something other than h2: the pool falls back to HTTP/1.1.
        self.alpn_refused = False
        self._flush_soon: asyncio.Handle | None = None
        self._write_paused = False
        self._write_waiters: list[asyncio.Future[None]] = []
        self._window_waiters = WindowWaiters(self.loop)
        self._timer: asyncio.TimerHandle | None = None
        self.idle_since = self.loop.time()
        # The bytes of an incomplete frame, held until the rest arrives (_without_goaway).
        self._partial = b""

    @property
    def capacity(self) -> int:
        if self.gone or self.transport is None or self.transport.is_closing():
            return 0
        if self._h2.highest_outbound_stream_id >= _LAST_STREAM_ID:
            self.close()  # stream ids run out at 2**31: the next ones go on a new connection
            return 0
        allowed = min(self._h2.remote_settings.max_concurrent_streams, MAX_STREAMS_PER_CONNECTION)
        return allowed - len(self.streams)

    # ------------------------------------------------------------------- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None and ssl_object.selected_alpn_protocol() != "h2":
            self.alpn_refused = True
            return
        h2c = self._h2
        h2c.local_settings = h2.settings.Settings(
            client=True,
            initial_values={
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW_BYTES,
                # limits.max_head_bytes, as on the HTTP/1.1 side (its pool holds it).
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: self.pool.http1.max_head_bytes,
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 0,  # no pushed streams
            },
        )
        # h2 applies MAX_HEADER_LIST_SIZE to its HPACK decoder only once the peer ACKs our
        # SETTINGS (and keeps 64 KiB until then): the limit holds from the first frame.
        h2c.decoder.max_header_list_size = self.pool.http1.max_head_bytes
        h2c.initiate_connection()
        h2c.increment_flow_control_window(CONNECTION_WINDOW_BYTES - _DEFAULT_WINDOW)
        self._flush()

    def data_received(self, data: bytes) -> None:
        if self.transport is None or self.alpn_refused:
            return
        data = self._without_goaway(data)
        if not data:
            return
        try:
            events = self._h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            self._broken(UpstreamProtocolError(f"upstream broke HTTP/2: {short_error(exc)}"))
            return
        now = self.loop.time()
        for event in events:
            self._event(event, now)
        self._flush()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: BaseException | None) -> None:
        self.transport = None
        self.gone = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        why = f": {short_error(exc)}" if exc is not None else ""
        for stream in list(self.streams.values()):
            if not stream.ended:
                stream.fail(UpstreamStreamReset(f"upstream closed the connection{why}"))
        self._wake_writers(ConnectionResetError("upstream closed the connection"))
        self._window_waiters.wake()
        self.pool.discard(self)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake_writers(None)

    # ------------------------------------------------------------------- events

    def _event(self, event: h2.events.Event, now: float) -> None:
        if isinstance(event, h2.events.DataReceived):
            stream = self.streams.get(event.stream_id or 0)
            size = event.flow_controlled_length or 0
            if stream is None or stream.released:
                self.acknowledge(event.stream_id or 0, size)
                return
            stream.last = now
            stream.chunks.append((event.data or b"", size))
            stream.paused = True
            stream.wake()
        elif isinstance(event, h2.events.ResponseReceived):
            stream = self.streams.get(event.stream_id or 0)
            if stream is not None:
                stream.last = now
                if not stream.head.done():
                    stream.head.set_result([(bytes(n), bytes(v)) for n, v in event.headers or ()])
        elif isinstance(event, h2.events.TrailersReceived):
            stream = self.streams.get(event.stream_id or 0)
            if stream is not None:
                stream.trailers = [
                    (_decode(bytes(n)), _decode(bytes(v))) for n, v in event.headers or ()
                ]
        elif isinstance(event, h2.events.StreamEnded):
            stream = self.streams.get(event.stream_id or 0)
            if stream is not None:
                stream.ended = True
                stream.wake()
        elif isinstance(event, h2.events.StreamReset):
            stream = self.streams.get(event.stream_id or 0)
            if stream is not None:
                code = _code_name(event.error_code)
                cls = (
                    _Unprocessed
                    if event.error_code == ErrorCodes.REFUSED_STREAM and not stream.head.done()
                    else UpstreamStreamReset
                )
                stream.fail(cls(f"upstream reset the stream ({code})"))
                self._window_waiters.wake(stream.stream_id)
        elif isinstance(event, h2.events.WindowUpdated):
            self._window_waiters.wake(event.stream_id or None)
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            self._window_waiters.wake()
            self.pool.capacity_changed()
        # InformationalResponseReceived (100, 103): not relayed, like the HTTP/1.1 client.
        # GOAWAY never reaches h2 (_without_goaway).

    def _without_goaway(self, data: bytes) -> bytes:
        """`data` as whole frames without GOAWAY, which is handled here (h2frames.py)."""
        frames, goaways, self._partial = split_goaway(
            self._partial + data if self._partial else data
        )
        for last in goaways:
            self._goaway(last)
        return frames

    def _goaway(self, last: int) -> None:
        """The upstream takes no new stream: the ones above its `last` stream id were never
        processed (sent again elsewhere, `_Unprocessed`); the others finish."""
        self.gone = True
        for stream in list(self.streams.values()):
            if stream.stream_id > last and not stream.ended:
                stream.fail(_Unprocessed("upstream went away (GOAWAY) before the stream"))
        self.pool.discard(self)
        if not self.streams and self.transport is not None:
            self.transport.close()

    def _broken(self, exc: UpstreamError) -> None:
        self.gone = True
        for stream in list(self.streams.values()):
            stream.fail(exc)
        self.pool.discard(self)
        if self.transport is not None:
            self.transport.abort()

    # ------------------------------------------------------------------- one exchange

    async def exchange(
        self,
        method: str,
        target: str,
        fields: list[tuple[bytes, bytes]],
        body: AsyncIterable[bytes] | None,
        timeout: float,
    ) -> H2Reply:
        h2c = self._h2
        stream_id = h2c.get_next_available_stream_id()
        stream = _Stream(self, stream_id, timeout)
        self.streams[stream_id] = stream
        try:
            h2c.send_headers(stream_id, fields, end_stream=body is None)
        except h2.exceptions.ProtocolError as exc:
            self.streams.pop(stream_id, None)
            raise InvalidRequestHead(
                f"request head refused by HTTP/2: {short_error(exc)}"
            ) from None
        self._arm()
        if body is not None:
            stream.upload = self.loop.create_task(self._upload(stream, body))
        # Flushed on the next turn of the loop, after the upload task's first step: a body
        # already at hand (a unary gRPC call's one message) leaves in the same write as the
        # HEADERS, one send instead of two; so do the other streams' frames of this turn.
        self._flush_later()
        try:
            raw = await stream.head
        except BaseException:
            self.release(stream)
            raise
        status = 0
        headers: CIMultiDict[str] = CIMultiDict()
        for name, value in raw:
            if name == b":status":
                status = int(value) if value.isdigit() else 0
            elif not name.startswith(b":"):
                headers.add(_decode(name), _decode(value))
        if not 200 <= status <= 599:
            self.release(stream)
            raise UpstreamProtocolError(f"upstream sent status {status!r}")
        return H2Reply(stream, status, CIMultiDictProxy(headers))

    async def _upload(self, stream: _Stream, body: AsyncIterable[bytes]) -> None:
        """Stream the client's body upstream, concurrently with the response."""
        chunks = body.__aiter__()
        h2c, stream_id = self._h2, stream.stream_id
        while True:
            stream.awaiting_client = True
            try:
                chunk = await chunks.__anext__()
            except StopAsyncIteration:
                break
            except Exception as exc:
                err = RequestBodyError(f"reading the client's body failed: {short_error(exc)}")
                err.__cause__ = exc  # the adapter tells a client gone from one gone quiet
                stream.fail(err)
                self.reset(stream, ErrorCodes.CANCEL)
                return
            finally:
                stream.awaiting_client = False
            stream.last = self.loop.time()
            offset = 0
            while offset < len(chunk):
                if stream.error is not None or stream.released or self.transport is None:
                    return
                try:
                    window = h2c.local_flow_control_window(stream_id)
                except h2.exceptions.ProtocolError:
                    return  # the upstream closed the stream; the response side says why
                n = min(window, h2c.max_outbound_frame_size, len(chunk) - offset)
                if n <= 0:
                    await self._window(stream_id)
                    continue
                h2c.send_data(stream_id, chunk[offset : offset + n])
                offset += n
                self._flush_later()
                if self._write_paused:
                    self._flush()
                    try:
                        await self._writable()
                    except ConnectionError:
                        return
        if stream.error is None and not stream.released and self.transport is not None:
            try:
                h2c.end_stream(stream_id)
            except h2.exceptions.ProtocolError:
                return  # already closed by the upstream (it answered before the end)
            self._flush_later()

    def acknowledge(self, stream_id: int, size: int) -> None:
        if size <= 0 or self.transport is None:
            return
        try:
            self._h2.acknowledge_received_data(size, stream_id)
        except h2.exceptions.ProtocolError:
            return
        self._flush_later()

    def reset(self, stream: _Stream, code: ErrorCodes) -> None:
        if self.transport is None:
            return
        try:
            self._h2.reset_stream(stream.stream_id, code)
        except h2.exceptions.ProtocolError:
            return  # closed both ways already
        self._flush_later()

    def release(self, stream: _Stream) -> None:
        """The adapter is done with the exchange; an unfinished stream is reset (CANCEL)."""
        if stream.released:
            return
        stream.released = True
        upload = stream.upload
        uploading = upload is not None and not upload.done()
        if upload is not None and uploading:
            upload.cancel()
        if not stream.ended or stream.error is not None or uploading:
            # Abandoned (or answered before the body was all sent): the upstream stops too.
            self.reset(stream, ErrorCodes.CANCEL)
        unread = sum(n for _, n in stream.chunks)
        stream.chunks.clear()
        if unread:
            self.acknowledge(stream.stream_id, unread)
        self.streams.pop(stream.stream_id, None)
        self._window_waiters.forget(stream.stream_id)
        if not self.streams:
            self.idle_since = self.loop.time()
            if self.gone and self.transport is not None:
                self._flush()
                self.transport.close()
        self.pool.capacity_changed()

    async def _window(self, stream_id: int) -> None:
        self._flush()
        await self._window_waiters.wait(stream_id)

    async def _writable(self) -> None:
        if not self._write_paused:
            return
        waiter = self.loop.create_future()
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

    def _flush_later(self) -> None:
        if self._flush_soon is None:
            self._flush_soon = self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        if self._flush_soon is not None:
            self._flush_soon.cancel()
            self._flush_soon = None
        data = self._h2.data_to_send()
        transport = self.transport
        if data and transport is not None and not transport.is_closing():
            transport.write(data)

    # ------------------------------------------------------------------- silence

    def _limit(self, stream: _Stream) -> float:
        """How long the upstream may be silent on `stream` now: before the head, or within
        the body (the same two settings as the HTTP/1.1 client)."""
        return stream.timeout if not stream.head.done() else self.pool.stream_idle_timeout

    def _arm(self) -> None:
        if self._timer is None and self.streams:
            # One coarse timer per connection, not one per stream: a stream times out within
            # a quarter of its limit after it is due.
            soonest = min(self._limit(s) for s in self.streams.values())
            self._timer = self.loop.call_later(max(soonest / 4, 0.05), self._on_tick)

    def _on_tick(self) -> None:
        """Fail the streams whose upstream has been silent for longer than their timeout."""
        self._timer = None
        now = self.loop.time()
        for stream in list(self.streams.values()):
            if stream.ended or stream.paused or stream.released:
                continue
            if stream.awaiting_client:
                stream.last = now  # the client's silence, not the upstream's
                continue
            limit = self._limit(stream)
            if now - stream.last > limit:
                if not stream.head.done():
                    why = f"upstream sent nothing for {limit:g} s (upstream.timeout)"
                else:
                    why = (
                        f"upstream sent nothing for {limit:g} s mid-body "
                        "(upstream.stream_idle_timeout)"
                    )
                stream.fail(UpstreamTimeout(why))
                self.reset(stream, ErrorCodes.CANCEL)
        self._arm()

    def close(self) -> None:
        """No new streams on this connection: GOAWAY, and close once the open ones end."""
        self.gone = True
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        self._flush()
        if not self.streams:
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self._h2.close_connection(ErrorCodes.NO_ERROR)
            self._flush()
            transport.close()
            return
        # A frame of our own: h2's close_connection() would stop the open streams too.
        frame = GoAwayFrame(0)
        frame.last_stream_id = 0  # the broker accepts no streams from the upstream
        frame.error_code = ErrorCodes.NO_ERROR
        transport.write(frame.serialize())


def _code_name(code: object) -> str:
    try:
        return ErrorCodes(cast(int, code)).name
    except (ValueError, TypeError):
        return str(code)


class H2UpstreamPool:
    """HTTP/2 connections to one origin (an `UpstreamClient`), HTTP/1.1 if it declines."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        authority: str,
        ssl_context: ssl.SSLContext | None,
        connect_timeout: float,
        read_timeout: float,
        stream_idle_timeout: float,
        limit: int,
        http1: UpstreamPool,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self._host = host
        self._port = port
        self._scheme = b"https" if ssl_context is not None else b"http"
        self._authority = _encode(authority)
        self._ssl = ssl_context
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.stream_idle_timeout = stream_idle_timeout
        self.limit = limit
        self.http1 = http1
        # Set once the upstream answered ALPN without h2: HTTP/1.1 from then on.
        self.http1_only = False
        self._conns: list[_H2Upstream] = []
        self._connecting: asyncio.Task[_H2Upstream | None] | None = None
        self._capacity_waiters: list[asyncio.Future[None]] = []
        self._sweeper: asyncio.TimerHandle | None = None
        self._closed = False
        self.opened = 0  # connections opened, for tests

    async def request(
        self,
        method: str,
        target: str,
        headers: Iterable[tuple[str, str]],
        body: AsyncIterable[bytes] | None,
        content_length: int | None,
    ) -> UpstreamReply:
        if self.http1_only:
            return await self.http1.request(method, target, headers, body, content_length)
        fields, timeout = self._fields(method, target, headers, content_length)
        conn = await self._connection()
        if conn is None:
            return await self.http1.request(method, target, headers, body, content_length)
        try:
            return await conn.exchange(method, target, fields, body, timeout)
        except _Unprocessed:
            if body is not None:
                raise  # a streamed body cannot be sent again
            # Never processed upstream (it was closing the connection, or refused the
            # stream): once more, on a connection that takes it.
            conn = await self._connection()
            if conn is None:
                return await self.http1.request(method, target, headers, body, content_length)
            return await conn.exchange(method, target, fields, body, timeout)

    def _fields(
        self,
        method: str,
        target: str,
        headers: Iterable[tuple[str, str]],
        content_length: int | None,
    ) -> tuple[list[tuple[bytes, bytes]], float]:
        fields = [
            (b":method", _encode(method)),
            (b":scheme", self._scheme),
            (b":authority", self._authority),
            (b":path", _encode(target)),
        ]
        if any(c in method or c in target for c in _FORBIDDEN):
            raise InvalidRequestHead("request line contains CR, LF or NUL")
        timeout = self.read_timeout
        for name, value in headers:
            if any(c in name or c in value for c in _FORBIDDEN):
                raise InvalidRequestHead("request header contains CR, LF or NUL")
            lower = name.lower()
            if lower == "grpc-timeout":
                allowed = grpc_timeout(value)
                if allowed is not None:
                    timeout = max(timeout, allowed + GRPC_DEADLINE_GRACE_SECONDS)
            fields.append((_encode(lower), _encode(value)))
        if content_length is not None:
            fields.append((b"content-length", str(content_length).encode()))
        # The broker takes trailers (RFC 9113 8.2.2: the only TE allowed); gRPC servers
        # require it of a client.
        fields.append((b"te", b"trailers"))
        return fields, timeout

    async def _connection(self) -> _H2Upstream | None:
        """A connection with room for one more stream; None when the upstream chose
        HTTP/1.1 by ALPN."""
        while True:
            if self.http1_only:
                return None
            best: _H2Upstream | None = None
            for conn in self._conns:
                if conn.capacity > 0 and (best is None or conn.capacity > best.capacity):
                    best = conn
            if best is not None:
                return best
            if len(self._conns) >= self.limit and self._connecting is None:
                waiter = self.loop.create_future()
                self._capacity_waiters.append(waiter)
                try:
                    async with asyncio.timeout(self.read_timeout):
                        await waiter
                except TimeoutError:
                    raise UpstreamTimeout(
                        f"every upstream connection ({self.limit}) was at its stream limit "
                        f"for {self.read_timeout:g} s (upstream.timeout)"
                    ) from None
                continue
            if self._connecting is None:
                self._connecting = self.loop.create_task(self._connect())
                self._connecting.add_done_callback(self._connected)
            conn_or_none = await asyncio.shield(self._connecting)
            if conn_or_none is None:
                return None

    def _connected(self, task: asyncio.Task[_H2Upstream | None]) -> None:
        if self._connecting is task:
            self._connecting = None
        if not task.cancelled():
            task.exception()  # retrieved: every waiter got it through the shield
        self.capacity_changed()

    async def _connect(self) -> _H2Upstream | None:
        transport, reads = await open_buffered(
            self.loop,
            lambda: _H2Upstream(self),
            self._host,
            self._port,
            tls=self._ssl,
            timeout=self.connect_timeout,
        )
        conn = cast(_H2Upstream, reads.protocol)
        if conn.alpn_refused:
            # One TLS handshake spent to learn it; the HTTP/1.1 pool opens its own.
            log.info(
                "upstream %s:%s did not choose h2 by ALPN: using HTTP/1.1",
                self._host, self._port,
            )  # fmt: skip
            self.http1_only = True
            transport.close()
            return None
        if self._closed:
            conn.close()
            raise UpstreamConnectError("the broker is stopping")
        self.opened += 1
        self._conns.append(conn)
        if self._sweeper is None:
            self._sweeper = self.loop.call_later(IDLE_TIMEOUT_SECONDS, self._sweep)
        return conn

    def discard(self, conn: _H2Upstream) -> None:
        if conn in self._conns:
            self._conns.remove(conn)
        self.capacity_changed()

    def capacity_changed(self) -> None:
        waiters, self._capacity_waiters = self._capacity_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _sweep(self) -> None:
        self._sweeper = None
        oldest = self.loop.time() - IDLE_TIMEOUT_SECONDS
        for conn in list(self._conns):
            if not conn.streams and conn.idle_since <= oldest:
                self._conns.remove(conn)
                conn.close()
        if self._conns and not self._closed:
            self._sweeper = self.loop.call_later(IDLE_TIMEOUT_SECONDS / 2, self._sweep)

    async def close(self) -> None:
        """Close idle connections (GOAWAY); busy ones close when their last stream ends."""
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        conns, self._conns = self._conns, []
        for conn in conns:
            conn.close()
        await self.http1.close()
