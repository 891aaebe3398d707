"""Streaming through the HTTP adapter: server-sent events, quiet streams, slow readers.

The upstream here is a real aiohttp server that streams server-sent events, either on a clock
(one event every `interval` seconds) or in lock step with the test: it sends event i+1 only once
the client has received event i. Lock step proves each event is forwarded when it is sent (a
broker that held the body back until the end would never let the stream advance) without a
timing assert; the clocked stream shows the arrival times spread over the stream's life.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest
from aiohttp import web

from tests.pki import Pki
from tests.servers import OpenBao
from tests.test_http_adapter import (  # the adapter's end-to-end helpers
    DEADLINE_SECONDS,
    Env,
    Upstream,
    curl_tls,
    http_service,
    new_secret,
)

EVENTS = 10
INTERVAL_SECONDS = 0.1


@dataclass
class EventSource:
    """An SSE upstream that insists on the injected token, and records when it sent what."""

    token: str
    # Lock step: the test sets `received[i]` when the client has event i.
    received: dict[int, asyncio.Event] = field(default_factory=dict)
    sent_at: list[float] = field(default_factory=list)
    url: str = ""
    runner: web.AppRunner | None = None

    def got(self, i: int) -> None:
        self.received.setdefault(i, asyncio.Event()).set()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return web.Response(status=401, text="upstream: missing or wrong token")
        count = int(request.query.get("n", EVENTS))
        interval = float(request.query.get("interval", INTERVAL_SECONDS))
        gap = float(request.query.get("gap", 0))
        lockstep = request.query.get("lockstep") == "1"
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        for i in range(count):
            if i and lockstep:
                waiter = self.received.setdefault(i - 1, asyncio.Event())
                await asyncio.wait_for(waiter.wait(), DEADLINE_SECONDS)
            elif i:
                await asyncio.sleep(gap if gap and i == count - 1 else interval)
            self.sent_at.append(time.monotonic())
            await response.write(f"id: {i}\ndata: event {i}\n\n".encode())
        await response.write_eof()
        return response

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/events", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]

    async def stop(self) -> None:
        for waiter in self.received.values():
            waiter.set()
        if self.runner is not None:
            await self.runner.cleanup()


@pytest.fixture
def env(tmp_path: Path, pki: Pki, openbao: OpenBao, monkeypatch: pytest.MonkeyPatch) -> Env:
    """The adapter tests' Env with a KV secret; each test starts its own streaming upstream."""
    unused = Upstream()  # only its token set is used, by new_secret
    return Env(tmp_path, pki, openbao, monkeypatch, unused, new_secret(openbao, unused))


@asynccontextmanager
async def event_source(env: Env) -> AsyncIterator[EventSource]:
    source = EventSource(env.kv.token)
    await source.start()
    try:
        yield source
    finally:
        await source.stop()


def sse_service(env: Env, source: EventSource, **upstream_extra: Any) -> dict[str, Any]:
    return http_service(source.url, env.kv.path, upstream_extra=upstream_extra)


def event_number(line: str) -> int | None:
    """The event number of a ``data: event N`` line, else None."""
    if line.startswith("data: event "):
        return int(line.removeprefix("data: event ").strip())
    return None


async def aiohttp_events(
    env: Env, url: str, on_event: Callable[[int], None]
) -> tuple[int, list[int], str | None]:
    """Read an SSE stream with aiohttp line by line: (status, event numbers, error)."""
    got: list[int] = []
    connector = aiohttp.TCPConnector(ssl=env.client())
    timeout = aiohttp.ClientTimeout(total=DEADLINE_SECONDS)
    async with (
        aiohttp.ClientSession(connector=connector, timeout=timeout) as session,
        session.get(url) as resp,
    ):
        try:
            while line := await resp.content.readline():
                n = event_number(line.decode())
                if n is not None:
                    got.append(n)
                    on_event(n)
        except aiohttp.ClientPayloadError as exc:
            return resp.status, got, repr(exc)
        return resp.status, got, None


# --------------------------------------------------------------------------- quiet streams


