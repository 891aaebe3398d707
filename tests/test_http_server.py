"""adapters.http.server over real loopback sockets, under the default event loop and uvloop.

The adapter's own tests drive it with curl and aiohttp; these speak raw HTTP/1.1 so framing,
pipelining, limits and timeouts can be checked byte by byte.
"""

from __future__ import annotations

import asyncio
import re
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest
import trustme

from adapters.http.server import (
    MAX_PIPELINED_REQUESTS,
    MAX_REQUEST_HEAD_BYTES,
    ClientConnection,
    HttpServer,
    InvalidResponseHead,
    Request,
    RequestBodyBroken,
)
from tests.loops import Run, client_context, eventually, server_context

DEADLINE = 10.0


@dataclass
class Info:
    peer: str
    over_limit: bool


@dataclass
class Served:
    server: HttpServer[Info]
    port: int
    seen: list[Request[Info]] = field(default_factory=list)


Handler = Callable[[Request[Info]], Awaitable[None]]


async def echo(request: Request[Info]) -> None:
    """Answer with the method, target and body it got."""
    body = await request.payload.read() if request.body_exists else b""
    text = f"{request.method} {request.target} {len(body)}".encode()
    await request.respond(200, "OK", [("X-Over", str(request.info.over_limit))], text)


@asynccontextmanager
async def serving(
    handler: Handler = echo,
    *,
    idle_timeout: float = 30.0,
    max_connections: int = 100,
    tls: ssl.SSLContext | None = None,
) -> AsyncIterator[Served]:
    served: Served

    async def record(request: Request[Info]) -> None:
        served.seen.append(request)
        await handler(request)

    server = HttpServer(
        record,
        lambda transport, over: Info(str(transport.get_extra_info("peername")), over),
        max_connections=max_connections,
        idle_timeout=idle_timeout,
    )
    listener = await asyncio.get_running_loop().create_server(server, "127.0.0.1", 0, ssl=tls)
    served = Served(server, listener.sockets[0].getsockname()[1])
    try:
        yield served
    finally:
        listener.close()
        await server.shutdown(1.0)
        await listener.wait_closed()


async def connect(
    port: int, tls: ssl.SSLContext | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port, ssl=tls)


