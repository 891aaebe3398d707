"""broker.session.splice over real loopback sockets, under the default event loop and uvloop."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import random
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest
import trustme

from broker.config import ListenAddress
from broker.session import net, splice
from tests.faults import EchoServer, FaultyRelay
from tests.loops import Run, client_context, eventually, server_context

# Per direction, the relay buffers at most its high-water mark plus what one read returned
# before it could pause the reader (256 KiB for asyncio and uvloop, a few TLS records more).
BUFFER_BOUND = splice.RELAY_HIGH_WATER + 512 * 1024


@dataclass
class Broker:
    """A minimal adapter: accept, optionally run a handshake, connect upstream, splice."""

    listener: net.Listener
    results: asyncio.Queue[splice.SpliceResult | BaseException]
    stats: list[splice.SpliceStats] = field(default_factory=list)
    conduits: list[tuple[net.Conduit, net.Conduit]] = field(default_factory=list)

    @property
    def port(self) -> int:
        assert self.listener.address.port is not None
        return self.listener.address.port


Handshake = Callable[[net.Conduit, net.Conduit], Awaitable[None]]


@asynccontextmanager
async def broker(
    upstream: tuple[str, int],
    *,
    handshake: Handshake | None = None,
    idle_timeout: float | None = None,
    server_ssl: ssl.SSLContext | None = None,
    client_filter: Callable[[], splice.StreamFilter] | None = None,
) -> AsyncIterator[Broker]:
    results: asyncio.Queue[splice.SpliceResult | BaseException] = asyncio.Queue()
    stats_list: list[splice.SpliceStats] = []
    pairs: list[tuple[net.Conduit, net.Conduit]] = []

    async def handler(client: net.Conduit) -> None:
        up = await net.connect(*upstream, timeout=5)
        pairs.append((client, up))
        stats = splice.SpliceStats()
        stats_list.append(stats)
        try:
            if handshake is not None:
                await handshake(client, up)
            results.put_nowait(
                await splice.splice(
                    client,
                    up,
                    idle_timeout=idle_timeout,
                    stats=stats,
                    client_filter=client_filter() if client_filter is not None else None,
                )
            )
        except BaseException as exc:
            results.put_nowait(exc)
            raise
        finally:
            up.close()

    listener = await net.serve(
        ListenAddress("127.0.0.1", 0), handler, max_connections=16, ssl=server_ssl
    )
    try:
        yield Broker(listener, results, stats_list, pairs)
    finally:
        await listener.close(drain_timeout=1)


def echo_address(server: asyncio.Server) -> tuple[str, int]:
    host, port = server.sockets[0].getsockname()[:2]
    return host, port


def payload(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


async def pump(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes, chunk: int
) -> bytes:
    """Send `data` and read the echo concurrently; return the sha256 of what came back."""

    async def send() -> None:
        view = memoryview(data)
        for i in range(0, len(data), chunk):
            writer.write(view[i : i + chunk])
            await writer.drain()

    digest = hashlib.sha256()
    received = 0
    async with asyncio.TaskGroup() as tg:
        tg.create_task(send())
        while received < len(data):
            block = await reader.read(1024 * 1024)
            assert block, f"EOF after {received} of {len(data)} bytes"
            digest.update(block)
            received += len(block)
    return digest.digest()


def test_50mb_both_directions_intact(run: Run) -> None:
    size = 50 * 1024 * 1024
    data = payload(size, 1)

    async def main() -> None:
        async with EchoServer() as echo, broker(echo.address) as b:
            reader, writer = await asyncio.open_connection("127.0.0.1", b.port)
            assert await pump(reader, writer, data, 1024 * 1024) == hashlib.sha256(data).digest()
            writer.write_eof()
            assert await reader.read() == b""
            result = await b.results.get()
            writer.close()
        assert result == splice.SpliceResult(size, size, "client")

    run(main())


class SlowReader(asyncio.Protocol):
    """A client that starts with reading paused and records how much it got."""

    def __init__(self) -> None:
        self.digest = hashlib.sha256()
        self.received = 0
        self.eof = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.transport.pause_reading()

    def data_received(self, data: bytes) -> None:
        self.digest.update(data)
        self.received += len(data)

    def eof_received(self) -> None:
        self.eof.set_result(None)


def test_slow_receiver_pauses_upstream_and_bounds_buffers(run: Run) -> None:
    size = 20 * 1024 * 1024
    data = payload(size, 2)

    async def source(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        view = memoryview(data)
        for i in range(0, size, 64 * 1024):
            writer.write(view[i : i + 64 * 1024])
            await writer.drain()
        writer.close()

    async def main() -> None:
        upstream = await asyncio.start_server(source, "127.0.0.1", 0)
        async with upstream, broker(echo_address(upstream)) as b:
            loop = asyncio.get_running_loop()
            transport, client = await loop.create_connection(SlowReader, "127.0.0.1", b.port)
            # uvloop starts reading after connection_made, undoing the pause made there.
            transport.pause_reading()
            await eventually(lambda: bool(b.stats) and b.stats[0].pauses > 0)
            client_conduit = b.conduits[0][0]
            assert client_conduit.transport is not None
            relay_transport = client_conduit.transport
            peak = relay_transport.get_write_buffer_size()
            transport.resume_reading()

            async def sample() -> None:
                nonlocal peak
                while True:
                    peak = max(peak, relay_transport.get_write_buffer_size())
                    await asyncio.sleep(0)

            sampler = asyncio.create_task(sample())
            await client.eof
            sampler.cancel()
            transport.close()
            result = await b.results.get()
        assert client.received == size
        assert client.digest.digest() == hashlib.sha256(data).digest()
        assert peak <= BUFFER_BOUND, peak
        assert result == splice.SpliceResult(0, size, "upstream")

    run(main())


def test_half_close_from_client(run: Run) -> None:
    async def reply_after_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.read()  # until the client's EOF arrives
        writer.write(b"got " + request)
        await writer.drain()
        writer.close()

    async def main() -> None:
        upstream = await asyncio.start_server(reply_after_eof, "127.0.0.1", 0)
        async with upstream, broker(echo_address(upstream)) as b:
            reader, writer = await asyncio.open_connection("127.0.0.1", b.port)
            writer.write(b"ping")
            writer.write_eof()
            assert await reader.read() == b"got ping"
            writer.close()
            result = await b.results.get()
        assert result == splice.SpliceResult(4, 8, "client")

    run(main())


def test_half_close_from_upstream(run: Run) -> None:
    async def greet_then_listen(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"hello")
        writer.write_eof()  # our write side is done; keep reading
        received = await reader.read()
        assert received == b"still talking"
        writer.close()

    async def main() -> None:
        upstream = await asyncio.start_server(greet_then_listen, "127.0.0.1", 0)
        async with upstream, broker(echo_address(upstream)) as b:
            reader, writer = await asyncio.open_connection("127.0.0.1", b.port)
            assert await reader.read() == b"hello"  # EOF relayed, connection still open
            writer.write(b"still talking")
            writer.write_eof()
            result = await b.results.get()
            writer.close()
        assert result == splice.SpliceResult(13, 5, "upstream")

    run(main())


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with SO_LINGER 0: the kernel sends RST instead of FIN."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def test_client_reset_mid_transfer(run: Run) -> None:
    async def main() -> None:
        async with EchoServer() as echo, broker(echo.address) as b:
            reader, writer = await asyncio.open_connection("127.0.0.1", b.port)
            writer.write(b"x" * 100_000)
            await reader.readexactly(100_000)
            reset(writer)
            result = await b.results.get()
        assert result.ended_by == "error"
        assert result.error is not None and result.error.startswith("client:")
        assert result.bytes_client_to_upstream == 100_000

    run(main())


def test_upstream_dies_mid_session(run: Run) -> None:
    async def main() -> None:
        async with (
            EchoServer() as echo,
            FaultyRelay(*echo.address) as relay,
            broker(relay.address) as b,
        ):
            reader, writer = await asyncio.open_connection("127.0.0.1", b.port)
            writer.write(b"before")
            assert await reader.readexactly(6) == b"before"
            relay.reset_connections()
            assert await reader.read() == b""  # the client learns the upstream is gone
            result = await b.results.get()
            writer.close()
        assert result.ended_by == "error"
        assert result.error is not None and result.error.startswith("upstream:")

    run(main())


def test_blackholed_upstream_ends_idle(run: Run) -> None:
    async def main() -> None:
        async with (
            EchoServer() as echo,
            FaultyRelay(*echo.address) as relay,
            broker(relay.address, idle_timeout=0.3) as b,
        ):
            reader, writer = await asyncio.open_connection("127.0.0.1", b.port)
            writer.write(b"one")
            assert await reader.readexactly(3) == b"one"
            relay.trigger_connectivity_loss()
            writer.write(b"two")  # the relay holds it: silence, no error, until idle
            assert await reader.read() == b""
            result = await b.results.get()
            writer.close()
        assert result == splice.SpliceResult(6, 3, "idle")

    run(main())


def test_faulty_relay_restore_delivers_held_bytes(run: Run) -> None:
    async def main() -> None:
        async with EchoServer() as echo, FaultyRelay(*echo.address) as relay:
            reader, writer = await asyncio.open_connection(*relay.address)
            relay.trigger_connectivity_loss()
            writer.write(b"held")
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.2):
                    await reader.readexactly(4)
            relay.restore()
            assert await reader.readexactly(4) == b"held"
            writer.close()

    run(main())


def test_tls_both_sides_with_mid_stream_upgrade(run: Run, ca: trustme.CA) -> None:
    """The PostgreSQL shape: plain TCP, a request to upgrade, 'S', then TLS on both legs."""
    size = 8 * 1024 * 1024
    data = payload(size, 3)

    async def tls_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert await reader.readexactly(4) == b"TLS?"
        writer.write(b"S")
        await writer.drain()
        await writer.start_tls(server_context(ca))
        try:
            while block := await reader.read(256 * 1024):
                writer.write(block)
                await writer.drain()
        finally:
            writer.close()

    async def handshake(client: net.Conduit, up: net.Conduit) -> None:
        assert await client.receive(5) == b"TLS?"
        client.write(b"S")
        await client.start_tls(server_context(ca), server_side=True, timeout=5)
        up.write(b"TLS?")
        assert await up.receive(5) == b"S"
        await up.start_tls(client_context(ca), server_side=False, server_hostname="127.0.0.1")
        assert client.ssl_object is not None and up.ssl_object is not None

    async def main() -> None:
        upstream = await asyncio.start_server(tls_echo, "127.0.0.1", 0)
        async with upstream, broker(echo_address(upstream), handshake=handshake) as b:
            reader, writer = await asyncio.open_connection("127.0.0.1", b.port)
            writer.write(b"TLS?")
            assert await reader.readexactly(1) == b"S"
            await writer.start_tls(client_context(ca), server_hostname="127.0.0.1")
            assert await pump(reader, writer, data, 256 * 1024) == hashlib.sha256(data).digest()
            writer.close()
            result = await b.results.get()
        assert result.bytes_client_to_upstream == size
        assert result.bytes_upstream_to_client == size
        assert result.ended_by == "client"

    run(main())


def test_tls_listener_to_tls_upstream(run: Run, ca: trustme.CA) -> None:
    async def handshake(client: net.Conduit, up: net.Conduit) -> None:
        await up.start_tls(client_context(ca), server_side=False, server_hostname="127.0.0.1")

    async def main() -> None:
        async with (
            EchoServer(server_context(ca)) as tls_echo,
            broker(tls_echo.address, handshake=handshake, server_ssl=server_context(ca)) as b,
        ):
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", b.port, ssl=client_context(ca), server_hostname="127.0.0.1"
            )
            writer.write(b"over tls twice")
            assert await reader.readexactly(14) == b"over tls twice"
            writer.close()
            result = await b.results.get()
        assert result == splice.SpliceResult(14, 14, "client")

    run(main())


def test_unread_bytes_are_delivered_before_spliced_data(run: Run) -> None:
    async def greeter(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HELLO|early-from-upstream|")
        first = await reader.readexactly(len(b"early-from-client|"))
        writer.write(b"upstream saw " + first)
        writer.write(await reader.read())
        writer.close()

    async def handshake(client: net.Conduit, up: net.Conduit) -> None:
        # A codec consumed the first message of each side and left the rest.
        received = await client.receive(5)
        while not received.startswith(b"START|") or b"|" not in received[6:]:
            received += await client.receive(5)
        client.unread(received[len(b"START|") :])
        greeting = await up.receive(5)
        while len(greeting) < len(b"HELLO|"):
            greeting += await up.receive(5)
        up.unread(greeting[len(b"HELLO|") :])

    async def main() -> None:
        upstream = await asyncio.start_server(greeter, "127.0.0.1", 0)
        async with upstream, broker(echo_address(upstream), handshake=handshake) as b:
            reader, writer = await asyncio.open_connection("127.0.0.1", b.port)
            writer.write(b"START|early-from-client|")
            assert await reader.readexactly(19) == b"early-from-upstream"
            writer.write(b"later")
            writer.write_eof()
            rest = await reader.read()
            assert rest == b"|upstream saw early-from-client|later"
            writer.close()
            await b.results.get()

    run(main())


def test_idle_timeout_closes_both_sides(run: Run) -> None:
    async def main() -> None:
        async with EchoServer() as echo, broker(echo.address, idle_timeout=0.2) as b:
            reader, writer = await asyncio.open_connection("127.0.0.1", b.port)
            writer.write(b"hi")
            assert await reader.readexactly(2) == b"hi"
            assert await reader.read() == b""
            result = await b.results.get()
            client, up = b.conduits[0]
            assert client.is_closed and up.is_closed
            writer.close()
        assert result == splice.SpliceResult(2, 2, "idle")

    run(main())


def test_cancelling_the_splice_closes_both_sides(run: Run) -> None:
    async def main() -> None:
        peers: list[asyncio.StreamReader] = []
        writers: list[asyncio.StreamWriter] = []

        async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            peers.append(reader)
            writers.append(writer)

        upstream = await asyncio.start_server(hold, "127.0.0.1", 0)
        async with upstream:
            client_side = await net.connect("127.0.0.1", echo_address(upstream)[1], timeout=5)
            up = await net.connect("127.0.0.1", echo_address(upstream)[1], timeout=5)
            stats = splice.SpliceStats()
            task = asyncio.create_task(splice.splice(client_side, up, stats=stats))
            await eventually(lambda: len(peers) == 2)
            await asyncio.sleep(0)  # let the splice take the transports over
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert stats.ended_by == "cancelled"
            assert client_side.is_closed and up.is_closed
            for reader in peers:
                assert await reader.read() == b""
            for writer in writers:
                writer.close()

    run(main())


def test_counters_are_live(run: Run) -> None:
    async def main() -> None:
        async with EchoServer() as echo, broker(echo.address) as b:
            reader, writer = await asyncio.open_connection("127.0.0.1", b.port)
            writer.write(b"a" * 1000)
            await reader.readexactly(1000)
            stats = b.stats[0]
            assert (stats.client_to_upstream, stats.upstream_to_client) == (1000, 1000)
            assert stats.ended_by is None
            writer.close()
            await b.results.get()
            assert stats.ended_by == "client"

    run(main())


def test_splice_when_client_already_sent_eof(run: Run) -> None:
    async def handshake(client: net.Conduit, up: net.Conduit) -> None:
        await eventually(lambda: client.at_eof)

    async def main() -> None:
        async with EchoServer() as echo, broker(echo.address, handshake=handshake) as b:
            reader, writer = await asyncio.open_connection("127.0.0.1", b.port)
            writer.write(b"last words")
            writer.write_eof()
            assert await reader.read() == b"last words"
            writer.close()
            result = await b.results.get()
        assert result == splice.SpliceResult(10, 10, "client")

    run(main())


def test_conduit_is_unusable_after_splice(run: Run) -> None:
    async def main() -> None:
        async with EchoServer() as echo:
            a = await net.connect(*echo.address, timeout=5)
            b = await net.connect(*echo.address, timeout=5)
            task = asyncio.create_task(splice.splice(a, b))
            await asyncio.sleep(0)
            with pytest.raises(RuntimeError):
                a.write(b"x")
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    run(main())


class LineFilter:
    """Rewrites whole lines: "secret" goes upstream as "public", "ask" is answered here,
    "die" ends the splice; lines split across reads are reassembled."""

    def __init__(self) -> None:
        self.partial = b""
        self.fed: list[bytes] = []

    def feed(self, data: bytes) -> tuple[bytes, bytes]:
        self.fed.append(data)
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()
        forward, answer = bytearray(), bytearray()
        for line in lines:
            if line == b"die":
                raise ValueError("the client said die")
            if line == b"ask":
                answer += b"answered by the filter\n"
            else:
                forward += line.replace(b"secret", b"public") + b"\n"
        return bytes(forward), bytes(answer)


def test_client_filter_rewrites_answers_and_ends(run: Run) -> None:
    async def main() -> None:
        filters: list[LineFilter] = []

        def make() -> LineFilter:
            filters.append(LineFilter())
            return filters[-1]

        async def handshake(client: net.Conduit, up: net.Conduit) -> None:
            # Bytes left over from the handshake go through the filter too.
            client.unread(b"early secret\n")

        async with (
            EchoServer() as echo,
            broker(echo.address, handshake=handshake, client_filter=make) as b,
        ):
            reader, writer = await asyncio.open_connection("127.0.0.1", b.port)
            assert await reader.readline() == b"early public\n"
            writer.write(b"sec")
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.write(b"ret two\nask\n")
            # The answer is written at once, the echo comes back later: no order between them.
            lines = {await reader.readline(), await reader.readline()}
            assert lines == {b"public two\n", b"answered by the filter\n"}
            writer.write(b"die\nnever forwarded\n")
            assert await reader.read() == b""
            writer.close()
            result = await b.results.get()
            assert isinstance(result, splice.SpliceResult)
            assert result.ended_by == "error"
            assert result.error == "client: the client said die"
            assert len(filters[0].fed) >= 3

    run(main())


@pytest.mark.parametrize("first", ["client", "upstream"])
def test_tls_state_is_freed_when_the_splice_ends_without_the_cyclic_gc(
    run: Run, ca: trustme.CA, first: str
) -> None:
    """Issue 19.3: the TLS layer keeps its app protocol's bound get_buffer/buffer_updated
    after the connection is gone; a relay side that kept its transport made a cycle that held
    the SSLProtocol, its SSL object and its 256 KiB buffer until a full GC collection. With
    the cyclic GC off, every SSL object of finished sessions must be gone by reference
    counting alone, whichever side ends the session (PostgreSQL's upstream closes first)."""
    sessions = 5

    async def tls_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert await reader.readexactly(4) == b"TLS?"
        writer.write(b"S")
        await writer.drain()
        await writer.start_tls(server_context(ca))
        try:
            while (block := await reader.read(65536)) and block != b"bye":
                writer.write(block)
                await writer.drain()
        finally:
            writer.close()

    # The broker's own contexts: only its SSL objects are counted (the test's client and
    # upstream may take their time over their own TLS shutdowns).
    broker_contexts = (server_context(ca), client_context(ca))

    async def handshake(client: net.Conduit, up: net.Conduit) -> None:
        assert await client.receive(5) == b"TLS?"
        client.write(b"S")
        await client.start_tls(broker_contexts[0], server_side=True, timeout=5)
        up.write(b"TLS?")
        assert await up.receive(5) == b"S"
        await up.start_tls(broker_contexts[1], server_side=False, server_hostname="127.0.0.1")

    def ssl_objects() -> int:
        return sum(
            1
            for o in gc.get_objects()
            if isinstance(o, ssl.SSLObject) and o.context in broker_contexts
        )

    async def one(port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"TLS?")
        assert await reader.readexactly(1) == b"S"
        await writer.start_tls(client_context(ca), server_hostname="127.0.0.1")
        writer.write(b"ping")
        assert await reader.readexactly(4) == b"ping"
        if first == "upstream":
            writer.write(b"bye")
            assert await reader.read() == b""
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()

    async def main() -> None:
        upstream = await asyncio.start_server(tls_echo, "127.0.0.1", 0)
        async with upstream, broker(echo_address(upstream), handshake=handshake) as b:
            for _ in range(sessions):
                await one(b.port)
                result = await b.results.get()
                assert isinstance(result, splice.SpliceResult)
            b.conduits.clear()  # the test's own references to the conduits
            # What is left: the event loop's references to the closed transports go as
            # their last callbacks run.
            await eventually(lambda: ssl_objects() == 0, timeout=20)

    gc.collect()
    gc.disable()
    try:
        run(main())
    finally:
        gc.enable()