async def test_a_quiet_stream_outlives_the_head_timeout(env: Env) -> None:
    # The bug, scaled down: an SSE stream with a gap longer than upstream.timeout was
    # cut ("upstream sent nothing for 60 s"). The head timeout is 1 s here and the gap 2.5 s:
    # only stream_idle_timeout applies once the body has started.
    async with event_source(env) as source:
        service = sse_service(env, source, timeout=1.0, stream_idle_timeout=30)
        async with env.proxy(service) as p:
            status, got, error = await aiohttp_events(
                env, f"{p.url}/events?n=3&interval=0&gap=2.5", lambda _: None
            )
    assert (status, got, error) == (200, [0, 1, 2], None)
    [event] = p.events("request")
    assert event["status"] == 200 and "error" not in event


async def test_a_stream_quiet_past_stream_idle_timeout_is_cut_and_audited(env: Env) -> None:
    async with event_source(env) as source:
        service = sse_service(env, source, timeout=30, stream_idle_timeout=0.5)
        async with env.proxy(service) as p:
            status, got, error = await aiohttp_events(
                env, f"{p.url}/events?n=3&interval=0&gap=3", lambda _: None
            )
    # The head is out, so no error status can follow: the connection is cut mid-body.
    assert status == 200 and got == [0, 1] and error is not None
    [event] = p.events("request")
    assert "stream_idle_timeout" in event["error"]
    assert p.upstream_errors("timeout") == 1


# --------------------------------------------------------------------------- events as sent


