"""broker.session.net over real loopback and unix sockets, under asyncio and uvloop."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
import stat
from pathlib import Path

import pytest
import trustme

from broker.config import ListenAddress
from broker.errors import ClientError, UpstreamError, UpstreamTimeout
from broker.session import net
from tests.loops import Run, client_context, eventually, server_context

LOCAL = ListenAddress("127.0.0.1", 0)


def port_of(listener: net.Listener) -> int:
    assert listener.address.port is not None
    return listener.address.port


def free_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


class SilentServer:
    """Accepts connections and never says a word; closes them on close()."""

    def __init__(self) -> None:
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        async def keep(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.writers.append(writer)

        self.server = await asyncio.start_server(keep, "127.0.0.1", 0)
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in self.writers:
            writer.close()
        await self.server.wait_closed()


def test_connect_refused_names_the_address(run: Run) -> None:
    port = free_port()

    async def main() -> None:
        with pytest.raises(UpstreamError, match=f"127.0.0.1:{port}: cannot connect"):
            await net.connect("127.0.0.1", port, timeout=5)

    run(main())


def test_connect_timeout(run: Run) -> None:
    async def main() -> None:
        # A listener whose backlog is full drops further SYNs: connect() hangs.
        with socket.socket() as full:
            full.bind(("127.0.0.1", 0))
            full.listen(0)
            port = full.getsockname()[1]
            fillers = []
            try:
                for _ in range(3):
                    s = socket.socket()
                    s.setblocking(False)
                    s.connect_ex(("127.0.0.1", port))
                    fillers.append(s)
                with pytest.raises(UpstreamTimeout, match=f"127.0.0.1:{port}"):
                    await net.connect("127.0.0.1", port, timeout=0.3)
            finally:
                for s in fillers:
                    s.close()

    run(main())


def test_receive_unread_write(run: Run) -> None:
    async def main() -> None:
        seen: list[bytes] = []

        async def handler(conduit: net.Conduit) -> None:
            assert conduit.peer.startswith("127.0.0.1:")
            first = await conduit.receive(5)
            while len(first) < 10:
                first += await conduit.receive(5)
            conduit.unread(first[5:])
            seen.append(first[:5])
            seen.append(await conduit.receive(5))
            conduit.write(b"bye")
            assert await conduit.receive(5) == b""  # the client's EOF
            assert conduit.at_eof

        listener = await net.serve(LOCAL, handler, max_connections=4)
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(listener))
        writer.write(b"helloworld")
        assert await reader.readexactly(3) == b"bye"
        writer.write_eof()
        assert await reader.read() == b""  # the conduit is closed when the handler returns
        writer.close()
        await listener.close(drain_timeout=5)
        assert seen == [b"hello", b"world"]

    run(main())


def test_receive_timeout_blames_the_side(run: Run) -> None:
    async def main() -> None:
        errors: list[BaseException] = []
        accepted = asyncio.Event()
        # The first client is timed out by the broker; the second connection is the broker's
        # own "upstream" probe, and this side must stay silent for longer than it waits, or
        # it would see this side's close instead of its own timeout.
        silences = [0.1, 10.0]

        async def handler(conduit: net.Conduit) -> None:
            silence = silences.pop(0)
            accepted.set()
            try:
                await conduit.receive(silence)
            except ClientError as exc:
                errors.append(exc)

        listener = await net.serve(LOCAL, handler, max_connections=4)
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(listener))
        assert await reader.read() == b""
        assert isinstance(errors[0], ClientError)
        assert "sent nothing for 0.1s" in str(errors[0])

        # Towards an upstream that never speaks, the same silence is the upstream's fault.
        accepted.clear()
        upstream = await net.connect("127.0.0.1", port_of(listener), timeout=5)
        await accepted.wait()
        with pytest.raises(UpstreamTimeout, match=r"upstream 127\.0\.0\.1"):
            await upstream.receive(0.1)
        upstream.close()
        writer.close()
        await listener.close(drain_timeout=5)

    run(main())


def test_flooding_peer_is_paused_not_buffered(run: Run) -> None:
    size = 4 * 1024 * 1024
    data = os.urandom(size)

    async def main() -> None:
        conduits: list[net.Conduit] = []
        go = asyncio.Event()
        got = bytearray()

        async def handler(conduit: net.Conduit) -> None:
            conduits.append(conduit)
            await go.wait()
            while len(got) < size:
                got.extend(await conduit.receive(5))

        listener = await net.serve(LOCAL, handler, max_connections=4)
        _, writer = await asyncio.open_connection("127.0.0.1", port_of(listener))
        writer.write(data)
        # The client's own buffer fills up once the conduit stops reading.
        await eventually(lambda: writer.transport.get_write_buffer_size() > 0 and bool(conduits))
        await eventually(lambda: conduits[0].buffered >= net.HANDSHAKE_BUFFER_LIMIT)
        assert conduits[0].buffered <= net.HANDSHAKE_BUFFER_LIMIT + 256 * 1024
        go.set()
        await writer.drain()
        await eventually(lambda: len(got) >= size)
        assert bytes(got) == data
        writer.close()
        await listener.close(drain_timeout=5)

    run(main())


def test_close_aborts_when_the_peer_does_not_read(run: Run) -> None:
    async def main() -> None:
        conduits: list[net.Conduit] = []
        wrote = asyncio.Event()

        async def handler(conduit: net.Conduit) -> None:
            conduits.append(conduit)
            conduit.write(b"x" * 16 * 1024 * 1024)  # far more than the kernel buffers hold
            assert conduit.transport is not None
            net.close_with_linger(conduit.transport, linger=0.2)
            wrote.set()
            await asyncio.Event().wait()

        listener = await net.serve(LOCAL, handler, max_connections=4)
        transport, _ = await asyncio.get_running_loop().create_connection(
            asyncio.Protocol, "127.0.0.1", port_of(listener)
        )
        transport.pause_reading()
        await wrote.wait()
        relay = conduits[0].transport
        assert relay is not None and relay.get_write_buffer_size() > 0
        await eventually(lambda: relay.get_write_buffer_size() == 0)  # aborted, not flushed
        transport.close()
        await listener.close(drain_timeout=0)

    run(main())


def test_start_tls_mid_stream_server_and_client_side(run: Run, ca: trustme.CA) -> None:
    """PostgreSQL's shape: a plaintext request, 'S', then TLS on the same connection."""

    async def main() -> None:
        async def handler(conduit: net.Conduit) -> None:
            assert await conduit.receive(5) == b"SSLREQ"
            conduit.write(b"S")
            await conduit.start_tls(server_context(ca), server_side=True, timeout=5)
            assert conduit.is_tls
            data = await conduit.receive(5)
            conduit.write(b"secure " + data)
            await conduit.drain(5)

        listener = await net.serve(LOCAL, handler, max_connections=4)
        upstream = await net.connect("127.0.0.1", port_of(listener), timeout=5)
        upstream.write(b"SSLREQ")
        assert await upstream.receive(5) == b"S"
        await upstream.start_tls(
            client_context(ca), server_side=False, server_hostname="127.0.0.1", timeout=5
        )
        assert upstream.ssl_object is not None
        assert upstream.ssl_object.getpeercert() is not None
        upstream.write(b"hello")
        reply = b""
        while len(reply) < 12:
            chunk = await upstream.receive(5)
            assert chunk
            reply += chunk
        assert reply == b"secure hello"
        upstream.close()
        await listener.close(drain_timeout=5)

    run(main())


