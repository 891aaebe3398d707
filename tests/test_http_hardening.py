"""The HTTP adapter tried as an attacker would (issue 19 items 5 and 7, issue 17's limits and
forwarded identity): real OpenBao, the recording upstream of test_http_adapter.py (an aiohttp
server), and real clients (curl, aiohttp, raw TLS sockets where a client library would fix the
request up before sending it)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from tests.test_http_adapter import (  # the fixtures (env, upstream) with them
    DEADLINE_SECONDS,
    SERVICE,
    Env,
    env,  # noqa: F401
    poll,
    upstream,  # noqa: F401
)

# --------------------------------------------------------------------------- helpers


async def open_tls(e: Env, address: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = address.rsplit(":", 1)
    return await asyncio.open_connection(host, int(port), ssl=e.client(), server_hostname=host)


# --------------------------------------------------------------------------- issue 19 item 5


async def test_a_client_vanishing_mid_body_is_one_info_line_naming_the_peer(
    env: Env,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Any client can cut its upload short: that must not be an ERROR with a traceback per
    connection (a log flood), but one info line saying who did it."""
    caplog.set_level(logging.INFO)
    peers: list[str] = []
    async with env.proxy() as p:
        for _ in range(3):
            _, writer = await open_tls(env, p.broker.address(SERVICE))
            host, port = writer.get_extra_info("sockname")[:2]
            peers.append(f"{host}:{port}")
            writer.write(
                b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n\r\n"
                + b"y" * 100_000
            )
            await writer.drain()
            await asyncio.wait_for(env.upstream.arrived.wait(), DEADLINE_SECONDS)
            env.upstream.arrived.clear()
            writer.transport.abort()

        async def all_recorded() -> bool:
            return len(p.events("request")) == 3

        await poll(all_recorded, "three request events")
    sidekey = [r for r in caplog.records if r.name.startswith("sidekey")]
    assert not [r for r in sidekey if r.levelno >= logging.ERROR or r.exc_info], [
        r.getMessage() for r in sidekey if r.levelno >= logging.ERROR or r.exc_info
    ]
    lines = [r for r in sidekey if "client error" in r.getMessage()]
    assert [r.levelno for r in lines] == [logging.INFO] * 3, [r.getMessage() for r in lines]
    for peer, line in zip(peers, lines, strict=True):
        assert f"peer={peer}" in line.getMessage()
        assert "disconnected mid-request" in line.getMessage()