async def test_sse_events_arrive_spread_over_the_stream_not_at_its_end(env: Env) -> None:
    arrived: list[float] = []
    async with event_source(env) as source, env.proxy(sse_service(env, source)) as p:
        status, got, error = await aiohttp_events(
            env, f"{p.url}/events", lambda _: arrived.append(time.monotonic())
        )
        sent = source.sent_at
    assert (status, got, error) == (200, list(range(EVENTS)), None)
    # The upstream spaced its events 100 ms apart. A broker that buffered the body would
    # deliver every event after the last was sent; here the first half arrived before it
    # (event 4 had 500 ms to arrive: room for a loaded box, none for buffering).
    assert all(t < sent[-1] for t in arrived[: EVENTS // 2]), (arrived, sent)
    assert all(a >= s for a, s in zip(arrived, sent, strict=True))


async def test_aiohttp_gets_each_event_before_the_next_is_sent(env: Env) -> None:
    async with event_source(env) as source, env.proxy(sse_service(env, source)) as p:
        status, got, error = await aiohttp_events(env, f"{p.url}/events?lockstep=1", source.got)
    assert (status, got, error) == (200, list(range(EVENTS)), None)


async def test_httpx_streaming_gets_each_event_before_the_next_is_sent(env: Env) -> None:
    got: list[int] = []
    async with (
        event_source(env) as source,
        env.proxy(sse_service(env, source)) as p,
        httpx.AsyncClient(verify=env.client(), timeout=DEADLINE_SECONDS) as client,
        client.stream("GET", f"{p.url}/events?lockstep=1") as resp,
    ):
        assert resp.status_code == 200
        assert resp.headers["content-type"] == "text/event-stream"
        async for line in resp.aiter_lines():
            n = event_number(line)
            if n is not None:
                got.append(n)
                source.got(n)
    assert got == list(range(EVENTS))


async def test_curl_no_buffer_gets_each_event_before_the_next_is_sent(env: Env) -> None:
    got: list[int] = []
    async with event_source(env) as source, env.proxy(sse_service(env, source)) as p:
        proc = await asyncio.create_subprocess_exec(
            "curl", "-sS", "-N", *curl_tls(env.pki, env.pki.client()),
            f"{p.url}/events?lockstep=1",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert proc.stdout is not None
        try:
            async with asyncio.timeout(DEADLINE_SECONDS):
                while line := await proc.stdout.readline():
                    n = event_number(line.decode())
                    if n is not None:
                        got.append(n)
                        source.got(n)
                rc = await proc.wait()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    assert rc == 0
    assert got == list(range(EVENTS))


# --------------------------------------------------------------------------- back-pressure


# A whole body is 1 GB; a hop that stopped reading holds at most its buffers, and the
# kernel's socket buffers (loopback autotuning: a few MB each way per socket) hold the rest.
ENDLESS_BYTES = 1024**3
# Four sockets' buffers and the broker's own: a hop that kept reading would pass it in a
# second on loopback.
STALLED_BOUND_BYTES = 64 * 1024 * 1024
# The slow reader takes 1 KB per second, as the issue measures it.
SLOW_READ_BYTES = 1024
# The stream counts as stopped once it grew by less than this in one poll window.
STALL_GROWTH_BYTES = 256 * 1024
STALL_WINDOW_SECONDS = 1.0


@dataclass
class Firehose:
    """An upstream that sends (GET /down) or takes (POST /up) a 1 GB body, counting bytes;
    POST /up reads only SLOW_READ_BYTES a second."""

    token: str
    moved: int = 0
    url: str = ""
    runner: web.AppRunner | None = None
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def down(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return web.Response(status=401)
        response = web.StreamResponse()
        response.content_length = ENDLESS_BYTES
        await response.prepare(request)
        block = b"x" * 65536
        while self.moved < ENDLESS_BYTES and not self.stop.is_set():
            await response.write(block)  # waits while the broker does not read
            self.moved += len(block)
        return response

    async def up(self, request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return web.Response(status=401)
        while not self.stop.is_set():
            chunk = await request.content.read(SLOW_READ_BYTES)
            if not chunk:
                break
            await asyncio.sleep(1.0)
        return web.Response(text="done")

    async def start(self) -> None:
        app = web.Application(client_max_size=ENDLESS_BYTES)
        app.router.add_get("/down", self.down)
        app.router.add_post("/up", self.up)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]


async def stalls(count: Callable[[], int]) -> int:
    """Poll `count` until it grows by less than STALL_GROWTH_BYTES in a window; return it."""
    deadline = time.monotonic() + DEADLINE_SECONDS
    last = count()
    while time.monotonic() < deadline:
        await asyncio.sleep(STALL_WINDOW_SECONDS)
        now = count()
        if now - last < STALL_GROWTH_BYTES:
            return now
        last = now
    pytest.fail(f"the stream never stopped: {count()} bytes moved")


async def test_a_client_reading_1kb_a_second_stops_the_upstream(env: Env) -> None:
    hose = Firehose(env.kv.token)
    await hose.start()
    try:
        async with env.proxy(http_service(hose.url, env.kv.path)) as p:
            host, port = p.url.removeprefix("https://").rsplit(":", 1)
            reader, writer = await asyncio.open_connection(
                host, int(port), ssl=env.client(), server_hostname="localhost"
            )
            writer.write(b"GET /down HTTP/1.1\r\nHost: x\r\n\r\n")
            taken = 0

            async def slow_reader() -> None:
                nonlocal taken
                while chunk := await reader.read(SLOW_READ_BYTES):
                    taken += len(chunk)
                    await asyncio.sleep(1.0)

            task = asyncio.create_task(slow_reader())
            try:
                stalled = await stalls(lambda: hose.moved)
                assert stalled < STALLED_BOUND_BYTES, stalled
                assert taken > 0  # the head and the first bytes did arrive
            finally:
                task.cancel()
                writer.transport.abort()
                hose.stop.set()
    finally:
        assert hose.runner is not None
        await hose.runner.cleanup()


async def test_an_upstream_reading_1kb_a_second_stops_the_client_upload(env: Env) -> None:
    hose = Firehose(env.kv.token)
    await hose.start()
    try:
        async with env.proxy(http_service(hose.url, env.kv.path)) as p:
            host, port = p.url.removeprefix("https://").rsplit(":", 1)
            _reader, writer = await asyncio.open_connection(
                host, int(port), ssl=env.client(), server_hostname="localhost"
            )
            writer.write(
                b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % ENDLESS_BYTES
            )
            sent = 0

            async def fast_writer() -> None:
                nonlocal sent
                block = b"y" * 65536
                while sent < ENDLESS_BYTES:
                    writer.write(block)
                    await writer.drain()  # waits while the broker does not read
                    sent += len(block)

            task = asyncio.create_task(fast_writer())
            try:
                stalled = await stalls(lambda: sent)
                assert stalled < STALLED_BOUND_BYTES, stalled
            finally:
                task.cancel()
                writer.transport.abort()
                hose.stop.set()
    finally:
        assert hose.runner is not None
        await hose.runner.cleanup()
