"""The HTTP adapter's upstream client against real loopback servers.

Two kinds of upstream: an aiohttp server for well-behaved HTTP/1.1, and a raw asyncio server
whose replies each test scripts byte for byte, for the misbehaving ones (closing idle
connections, oversized heads, silence, cut bodies).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest
from aiohttp import web

from adapters.http import upstream as http_upstream
from adapters.http.upstream import (
    InvalidRequestHead,
    UpstreamConnectError,
    UpstreamPool,
    UpstreamProtocolError,
    UpstreamResponse,
)
from broker.errors import UpstreamTimeout
from tests.loops import Run
from tests.servers import free_port
from tests.test_http_adapter import (  # the adapter's end-to-end fixtures
    Env,
    call,
    env,  # noqa: F401
    http_service,
    upstream,  # noqa: F401
)

DEADLINE_SECONDS = 20.0
BIG_BODY_BYTES = 50 * 1024 * 1024
BLOCK_BYTES = 64 * 1024
# Far below the 50 MB body: a client that buffered a whole body would exceed it.
MEMORY_BOUND_BYTES = 8 * 1024 * 1024
# Short enough for a quick test, long enough that a loaded host answers a live upstream.
SHORT_TIMEOUT_SECONDS = 0.3


def blocks(size: int) -> Iterator[bytes]:
    sent, i = 0, 0
    while sent < size:
        block = (hashlib.sha256(i.to_bytes(8, "big")).digest() * (BLOCK_BYTES // 32))[: size - sent]
        sent += len(block)
        i += 1
        yield block


async def agen(size: int) -> AsyncIterator[bytes]:
    for block in blocks(size):
        yield block


# --------------------------------------------------------------------------- upstreams


@dataclass
class AioUpstream:
    """A well-behaved HTTP/1.1 server that records the connection each request came on."""

    peers: list[object] = field(default_factory=list)
    seen_headers: list[dict[str, str]] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    release: asyncio.Event = field(default_factory=asyncio.Event)
    port: int = 0

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        assert request.transport is not None
        self.peers.append(request.transport.get_extra_info("peername"))
        self.seen_headers.append(dict(request.headers))
        if request.path == "/upload":
            digest, size = hashlib.sha256(), 0
            async for chunk in request.content.iter_chunked(BLOCK_BYTES):
                digest.update(chunk)
                size += len(chunk)
            return web.json_response({"sha256": digest.hexdigest(), "size": size})
        if request.path == "/download":
            response = web.StreamResponse()  # no Content-Length: chunked
            await response.prepare(request)
            for block in blocks(int(request.query["size"])):
                await response.write(block)
            await response.write_eof()
            return response
        if request.path == "/hold":
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            await self.release.wait()
            self.in_flight -= 1
        return web.Response(text=f"hello {request.method} {request.raw_path}")


@asynccontextmanager
async def aio_upstream() -> AsyncIterator[AioUpstream]:
    up = AioUpstream()
    runner = web.ServerRunner(web.Server(up.handle, access_log=None))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    up.port = runner.addresses[0][1]
    try:
        yield up
    finally:
        up.release.set()
        await runner.cleanup()


Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


@dataclass
class RawUpstream:
    port: int
    connections: int = 0


@asynccontextmanager
async def raw_upstream(script: Script) -> AsyncIterator[RawUpstream]:
    """A server that runs `script(reader, writer, connection_number)` per connection."""
    up = RawUpstream(0)
    tasks: set[asyncio.Task[None]] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up.connections += 1
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            await script(reader, writer, up.connections)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            tasks.discard(task)
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    up.port = server.sockets[0].getsockname()[1]
    try:
        yield up
    finally:
        server.close()
        for task in list(tasks):
            task.cancel()
        await server.wait_closed()


async def read_head(reader: asyncio.StreamReader) -> bytes:
    return await reader.readuntil(b"\r\n\r\n")


async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, raw: bytes) -> None:
    """Wait for the next request head, then send `raw` as the response."""
    await read_head(reader)
    writer.write(raw)
    await writer.drain()


def make_pool(port: int, *, limit: int = 10, timeout: float = 10.0) -> UpstreamPool:
    return UpstreamPool(
        host="127.0.0.1",
        port=port,
        host_header=f"127.0.0.1:{port}",
        ssl_context=None,
        connect_timeout=5.0,
        read_timeout=timeout,
        limit=limit,
    )


async def fetch(
    pool: UpstreamPool,
    target: str = "/",
    method: str = "GET",
    *,
    headers: list[tuple[str, str]] | None = None,
    body: AsyncIterator[bytes] | None = None,
    content_length: int | None = None,
) -> tuple[UpstreamResponse, bytes]:
    response = await pool.request(method, target, headers or [], body, content_length)
    try:
        chunks = []
        while chunk := await response.read_chunk():
            chunks.append(chunk)
        return response, b"".join(chunks)
    finally:
        response.release()


# --------------------------------------------------------------------------- tests


async def test_sequential_requests_reuse_one_connection() -> None:
    async with aio_upstream() as up:
        pool = make_pool(up.port)
        for i in range(5):
            response, body = await fetch(pool, f"/n?i={i}")
            assert response.status == 200 and body == f"hello GET /n?i={i}".encode()
        await pool.close()
    assert pool.opened == 1
    assert len(set(up.peers)) == 1 and len(up.peers) == 5
    assert up.seen_headers[0]["Host"] == f"127.0.0.1:{up.port}"


def test_upstream_connections_have_nagle_off(run: Run) -> None:
    """One SSE event or a small request body is one small write: with Nagle on it could wait
    for the upstream's delayed ACK. The loops set TCP_NODELAY on every connected socket and
    the pool relies on that, under asyncio and uvloop."""

    async def main() -> None:
        async with aio_upstream() as up:
            pool = make_pool(up.port)
            response, _ = await fetch(pool)
            assert response.status == 200
            [conn] = pool._idle
            assert conn.transport is not None
            sock = conn.transport.get_extra_info("socket")
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
            await pool.close()

    run(main())


SWITCHED = (
    b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
    b"Sec-WebSocket-Accept: x\r\n\r\n"
)


async def test_an_upgrade_hands_over_the_connection_with_what_followed_the_101() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _n: int) -> None:
        head = await read_head(reader)
        assert b"Connection: Upgrade\r\n" in head and b"Upgrade: websocket\r\n" in head
        writer.write(SWITCHED + b"first frame")  # the new protocol's bytes right behind it
        await writer.drain()
        assert await reader.readexactly(5) == b"hello"
        writer.write(b"second")
        await writer.drain()

    async with raw_upstream(script) as up:
        pool = make_pool(up.port)
        response = await pool.upgrade("GET", "/ws", [("Sec-WebSocket-Key", "k")], "websocket")
        assert response.status == 101
        await asyncio.sleep(0)  # let any later read land before the take-over
        transport, tail = response.take_over()
        assert tail == b"first frame"
        got: asyncio.Queue[bytes] = asyncio.Queue()

        class Collect(asyncio.Protocol):
            def data_received(self, data: bytes) -> None:
                got.put_nowait(data)

        transport.set_protocol(Collect())
        transport.write(b"hello")
        assert await asyncio.wait_for(got.get(), DEADLINE_SECONDS) == b"second"
        transport.close()
        response.release()
        assert pool.busy == 0 and pool.idle == 0  # never pooled again
        await pool.close()


@pytest.mark.parametrize("upgrade", [False, True])
async def test_a_101_nobody_asked_for_or_without_upgrade_is_a_protocol_error(
    upgrade: bool,
) -> None:
    reply = SWITCHED if not upgrade else b"HTTP/1.1 101 Switching Protocols\r\n\r\n"

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _n: int) -> None:
        await answer(reader, writer, reply)

    async with raw_upstream(script) as up:
        pool = make_pool(up.port)
        why = "101 without an Upgrade header" if upgrade else "switched protocols unasked"
        with pytest.raises(UpstreamProtocolError, match=why):
            if upgrade:
                await pool.upgrade("GET", "/ws", [], "websocket")
            else:
                await pool.request("GET", "/", [], None, None)
        assert pool.busy == 0
        await pool.close()


async def test_pool_never_opens_more_than_its_limit() -> None:
    async with aio_upstream() as up:
        pool = make_pool(up.port, limit=2)
        calls = [asyncio.create_task(fetch(pool, "/hold")) for _ in range(5)]
        await asyncio.sleep(0.3)
        assert up.in_flight == 2
        up.release.set()
        results = await asyncio.wait_for(asyncio.gather(*calls), DEADLINE_SECONDS)
        await pool.close()
    assert [r.status for r, _ in results] == [200] * 5
    assert up.max_in_flight == 2 and pool.opened == 2 and pool.busy == 0


async def test_connection_closed_by_upstream_while_idle_is_discarded() -> None:
    async def once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await answer(reader, writer, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        # Keep-alive promised, then closed while idle (an upstream keep-alive timeout).

    async with raw_upstream(once) as up:
        pool = make_pool(up.port)
        await fetch(pool)
        for _ in range(100):
            if pool.idle == 0:
                break
            await asyncio.sleep(0.02)
        assert pool.idle == 0
        response, body = await fetch(pool)
        await pool.close()
    assert response.status == 200 and body == b"ok"
    assert up.connections == 2


@pytest.mark.parametrize("with_body", [False, True])
async def test_reused_connection_closed_on_request_is_retried_only_without_body(
    with_body: bool,
) -> None:
    async def race(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await answer(reader, writer, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        # The next request arrives as the upstream gives up on the connection: it closes
        # without a response byte, the race a keep-alive client cannot avoid.
        await read_head(reader)
        writer.transport.abort()

    async with raw_upstream(race) as up:
        pool = make_pool(up.port)
        await fetch(pool)
        if with_body:
            with pytest.raises(UpstreamProtocolError):
                await fetch(pool, "/", "POST", body=agen(10), content_length=10)
        else:
            response, body = await fetch(pool)
            assert response.status == 200 and body == b"ok"
        await pool.close()
    assert up.connections == (1 if with_body else 2)
    assert pool.busy == 0


async def test_idle_connections_are_closed_after_the_idle_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(http_upstream, "IDLE_TIMEOUT_SECONDS", 0.2)
    async with aio_upstream() as up:
        pool = make_pool(up.port)
        await fetch(pool)
        assert pool.idle == 1
        await asyncio.sleep(0.5)
        assert pool.idle == 0
        await fetch(pool)
        await pool.close()
    assert pool.opened == 2


async def test_content_length_and_chunked_uploads_and_responses() -> None:
    size = 3 * 1024 * 1024 + 7
    expected = {"sha256": hashlib.sha256(b"".join(blocks(size))).hexdigest(), "size": size}
    async with aio_upstream() as up:
        pool = make_pool(up.port)
        response, body = await fetch(pool, "/upload", "PUT", body=agen(size), content_length=size)
        assert response.headers["Content-Length"] == str(len(body))
        assert up.seen_headers[-1]["Content-Length"] == str(size)
        assert "Transfer-Encoding" not in up.seen_headers[-1]
        assert json.loads(body) == expected
        response, body = await fetch(pool, "/upload", "POST", body=agen(size))
        assert up.seen_headers[-1]["Transfer-Encoding"] == "chunked"
        assert json.loads(body) == expected
        response, body = await fetch(pool, f"/download?size={size}")
        assert response.headers["Transfer-Encoding"] == "chunked"
        assert body == b"".join(blocks(size))
        await pool.close()
    assert pool.opened == 1


async def test_a_body_that_came_with_its_head_is_read_at_once_and_the_rest_streams() -> None:
    go_on = asyncio.Event()

    async def two_responses(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int
    ) -> None:
        await answer(reader, writer, b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nsmall")
        await answer(reader, writer, b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nfirst")
        await go_on.wait()
        writer.write(b"-rest")
        await writer.drain()
        await asyncio.sleep(DEADLINE_SECONDS)

    async with raw_upstream(two_responses) as up:
        pool = make_pool(up.port)
        response = await pool.request("GET", "/", [], None, None)
        assert response.read_buffered() == b"small"
        response.release()
        assert pool.idle == 1, "a body read whole leaves the connection reusable"

        response = await pool.request("GET", "/", [], None, None)
        assert response.read_buffered() is None, "half the body is not the whole body"
        assert await response.read_chunk() == b"first"
        go_on.set()
        assert await response.read_chunk() == b"-rest"
        assert await response.read_chunk() == b""
        response.release()
        await pool.close()
    assert up.connections == 1


async def test_head_204_and_304_have_no_body_and_keep_the_connection() -> None:
    replies = {
        b"HEAD": b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n",
        b"GET /204": b"HTTP/1.1 204 No Content\r\n\r\n",
        b"GET /304": b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n",
        b"GET /103": b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc",
    }

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while True:
            head = await read_head(reader)
            key = head.split(b" HTTP/", 1)[0].removesuffix(b" /")
            writer.write(replies[key])
            await writer.drain()

    async with raw_upstream(serve) as up:
        pool = make_pool(up.port)
        for method, target, status, expected in [
            ("HEAD", "/", 200, b""),
            ("GET", "/204", 204, b""),
            ("GET", "/304", 304, b""),
            ("GET", "/103", 200, b"abc"),
            ("HEAD", "/", 200, b""),
        ]:
            response, body = await fetch(pool, target, method)
            assert (response.status, body) == (status, expected)
        await pool.close()
    assert up.connections == 1


async def test_oversized_response_head_is_a_protocol_error() -> None:
    field_value = b"a" * 4000  # each field under aiohttp's 8190-byte line limit
    head = b"".join(b"X-Big-%d: %s\r\n" % (i, field_value) for i in range(20))

    async def big(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await answer(reader, writer, b"HTTP/1.1 200 OK\r\n" + head + b"Content-Length: 0\r\n\r\n")
        await reader.read()

    async with raw_upstream(big) as up:
        pool = make_pool(up.port)
        with pytest.raises(UpstreamProtocolError, match="exceeds 65536 bytes"):
            await fetch(pool)
        await pool.close()


async def test_silent_upstream_times_out_before_and_during_the_body() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_head(reader)
        if n == 2:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nfirst")
            await writer.drain()
        await asyncio.sleep(DEADLINE_SECONDS)

    async with raw_upstream(silent) as up:
        pool = make_pool(up.port, timeout=SHORT_TIMEOUT_SECONDS)
        started = asyncio.get_running_loop().time()
        with pytest.raises(UpstreamTimeout):
            await fetch(pool)
        response = await pool.request("GET", "/", [], None, None)
        assert response.status == 200
        assert await response.read_chunk() == b"first"
        with pytest.raises(UpstreamTimeout):
            await response.read_chunk()
        response.release()
        elapsed = asyncio.get_running_loop().time() - started
        await pool.close()
    assert elapsed < 5
    assert pool.idle == 0 and pool.busy == 0


async def test_a_reused_connection_that_goes_silent_times_out() -> None:
    """The silence timer outlives an exchange on a pooled connection: the first request's
    timer must still catch the second request's silence, however they interleave."""

    async def once_then_silent(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int
    ) -> None:
        await answer(reader, writer, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await read_head(reader)
        await asyncio.sleep(DEADLINE_SECONDS)

    async with raw_upstream(once_then_silent) as up:
        pool = make_pool(up.port, timeout=SHORT_TIMEOUT_SECONDS)
        _, body = await fetch(pool)
        assert body == b"ok"
        # Half the timeout later: the first exchange's timer fires mid-way through the second.
        await asyncio.sleep(SHORT_TIMEOUT_SECONDS / 2)
        started = asyncio.get_running_loop().time()
        with pytest.raises(UpstreamTimeout):
            await fetch(pool)
        elapsed = asyncio.get_running_loop().time() - started
        await pool.close()
    assert up.connections == 1, "the second request reused the first connection"
    assert SHORT_TIMEOUT_SECONDS * 0.9 <= elapsed < 5


async def test_response_cut_mid_body_is_a_protocol_error() -> None:
    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await answer(reader, writer, b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10)
        writer.transport.abort()

    async with raw_upstream(cut) as up:
        pool = make_pool(up.port)
        response = await pool.request("GET", "/", [], None, None)
        assert await response.read_chunk() == b"x" * 10
        with pytest.raises(UpstreamProtocolError, match="mid-body"):
            await response.read_chunk()
        response.release()
        await pool.close()
    assert pool.idle == 0


async def test_refused_connection_is_a_connect_error() -> None:
    pool = make_pool(free_port(), limit=1)
    for _ in range(3):  # a failed connect gives its slot back
        with pytest.raises(UpstreamConnectError):
            await fetch(pool)
    await pool.close()
    assert pool.busy == 0


@pytest.mark.parametrize(
    "headers", [[("X-Evil", "a\r\nX-Injected: 1")], [("X-Evil", "a\nb")], [("X-Nul", "a\0")]]
)
async def test_cr_lf_and_nul_never_reach_the_wire(headers: list[tuple[str, str]]) -> None:
    async with aio_upstream() as up:
        pool = make_pool(up.port)
        with pytest.raises(InvalidRequestHead):
            await pool.request("GET", "/", headers, None, None)
        with pytest.raises(InvalidRequestHead):
            await pool.request("GET", "/x\r\nX-Injected: 1", [], None, None)
        await pool.close()
    assert up.peers == [] and pool.opened == 0


async def test_50mb_streams_both_ways_with_bounded_memory() -> None:
    async with aio_upstream() as up:
        pool = make_pool(up.port)
        tracemalloc.start()
        try:
            tracemalloc.reset_peak()
            response, body = await fetch(pool, "/upload", "POST", body=agen(BIG_BODY_BYTES))
            assert response.status == 200 and b'"size": 52428800' in body
            upload_peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.reset_peak()
            response = await pool.request("GET", f"/download?size={BIG_BODY_BYTES}", [], None, None)
            size = 0
            try:
                while chunk := await response.read_chunk():
                    size += len(chunk)
                    if size < 2 * 1024 * 1024:
                        # A slow client: the upstream socket is paused, not buffered.
                        await asyncio.sleep(0.01)
            finally:
                response.release()
            download_peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        await pool.close()
    assert size == BIG_BODY_BYTES
    # Upstream and client both run in this process: the bound covers both.
    assert upload_peak < MEMORY_BOUND_BYTES, upload_peak
    assert download_peak < MEMORY_BOUND_BYTES, download_peak


async def test_slow_reader_pauses_the_upstream_socket() -> None:
    async with aio_upstream() as up:
        pool = make_pool(up.port, timeout=SHORT_TIMEOUT_SECONDS)
        response = await pool.request("GET", f"/download?size={BIG_BODY_BYTES}", [], None, None)
        try:
            await response.read_chunk()
            # Longer than the silence timeout: our own pause must not count as silence.
            await asyncio.sleep(3 * SHORT_TIMEOUT_SECONDS)
            conn = response._conn
            assert conn._reading_paused
            assert response._payload._size <= 2 * http_upstream.READ_BUFFER_BYTES + BLOCK_BYTES
            size = 0
            while chunk := await response.read_chunk():
                size += len(chunk)
        finally:
            response.release()
        await pool.close()
    assert size > BIG_BODY_BYTES - 2 * 1024 * 1024


async def test_close_while_busy_closes_the_connection_when_the_exchange_ends() -> None:
    async with aio_upstream() as up:
        pool = make_pool(up.port)
        call = asyncio.create_task(fetch(pool, "/hold"))
        while up.in_flight == 0:
            await asyncio.sleep(0.01)
        await pool.close()
        up.release.set()
        response, _ = await asyncio.wait_for(call, DEADLINE_SECONDS)
    assert response.status == 200
    assert pool.idle == 0 and pool.busy == 0
    assert response._conn.transport is None or response._conn.transport.is_closing()


async def test_oversized_response_head_through_the_adapter_is_502(env: Env) -> None:  # noqa: F811
    async def big(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_head(reader)
        fields = b"".join(b"X-Big-%d: %s\r\n" % (i, b"a" * 4000) for i in range(20))
        writer.write(b"HTTP/1.1 200 OK\r\n" + fields + b"Content-Length: 0\r\n\r\n")
        await writer.drain()
        await reader.read()

    async with raw_upstream(big) as up:
        service = http_service(f"http://127.0.0.1:{up.port}", env.kv.path)
        async with env.proxy(service) as p:
            reply = await call(env.client(), f"{p.url}/x")
            assert p.upstream_errors("protocol") == 1
            [event] = p.events("request")
    assert reply.status == 502, reply
    assert event["status"] == 502 and "exceeds 65536 bytes" in event["error"]