def test_plaintext_before_tls_is_refused(run: Run, ca: trustme.CA) -> None:
    """Bytes pipelined behind the upgrade request were not protected (CVE-2021-23214)."""

    async def main() -> None:
        errors: list[BaseException] = []

        async def handler(conduit: net.Conduit) -> None:
            received = await conduit.receive(5)
            while len(received) < len(b"SSLREQinjected"):
                received += await conduit.receive(5)
            conduit.unread(received[len(b"SSLREQ") :])
            try:
                await conduit.start_tls(server_context(ca), server_side=True, timeout=5)
            except ClientError as exc:
                errors.append(exc)

        listener = await net.serve(LOCAL, handler, max_connections=4)
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(listener))
        writer.write(b"SSLREQinjected")
        assert await reader.read() == b""
        assert "sent 8 bytes before the TLS handshake" in str(errors[0])
        writer.close()
        await listener.close(drain_timeout=5)

    run(main())


def test_early_tls_hands_buffered_records_to_tls(run: Run, ca: trustme.CA) -> None:
    """A MySQL client sends its ClientHello right behind its SSLRequest: with early_tls the
    bytes already read start the TLS stream, under both loops."""

    async def main() -> None:
        got: asyncio.Queue[bytes] = asyncio.Queue()

        async def handler(conduit: net.Conduit) -> None:
            received = await conduit.receive(5)
            while len(received) < len(b"SSLREQ") + 5:  # the request and a TLS record header
                received += await conduit.receive(5)
            assert received.startswith(b"SSLREQ") and received[6] == 0x16
            conduit.unread(received[len(b"SSLREQ") :])
            await conduit.start_tls(server_context(ca), server_side=True, timeout=5, early_tls=True)
            data = await conduit.receive(5)
            conduit.write(b"echo:" + data)
            got.put_nowait(data)

        listener = await net.serve(LOCAL, handler, max_connections=4)
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(listener))
        writer.write(b"SSLREQ")
        await writer.start_tls(client_context(ca), server_hostname="127.0.0.1")
        writer.write(b"protected")
        assert await asyncio.wait_for(got.get(), 10) == b"protected"
        assert await reader.readexactly(len(b"echo:protected")) == b"echo:protected"
        writer.close()
        await listener.close(drain_timeout=5)

    run(main())


