"""Over max_connections, broker.session.net hands the connection to the adapter's overload
handler so the client is told in its protocol (issue 19.8), under asyncio and uvloop."""

from __future__ import annotations

import asyncio
import socket

from broker.config import ListenAddress
from broker.session import net
from tests.loops import Run, eventually

LOCAL = ListenAddress("127.0.0.1", 0)
REPLY = b"too many connections\n"


async def hold(release: asyncio.Event) -> net.Handler:
    async def handler(conduit: net.Conduit) -> None:
        await release.wait()

    return handler


async def answer(conduit: net.Conduit) -> None:
    # Like a protocol's hello: read what the client says first, then answer.
    await conduit.receive(5)
    conduit.write(REPLY)


def test_over_limit_connection_is_answered_by_the_overload_handler(run: Run) -> None:
    async def main() -> None:
        release = asyncio.Event()
        listener = await net.serve(
            LOCAL, await hold(release), max_connections=1, on_overload=answer
        )
        port = listener.address.port
        assert port is not None
        _, holder = await asyncio.open_connection("127.0.0.1", port)
        await eventually(lambda: listener.active == 1)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"hello")
        assert await asyncio.wait_for(reader.read(), 10) == REPLY
        assert (listener.active, listener.accepted, listener.rejected) == (1, 1, 1)
        writer.close()
        await eventually(lambda: not listener._refusing)
        release.set()
        holder.close()
        await listener.close(drain_timeout=5)

    run(main())


def test_silent_over_limit_connection_is_closed_after_the_overload_timeout(
    run: Run, monkeypatch: object
) -> None:
    async def main() -> None:
        release = asyncio.Event()

        async def never(conduit: net.Conduit) -> None:
            await asyncio.Event().wait()

        listener = await net.serve(LOCAL, await hold(release), max_connections=1, on_overload=never)
        port = listener.address.port
        assert port is not None
        _, holder = await asyncio.open_connection("127.0.0.1", port)
        await eventually(lambda: listener.active == 1)
        loop = asyncio.get_running_loop()
        started = loop.time()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await asyncio.wait_for(reader.read(), net.OVERLOAD_TIMEOUT + 5) == b""
        assert loop.time() - started < net.OVERLOAD_TIMEOUT + 5
        writer.close()
        release.set()
        holder.close()
        await listener.close(drain_timeout=5)

    run(main())


def test_overload_answers_are_capped_and_the_rest_closed_at_once(run: Run) -> None:
    async def main() -> None:
        release = asyncio.Event()
        listener = await net.serve(
            LOCAL, await hold(release), max_connections=1, on_overload=answer
        )
        port = listener.address.port
        assert port is not None
        _, holder = await asyncio.open_connection("127.0.0.1", port)
        await eventually(lambda: listener.active == 1)
        # Clients that never speak: MAX_OVERLOAD_ANSWERS wait in the handler, the rest are
        # closed without a word.
        socks = [
            socket.create_connection(("127.0.0.1", port))
            for _ in range(net.MAX_OVERLOAD_ANSWERS + 10)
        ]
        await eventually(lambda: listener.rejected == len(socks))
        assert len(listener._refusing) == net.MAX_OVERLOAD_ANSWERS
        for s in socks:
            s.close()
        release.set()
        holder.close()
        # close() also ends the handlers still waiting.
        await listener.close(drain_timeout=5)
        assert not listener._refusing

    run(main())
