"""A fault-injecting TCP relay for tests, after asyncpg's test cluster proxy.

Put it between the broker and an upstream to make the network break mid-session:

    async with FaultyRelay("127.0.0.1", upstream_port) as relay:
        host, port = relay.address          # point the broker's upstream here
        relay.trigger_connectivity_loss()   # blackhole: nothing flows, nobody is told
        relay.restore()                     # traffic flows again, nothing was lost
        relay.reset_connections()           # RST every current connection (upstream died)
        relay.reset_on(b"SCRAM", towards="client")  # RST the connection carrying it, once

A blackhole pauses reading on both legs instead of dropping bytes: like a real partition
(TCP retransmits), both ends just see silence, and after `restore()` every byte arrives.
Connections accepted during the loss are held and only connected onward after `restore()`.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
from types import TracebackType
from typing import Literal, Self, cast

# Per-leg write buffer above which the relay stops reading the other leg: keeps a test's
# memory bounded when one end is slow.
_HIGH_WATER = 256 * 1024


class _Leg(asyncio.Protocol):
    def __init__(self, pair: _Pair) -> None:
        self.pair = pair
        self.transport: asyncio.Transport | None = None
        self.peer: _Leg | None = None
        self.flow_paused = False  # the peer's write buffer is full
        self.closed = False
        # Bytes that arrived before the onward leg existed (uvloop reads right after
        # connection_made even if it paused reading there).
        self.early = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.transport.set_write_buffer_limits(_HIGH_WATER)
        self.sync_reading()

    def data_received(self, data: bytes) -> None:
        if self.pair.relay._trips(self, data):
            self.pair.reset()
            return
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.write(data)
        else:
            self.early += data

    def eof_received(self) -> bool:
        if self.peer is not None and self.peer.transport is not None:
            if self.peer.transport.can_write_eof():
                self.peer.transport.write_eof()
            return True
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()
        self.pair.lost()

    def pause_writing(self) -> None:
        if self.peer is not None:
            self.peer.flow_paused = True
            self.peer.sync_reading()

    def resume_writing(self) -> None:
        if self.peer is not None:
            self.peer.flow_paused = False
            self.peer.sync_reading()

    def sync_reading(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if self.flow_paused or self.pair.relay.blackholed or self.peer is None:
            transport.pause_reading()
        else:
            transport.resume_reading()


class _Pair:
    def __init__(self, relay: FaultyRelay) -> None:
        self.relay = relay
        self.downstream = _Leg(self)
        self.upstream: _Leg | None = None

    async def connect_onward(self) -> None:
        await self.relay._restored.wait()
        if self.downstream.closed:
            return
        loop = asyncio.get_running_loop()
        leg = _Leg(self)
        try:
            source = self.relay.source_host
            await loop.create_connection(
                lambda: leg,
                self.relay.target_host,
                self.relay.target_port,
                local_addr=(source, 0) if source is not None else None,
            )
        except OSError:
            if self.downstream.transport is not None:
                self.downstream.transport.close()
            return
        self.upstream = leg
        leg.peer, self.downstream.peer = self.downstream, leg
        if self.downstream.early:
            leg.transport.write(bytes(self.downstream.early))  # type: ignore[union-attr]
            self.downstream.early.clear()
        self.downstream.sync_reading()
        leg.sync_reading()

    def legs(self) -> list[_Leg]:
        return [leg for leg in (self.downstream, self.upstream) if leg is not None]

    def reset(self) -> None:
        for leg in self.legs():
            if leg.transport is not None and not leg.transport.is_closing():
                sock = leg.transport.get_extra_info("socket")
                # SO_LINGER 0: close() sends RST rather than FIN, as when a host dies.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                leg.transport.abort()

    def lost(self) -> None:
        if all(leg.closed for leg in self.legs()):
            self.relay._pairs.discard(self)


class _LoopbackServer:
    """A loopback server that owns one task per connection: `close()` stops accepting,
    cancels them and waits; `async with` starts and closes it."""

    _server: asyncio.Server | None
    _tasks: set[asyncio.Task[None]]

    async def start(self) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


class EchoServer(_LoopbackServer):
    """A TCP echo server on 127.0.0.1 (optionally TLS) honouring backpressure and half-close.

    Unlike asyncio.Server.close() on 3.11, close() also ends the connections it accepted.
    """

    def __init__(self, ssl_context: ssl.SSLContext | None = None) -> None:
        self._ssl = ssl_context
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def address(self) -> tuple[str, int]:
        assert self._server is not None, "start() the server first"
        host, port = self._server.sockets[0].getsockname()[:2]
        return host, port

    async def _echo(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(256 * 1024):
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
        except OSError:
            pass
        finally:
            writer.close()

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.get_running_loop().create_task(self._echo(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0, ssl=self._ssl)


class FaultyRelay(_LoopbackServer):
    """A TCP relay on 127.0.0.1 towards `target_host:target_port` that can break on demand."""

    def __init__(
        self, target_host: str, target_port: int, *, source_host: str | None = None
    ) -> None:
        self.target_host = target_host
        self.target_port = target_port
        # Connect onward from this local address (a loopback alias such as 127.0.0.2 stands
        # for another host, as a pg_hba.conf rule sees it).
        self.source_host = source_host
        self.blackholed = False
        self._restored = asyncio.Event()
        self._restored.set()
        self._pairs: set[_Pair] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        # reset_on: the marker and its direction, until a connection carries it.
        self._trip: tuple[bytes, str] | None = None
        self.tripped = asyncio.Event()

    @property
    def address(self) -> tuple[str, int]:
        assert self._server is not None, "start() the relay first"
        host, port = self._server.sockets[0].getsockname()[:2]
        return host, port

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._accept, "127.0.0.1", 0)

    def _accept(self) -> _Leg:
        pair = _Pair(self)
        self._pairs.add(pair)
        task = asyncio.get_running_loop().create_task(pair.connect_onward())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return pair.downstream

    def trigger_connectivity_loss(self) -> None:
        """Stop all traffic, current and new, without telling either end."""
        self.blackholed = True
        self._restored.clear()
        self._sync()

    def restore(self) -> None:
        """Let traffic flow again; bytes held during the loss are delivered."""
        self.blackholed = False
        self._restored.set()
        self._sync()

    def reset_connections(self) -> None:
        """Abort (RST) every current connection on both legs."""
        for pair in list(self._pairs):
            pair.reset()

    def reset_on(self, marker: bytes, *, towards: Literal["upstream", "client"]) -> None:
        """Reset (RST both legs) the first connection that carries `marker` towards the
        upstream or the client, instead of relaying that chunk; once. A marker the sender
        splits over two reads is not seen: pick one that fits a message (a query's text, a
        server's auth mechanism name, a TLS record header)."""
        self._trip = (marker, towards)
        self.tripped = asyncio.Event()

    def _trips(self, leg: _Leg, data: bytes) -> bool:
        if self._trip is None:
            return False
        marker, towards = self._trip
        if (leg is leg.pair.downstream) != (towards == "upstream") or marker not in data:
            return False
        self._trip = None
        self.tripped.set()
        return True

    def _sync(self) -> None:
        for pair in self._pairs:
            for leg in pair.legs():
                leg.sync_reading()

    async def close(self) -> None:
        self.reset_connections()
        await super().close()