def test_tls_handshake_timeout_and_failure(run: Run, ca: trustme.CA) -> None:
    async def main() -> None:
        errors: list[BaseException] = []

        async def handler(conduit: net.Conduit) -> None:
            try:
                await conduit.start_tls(server_context(ca), server_side=True, timeout=0.2)
            except ClientError as exc:
                errors.append(exc)
            assert conduit.is_closed

        # A client that never sends a ClientHello.
        listener = await net.serve(LOCAL, handler, max_connections=4)
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(listener))
        assert await reader.read() == b""
        assert "TLS handshake in 0.2s" in str(errors[0])
        writer.close()

        # An upstream that never answers ours.
        silent = SilentServer()
        upstream = await net.connect("127.0.0.1", await silent.start(), timeout=5)
        with pytest.raises(UpstreamTimeout, match="TLS handshake"):
            await upstream.start_tls(client_context(ca), server_side=False, timeout=0.2)
        assert upstream.is_closed
        await silent.close()

        # An upstream whose certificate we do not trust.
        tls_listener = await net.serve(
            LOCAL, lambda c: c.receive(5), max_connections=4, ssl=server_context(ca)
        )
        upstream = await net.connect("127.0.0.1", port_of(tls_listener), timeout=5)
        with pytest.raises(UpstreamError, match=r"TLS handshake with upstream .* failed"):
            await upstream.start_tls(
                ssl.create_default_context(), server_side=False, server_hostname="127.0.0.1"
            )
        assert upstream.is_closed
        await tls_listener.close(drain_timeout=1)
        await listener.close(drain_timeout=1)

    run(main())


def test_tls_listener_and_tls_connect(run: Run, ca: trustme.CA) -> None:
    async def main() -> None:
        async def handler(conduit: net.Conduit) -> None:
            assert conduit.ssl_object is not None
            conduit.write(await conduit.receive(5))

        listener = await net.serve(LOCAL, handler, max_connections=4, ssl=server_context(ca))
        upstream = await net.connect(
            "127.0.0.1",
            port_of(listener),
            timeout=5,
            ssl_context=client_context(ca),
            server_hostname="127.0.0.1",
        )
        upstream.write(b"ping")
        assert await upstream.receive(5) == b"ping"
        upstream.close()
        with pytest.raises(UpstreamError, match="TLS handshake failed"):
            await net.connect(
                "127.0.0.1",
                port_of(listener),
                timeout=5,
                ssl_context=ssl.create_default_context(),
                server_hostname="127.0.0.1",
            )
        await listener.close(drain_timeout=5)

    run(main())


def test_max_connections_enforced(run: Run) -> None:
    async def main() -> None:
        release = asyncio.Event()

        async def handler(conduit: net.Conduit) -> None:
            await release.wait()

        listener = await net.serve(LOCAL, handler, max_connections=2)
        port = port_of(listener)
        clients = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
        await eventually(lambda: listener.active == 2)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await reader.read() == b""  # refused at once
        assert (listener.active, listener.accepted, listener.rejected) == (2, 2, 1)
        release.set()
        await eventually(lambda: listener.active == 0)
        reader, writer2 = await asyncio.open_connection("127.0.0.1", port)
        await eventually(lambda: listener.accepted == 3)
        for _, w in [*clients, (reader, writer), (reader, writer2)]:
            w.close()
        await listener.close(drain_timeout=5)

    run(main())