async def read_response(reader: asyncio.StreamReader) -> tuple[bytes, dict[str, str], bytes]:
    """One response: status line, headers (lower-cased names) and the de-chunked body."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), DEADLINE)
    status, *lines = head.decode("latin-1").split("\r\n")[:-2]
    headers = {k.lower(): v for k, _, v in (line.partition(": ") for line in lines)}
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding") == "chunked":
        body = b""
        while size := int((await reader.readuntil(b"\r\n")).strip(), 16):
            body += await reader.readexactly(size)
            assert await reader.readexactly(2) == b"\r\n"
        assert await reader.readexactly(2) == b"\r\n"
    else:
        body = b""
    return status.encode(), headers, body


async def closed(reader: asyncio.StreamReader) -> bool:
    try:
        return await asyncio.wait_for(reader.read(), DEADLINE) == b""
    except ConnectionResetError:
        return True


def get(target: str = "/", extra: str = "", version: str = "1.1") -> bytes:
    return f"GET {target} HTTP/{version}\r\nHost: x\r\n{extra}\r\n".encode()


def test_keep_alive_serves_many_requests_on_one_connection(run: Run) -> None:
    async def main() -> None:
        async with serving() as s:
            reader, writer = await connect(s.port)
            for i in range(3):
                writer.write(get(f"/n/{i}"))
                status, headers, body = await read_response(reader)
                assert status == b"HTTP/1.1 200 OK"
                assert body == f"GET /n/{i} 0".encode()
                assert "connection" not in headers
            (conn,) = s.server.connections
            task = conn.task
            assert task is not None and conn.idle, "between requests the serving task waits"
            writer.close()
            # The client leaving an idle connection ends its serving task: nothing leaks.
            await asyncio.wait_for(task, DEADLINE)
            assert not s.server.connections and conn.task is None

    run(main())


def test_pipelined_requests_are_answered_in_order(run: Run) -> None:
    release = {"/slow": 0.2, "/fast": 0.0}

    async def uneven(request: Request[Info]) -> None:
        await asyncio.sleep(release.get(request.target, 0))
        await request.respond(200, "OK", [], request.target.encode())

    async def main() -> None:
        async with serving(uneven) as s:
            reader, writer = await connect(s.port)
            writer.write(get("/slow") + get("/fast") + get("/third"))
            bodies = [(await read_response(reader))[2] for _ in range(3)]
            assert bodies == [b"/slow", b"/fast", b"/third"]
            writer.close()

    run(main())


def test_a_burst_of_pipelined_requests_past_the_queue_bound_is_answered_in_order(
    run: Run,
) -> None:
    """More requests than MAX_PIPELINED_REQUESTS in one write: reading pauses while the queue
    is full and resumes as it drains, so every request is answered, once, in order."""
    count = MAX_PIPELINED_REQUESTS * 6

    async def main() -> None:
        async with serving() as s:
            reader, writer = await connect(s.port)
            writer.write(b"".join(get(f"/n/{i}") for i in range(count)))
            bodies = [(await read_response(reader))[2] for _ in range(count)]
            assert bodies == [f"GET /n/{i} 0".encode() for i in range(count)]
            writer.write(get("/after"))  # the connection still serves requests
            assert (await read_response(reader))[2] == b"GET /after 0"
            writer.close()

    run(main())


def test_unknown_length_is_chunked_for_http11_and_close_delimited_for_http10(run: Run) -> None:
    async def streamed(request: Request[Info]) -> None:
        request.start(200, "OK", [("Content-Type", "text/plain")])
        for part in (b"one ", b"two ", b"three"):
            await request.write(part)
        await request.end()

    async def main() -> None:
        async with serving(streamed) as s:
            reader, writer = await connect(s.port)
            writer.write(get())
            _, headers, body = await read_response(reader)
            assert headers["transfer-encoding"] == "chunked" and body == b"one two three"
            writer.write(get())  # still open: chunked framing ends the response
            assert (await read_response(reader))[2] == b"one two three"
            writer.close()

            reader, writer = await connect(s.port)
            writer.write(get(version="1.0", extra="Connection: keep-alive\r\n"))
            raw = await asyncio.wait_for(reader.read(), DEADLINE)  # ends with the close
            head, _, body = raw.partition(b"\r\n\r\n")
            assert b"Transfer-Encoding" not in head and b"Connection: close" in head
            assert body == b"one two three"
            writer.close()

    run(main())


def test_http10_keep_alive_is_honoured_when_the_length_is_known(run: Run) -> None:
    async def main() -> None:
        async with serving() as s:
            reader, writer = await connect(s.port)
            for _ in range(2):
                writer.write(get(version="1.0", extra="Connection: keep-alive\r\n"))
                _, headers, body = await read_response(reader)
                assert headers["connection"] == "keep-alive" and body == b"GET / 0"
            writer.write(get(version="1.0"))  # no keep-alive asked: closed after
            _, headers, _ = await read_response(reader)
            assert headers["connection"] == "close"
            assert await closed(reader)
            writer.close()

    run(main())


def test_head_and_204_carry_no_body(run: Run) -> None:
    async def bodiless(request: Request[Info]) -> None:
        if request.target == "/empty":
            request.start(204, "No Content", [])
            await request.end()
        else:
            request.start(200, "OK", [("Content-Length", "5")])
            await request.write(b"hello")
            await request.end()

    async def main() -> None:
        async with serving(bodiless) as s:
            reader, writer = await connect(s.port)
            writer.write(b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n" + get("/empty") + get())
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), DEADLINE)
            assert b"Content-Length: 5" in head
            # No body bytes after either head: the next bytes are the following status lines.
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), DEADLINE)
            assert head.startswith(b"HTTP/1.1 204") and b"Transfer-Encoding" not in head
            assert (await read_response(reader))[2] == b"hello"
            writer.close()

    run(main())


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET / HTTP/1.1\r\nHost x\r\n\r\n", b"400"),
        (b"NOT HTTP AT ALL\r\n\r\n", b"400"),
        (b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", b"400"),
        (b"GET / HTTP/1.1\r\n" + b"X-Big: " + b"a" * 9000 + b"\r\n\r\n", b"400"),
    ],
)
def test_malformed_requests_get_400_and_a_close(
    run: Run, request_bytes: bytes, status: bytes
) -> None:
    async def main() -> None:
        async with serving() as s:
            reader, writer = await connect(s.port)
            writer.write(request_bytes)
            raw = await asyncio.wait_for(reader.read(), DEADLINE)
            assert raw.startswith(b"HTTP/1.1 " + status)
            assert b"Connection: close" in raw and b"sidekey: malformed request" in raw
            assert re.search(rb"\r\nDate: \w{3}, \d\d \w{3} \d{4} \d\d:\d\d:\d\d GMT\r\n", raw)
            writer.close()
            assert s.seen == []
            # The server keeps serving other connections.
            reader, writer = await connect(s.port)
            writer.write(get())
            assert (await read_response(reader))[0] == b"HTTP/1.1 200 OK"
            writer.close()

    run(main())


def test_a_request_head_over_the_limit_gets_431(run: Run) -> None:
    async def main() -> None:
        async with serving() as s:
            reader, writer = await connect(s.port)
            line = b"X-Filler: " + b"a" * 8000 + b"\r\n"
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n")
            # Sent in pieces, under every per-line and per-field limit; the head never ends.
            for _ in range(MAX_REQUEST_HEAD_BYTES // len(line) + 2):
                writer.write(line)
                await writer.drain()
            raw = await asyncio.wait_for(reader.read(), DEADLINE)
            assert raw.startswith(b"HTTP/1.1 431 ") and b"exceeds the limit of 65536 bytes" in raw
            assert s.seen == []
            writer.close()

    run(main())


def test_idle_connections_and_dribbled_heads_are_closed(run: Run) -> None:
    async def main() -> None:
        async with serving(idle_timeout=0.3) as s:
            reader, writer = await connect(s.port)
            writer.write(get())
            await read_response(reader)
            assert await closed(reader)  # idle after its request
            writer.close()

            reader, writer = await connect(s.port)
            writer.write(b"GET / HTTP/1.1\r\n")  # a head that never ends
            assert await closed(reader)
            writer.close()
            assert len(s.seen) == 1

    run(main())


def test_a_long_request_is_not_cut_by_the_idle_timer(run: Run) -> None:
    async def slow(request: Request[Info]) -> None:
        await asyncio.sleep(0.8)
        await request.respond(200, "OK", [], b"done")

    async def main() -> None:
        async with serving(slow, idle_timeout=0.2) as s:
            reader, writer = await connect(s.port)
            writer.write(get())
            assert (await read_response(reader))[2] == b"done"
            writer.close()

    run(main())


def test_a_failing_handler_gets_500_and_a_close(run: Run, caplog: pytest.LogCaptureFixture) -> None:
    async def broken(request: Request[Info]) -> None:
        raise ValueError("bug")

    async def main() -> None:
        async with serving(broken) as s:
            reader, writer = await connect(s.port)
            writer.write(get())
            status, headers, body = await read_response(reader)
            assert status.startswith(b"HTTP/1.1 500") and headers["connection"] == "close"
            assert body == b"sidekey: internal error\n"
            assert await closed(reader)
            writer.close()

    run(main())
    assert "HTTP handler failed" in caplog.text


def test_an_unread_body_closes_the_connection_after_the_response(run: Run) -> None:
    async def refuse(request: Request[Info]) -> None:
        await request.respond(403, "Forbidden", [], b"no")

    async def main() -> None:
        async with serving(refuse) as s:
            reader, writer = await connect(s.port)
            writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n")
            writer.write(b"x" * 1000)
            _, headers, body = await read_response(reader)
            assert headers["connection"] == "close" and body == b"no"
            assert await closed(reader)
            writer.close()

    run(main())


def test_bodies_stream_in_and_a_vanished_client_breaks_the_reader(run: Run) -> None:
    failures: list[BaseException] = []

    async def consume(request: Request[Info]) -> None:
        total = 0
        try:
            async for chunk in request.payload.iter_chunked(65536):
                total += len(chunk)
        except RequestBodyBroken as exc:
            failures.append(exc)
            raise ConnectionResetError from exc
        await request.respond(200, "OK", [], str(total).encode())

    async def main() -> None:
        async with serving(consume) as s:
            reader, writer = await connect(s.port)
            size = 8 * 1024 * 1024
            writer.write(f"PUT / HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n\r\n".encode())
            chunk = b"z" * 65536
            for _ in range(size // len(chunk)):
                writer.write(chunk)
                await writer.drain()
            assert (await read_response(reader))[2] == str(size).encode()

            writer.write(b"PUT / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
            writer.write(b"10000\r\n" + chunk[:1000])
            await writer.drain()
            await eventually(lambda: len(s.seen) == 2)
            writer.transport.abort()
            await eventually(lambda: len(failures) == 1)
            assert "client disconnected mid-body" in str(failures[0])

    run(main())


def test_connections_over_the_limit_are_flagged(run: Run) -> None:
    async def main() -> None:
        async with serving(max_connections=1) as s:
            first = await connect(s.port)
            first[1].write(get())
            _, headers, _ = await read_response(first[0])
            assert headers["x-over"] == "False"
            second = await connect(s.port)
            second[1].write(get())
            _, headers, _ = await read_response(second[0])
            assert headers["x-over"] == "True"
            first[1].close()
            second[1].close()

    run(main())


def test_a_response_head_cannot_be_split(run: Run) -> None:
    outcome: list[BaseException] = []

    async def splitting(request: Request[Info]) -> None:
        try:
            request.start(200, "OK", [("X-Evil", "a\r\nSet-Cookie: b=c")])
        except InvalidResponseHead as exc:
            outcome.append(exc)
            await request.respond(502, "Bad Gateway", [], b"refused")

    async def main() -> None:
        async with serving(splitting) as s:
            reader, writer = await connect(s.port)
            writer.write(get())
            status, headers, _ = await read_response(reader)
            assert status.startswith(b"HTTP/1.1 502") and "set-cookie" not in headers
            writer.close()

    run(main())
    assert len(outcome) == 1


def test_an_upgrade_request_is_answered_then_the_connection_closed(run: Run) -> None:
    async def main() -> None:
        async with serving() as s:
            reader, writer = await connect(s.port)
            writer.write(get(extra="Connection: Upgrade\r\nUpgrade: websocket\r\n") + get("/x"))
            _, headers, body = await read_response(reader)
            assert body == b"GET / 0" and headers["connection"] == "close"
            assert await closed(reader)
            writer.close()
            assert [r.target for r in s.seen] == ["/"]

    run(main())


def test_shutdown_closes_idle_drains_busy_and_cuts_the_stuck(run: Run) -> None:
    async def main() -> None:
        finish = asyncio.Event()

        async def gated(request: Request[Info]) -> None:
            if request.target == "/stuck":
                await asyncio.sleep(3600)
            if request.target == "/busy":
                await finish.wait()
            await request.respond(200, "OK", [], request.target.encode())

        server = HttpServer(
            gated, lambda transport, over: Info("", over), max_connections=10, idle_timeout=60
        )
        listener = await asyncio.get_running_loop().create_server(server, "127.0.0.1", 0)
        port = listener.sockets[0].getsockname()[1]
        idle = await connect(port)
        idle[1].write(get("/idle"))
        await read_response(idle[0])
        busy = await connect(port)
        busy[1].write(get("/busy"))
        stuck = await connect(port)
        stuck[1].write(get("/stuck"))
        await eventually(lambda: sum(not c.idle for c in server.connections) == 2)
        listener.close()
        shutting = asyncio.create_task(server.shutdown(0.5))
        assert await closed(idle[0])
        finish.set()
        _, headers, body = await read_response(busy[0])
        assert body == b"/busy" and headers["connection"] == "close"
        await asyncio.wait_for(shutting, DEADLINE)
        assert await closed(stuck[0])
        for _, writer in (idle, busy, stuck):
            writer.close()
        await listener.wait_closed()

    run(main())


def test_a_small_response_leaves_in_one_write(
    run: Run, ca: trustme.CA, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Head and body go out together: one TLS record and one send, not two."""
    writes: list[bytes] = []
    real_send = ClientConnection.send

    async def counting_send(self: ClientConnection[Info], data: bytes) -> None:
        writes.append(data)
        await real_send(self, data)

    monkeypatch.setattr(ClientConnection, "send", counting_send)

    async def one_chunk(request: Request[Info]) -> None:
        if request.target == "/whole":
            await request.respond(200, "OK", [], b"whole body")
            return
        request.start(200, "OK", [("Content-Length", "5")])
        await request.write(b"chunk")
        await request.end()

    async def main() -> None:
        async with serving(one_chunk, tls=server_context(ca)) as s:
            reader, writer = await connect(s.port, client_context(ca))
            for target, expected in (("/whole", b"whole body"), ("/streamed", b"chunk")):
                writes.clear()
                writer.write(get(target))
                status, _, body = await read_response(reader)
                assert status == b"HTTP/1.1 200 OK" and body == expected
                assert len(writes) == 1 and writes[0].endswith(b"\r\n\r\n" + expected)
            writer.close()

    run(main())


def test_tls_connections_have_nagle_off(run: Run, ca: trustme.CA) -> None:
    """A response is one small write: with Nagle on, a client's next request could wait for a
    delayed ACK. The loops turn it off on every accepted socket and the server relies on that
    (it skips aiohttp's own setsockopt), so this fails if a loop stops doing it."""
    seen: list[int] = []

    def info(transport: asyncio.BaseTransport, over: bool) -> Info:
        sock = transport.get_extra_info("socket")
        seen.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        return Info("peer", over)

    async def main() -> None:
        server = HttpServer(echo, info, max_connections=4, idle_timeout=30.0)
        loop = asyncio.get_running_loop()
        listener = await loop.create_server(server, "127.0.0.1", 0, ssl=server_context(ca))
        reader, writer = await connect(listener.sockets[0].getsockname()[1], client_context(ca))
        writer.write(get("/"))
        status, _, _ = await read_response(reader)
        assert status == b"HTTP/1.1 200 OK"
        assert seen == [1]
        writer.close()
        listener.close()
        await server.shutdown(1.0)
        await listener.wait_closed()

    run(main())