def test_close_drains_then_cancels(run: Run) -> None:
    async def main() -> None:
        finished: list[str] = []
        cancelled: list[str] = []
        conduits: list[net.Conduit] = []
        polite_may_go = asyncio.Event()

        async def handler(conduit: net.Conduit) -> None:
            conduits.append(conduit)
            name = (await conduit.receive(5)).decode()
            try:
                if name == "polite":
                    await polite_may_go.wait()
                else:
                    await asyncio.Event().wait()
                finished.append(name)
            except asyncio.CancelledError:
                cancelled.append(name)
                raise

        listener = await net.serve(LOCAL, handler, max_connections=4)
        port = port_of(listener)
        streams = []
        for name in (b"polite", b"stubborn"):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(name)
            streams.append((reader, writer))
        await eventually(lambda: listener.active == 2)

        closing = asyncio.create_task(listener.close(drain_timeout=0.5))
        await asyncio.sleep(0)
        polite_may_go.set()
        await closing
        assert finished == ["polite"]
        assert cancelled == ["stubborn"]
        assert listener.active == 0
        assert all(c.is_closed for c in conduits)
        for reader, writer in streams:
            assert await reader.read() == b""
            writer.close()
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port)

    run(main())


def test_cancellation_mid_handshake_closes_transports(run: Run, ca: trustme.CA) -> None:
    async def main() -> None:
        conduits: list[net.Conduit] = []
        in_tls = asyncio.Event()

        async def handler(conduit: net.Conduit) -> None:
            conduits.append(conduit)
            if await conduit.receive(30) == b"tls":
                in_tls.set()
                await conduit.start_tls(server_context(ca), server_side=True, timeout=30)
            await conduit.receive(30)

        listener = await net.serve(LOCAL, handler, max_connections=4)
        port = port_of(listener)
        waiting = await asyncio.open_connection("127.0.0.1", port)
        handshaking = await asyncio.open_connection("127.0.0.1", port)
        handshaking[1].write(b"tls")
        await in_tls.wait()
        await eventually(lambda: listener.active == 2)
        await listener.close(drain_timeout=0)
        assert len(conduits) == 2
        assert all(c.is_closed for c in conduits)
        for reader, writer in (waiting, handshaking):
            assert await reader.read() == b""
            writer.close()

        # The upstream side: cancelling a task inside start_tls() aborts the connection.
        silent = SilentServer()
        upstream = await net.connect("127.0.0.1", await silent.start(), timeout=5)
        task = asyncio.create_task(
            upstream.start_tls(client_context(ca), server_side=False, timeout=30)
        )
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert upstream.is_closed
        await silent.close()

    run(main())


def test_handler_errors_are_logged_and_serving_continues(
    run: Run, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        async def handler(conduit: net.Conduit) -> None:
            if await conduit.receive(5) == b"boom":
                raise ValueError("boom")
            conduit.write(b"fine")

        listener = await net.serve(LOCAL, handler, max_connections=4)
        port = port_of(listener)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"boom")
        assert await reader.read() == b""
        writer.close()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"ok")
        assert await reader.read() == b"fine"
        writer.close()
        await listener.close(drain_timeout=5)

    with caplog.at_level(logging.ERROR, logger="broker.session.net"):
        run(main())
    assert any("handler failed" in r.message and r.exc_info for r in caplog.records)


def test_unix_socket_listener(run: Run, tmp_path: Path) -> None:
    path = tmp_path / "sidekey.sock"
    # A stale socket file from a crashed process is replaced.
    with socket.socket(socket.AF_UNIX) as stale:
        stale.bind(str(path))

    async def main() -> None:
        peers: list[net.Conduit] = []

        async def handler(conduit: net.Conduit) -> None:
            peers.append(conduit)
            conduit.write(await conduit.receive(5))

        listener = await net.serve(ListenAddress(path=path), handler, max_connections=4)
        assert listener.address.path == path
        assert stat.S_IMODE(path.stat().st_mode) == net.UNIX_SOCKET_MODE
        with pytest.raises(OSError, match="in use"):
            await net.serve(ListenAddress(path=path), handler, max_connections=4)
        reader, writer = await asyncio.open_unix_connection(str(path))
        writer.write(b"local")
        assert await reader.readexactly(5) == b"local"
        creds = peers[0].credentials
        assert creds == net.PeerCredentials(os.getpid(), os.getuid(), os.getgid())
        assert peers[0].peer == f"unix:pid={os.getpid()},uid={os.getuid()},gid={os.getgid()}"
        writer.close()
        await listener.close(drain_timeout=5)
        assert not path.exists()

    run(main())


def test_unix_listener_refuses_to_replace_a_regular_file(run: Run, tmp_path: Path) -> None:
    path = tmp_path / "not-a-socket"
    path.write_text("keep me")

    async def main() -> None:
        with pytest.raises(OSError, match="not a socket"):
            await net.serve(ListenAddress(path=path), lambda c: c.receive(1), max_connections=1)
        assert path.read_text() == "keep me"

    run(main())


def test_tcp_nodelay_on_accepted_and_connected_sockets_also_after_start_tls(
    run: Run, ca: trustme.CA
) -> None:
    """Handshakes and relayed queries are small writes: Nagle must be off on both legs,
    under either loop, and stay off after the in-place TLS upgrade. The loops set it; the
    broker relies on that and sets nothing itself, so this fails if a loop stops."""

    def nodelay(conduit: net.Conduit) -> int:
        assert conduit.transport is not None
        sock = conduit.transport.get_extra_info("socket")
        return int(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    async def main() -> None:
        seen: list[int] = []

        async def handler(conduit: net.Conduit) -> None:
            seen.append(nodelay(conduit))
            assert await conduit.receive(5) == b"SSLREQ"
            conduit.write(b"S")
            await conduit.start_tls(server_context(ca), server_side=True, timeout=5)
            seen.append(nodelay(conduit))
            await conduit.receive(5)

        listener = await net.serve(LOCAL, handler, max_connections=4)
        upstream = await net.connect("127.0.0.1", port_of(listener), timeout=5)
        assert nodelay(upstream) == 1
        upstream.write(b"SSLREQ")
        assert await upstream.receive(5) == b"S"
        await upstream.start_tls(
            client_context(ca), server_side=False, server_hostname="127.0.0.1", timeout=5
        )
        assert nodelay(upstream) == 1
        await eventually(lambda: len(seen) == 2)
        assert seen == [1, 1]
        upstream.close()
        await listener.close(drain_timeout=1)

    run(main())


def test_buffered_reads_deliver_every_byte_over_tls_through_the_shared_buffer(
    run: Run, ca: trustme.CA
) -> None:
    """The transport fills the per-thread buffer (get_buffer), the protocol gets copies in
    order, then EOF and the loss: for a TLS server side whose peer sends 3 MB in odd pieces."""

    class Recorder(asyncio.Protocol):
        def __init__(self) -> None:
            self.data = bytearray()
            self.chunks: list[bytes] = []
            self.eof = False
            self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def data_received(self, data: bytes) -> None:
            assert isinstance(data, bytes)  # a copy, not a view of the shared buffer
            self.chunks.append(data)
            self.data += data

        def eof_received(self) -> bool:
            self.eof = True
            return False

        def connection_lost(self, exc: Exception | None) -> None:
            self.lost.set_result(None)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        recorder = Recorder()
        buffers: list[int] = []

        class Counting(net.BufferedReads):
            def get_buffer(self, sizehint: int) -> memoryview:
                buffers.append(sizehint)
                return super().get_buffer(sizehint)

        reads = Counting(recorder)
        server = await loop.create_server(lambda: reads, "127.0.0.1", 0, ssl=server_context(ca))
        port = server.sockets[0].getsockname()[1]
        payload = bytes(range(256)) * (3 * 4096)
        _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_context(ca))
        for start in range(0, len(payload), 7919):
            writer.write(payload[start : start + 7919])
        await writer.drain()
        writer.close()
        await asyncio.wait_for(recorder.lost, 10)
        server.close()
        await server.wait_closed()
        assert bytes(recorder.data) == payload and recorder.eof
        assert buffers, "the transport never read into the shared buffer"
        # Every chunk is its own object: none aliases the buffer the next read overwrote.
        assert len({id(c) for c in recorder.chunks}) == len(recorder.chunks)
        assert net.read_buffer() is reads._buffer

    run(main())
