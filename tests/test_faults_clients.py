"""PostgreSQL clients that vanish (issue 19, "Faults"): the connection is reset (RST) by the
client mid-handshake (inside TLS), mid-login (right after its StartupMessage, while the broker
logs in upstream) and mid-query (while the server runs it).

Each time the broker keeps serving another client, writes one audit event that says how the
connection ended, leaves no upstream backend behind (pg_stat_activity: a query the vanished
client left running is cancelled, where the server alone would run it to its end), logs no
warning or traceback, and revokes every lease at shutdown (no role left in pg_roles).
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import ssl
import struct
import time
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from broker.runtime import Broker
from tests.brokers import base_config, running_broker
from tests.pki import Pki, client_ssl_context
from tests.servers import Postgres, VaultDatabase
from tests.test_postgres_adapter import OTHER_ID, asyncpg_connect, host_port, service

SSL_REQUEST = struct.pack("!ii", 8, 80877103)
PARTIAL_HELLO = b"\x16\x03\x01\x02\x00" + b"\x01\x00\x01\xfc\x03\x03" + bytes(10)
# How long the server-side traces of a vanished client may take to go (a loaded box).
GONE_WITHIN = 20.0
SLEEP_SECONDS = 60  # longer than the test: the backend must be ended, not finish


def _startup() -> bytes:
    params = b"user\0ignored\0database\0appdb\0\0"
    return struct.pack("!ii", 8 + len(params), 196608) + params


def _rst(writer: asyncio.StreamWriter) -> None:
    """Vanish: close with SO_LINGER 0, so the broker gets an RST, as from a dead host."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def _tls_client(b: Broker, pki: Pki) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = host_port(b)
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(SSL_REQUEST)
    assert await reader.readexactly(1) == b"S"
    ctx: ssl.SSLContext = client_ssl_context(pki, pki.client())
    await writer.start_tls(ctx, server_hostname="localhost")
    return reader, writer


async def _backends(pg: Postgres, query_like: str) -> list[Any]:
    return await pg.admin_fetch(
        "SELECT pid, usename, state FROM pg_stat_activity WHERE usename LIKE 'v-%' "
        "AND query LIKE $1",
        query_like,
        database="postgres",
    )


async def _until(predicate: Any, what: str) -> None:
    end = time.monotonic() + GONE_WITHIN
    while not await predicate():
        if time.monotonic() > end:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.2)


def _active(b: Broker) -> float:
    value = b.metrics.registry.get_sample_value("sidekey_sessions_active", {"service": "orders-db"})
    return value or 0.0


@pytest.mark.timeout(90)
@pytest.mark.parametrize("when", ["mid_handshake", "mid_login", "mid_query"])
async def test_vanishing_client_leaves_nothing_behind(  # noqa: PLR0917
    when: str,
    tmp_path: Path,
    pki: Pki,
    vault_database: VaultDatabase,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    bao, pg = vault_database.openbao, vault_database.postgres
    audit = tmp_path / "audit.jsonl"
    config = base_config(pki, services=[service(pg)], vault=bao, audit=audit, admin=False)
    roles_before = await pg.aroles()
    marker = f"sidekey-vanish-{when}"
    async with running_broker(tmp_path, config, monkeypatch, bao) as b:
        other = await asyncpg_connect(b, pki, pki.client(OTHER_ID))
        try:
            if when == "mid_handshake":
                host, port = host_port(b)
                reader, writer = await asyncio.open_connection(host, port)
                writer.write(SSL_REQUEST)
                assert await reader.readexactly(1) == b"S"
                writer.write(PARTIAL_HELLO)
                await writer.drain()
                _rst(writer)
            elif when == "mid_login":
                _, writer = await _tls_client(b, pki)
                writer.write(_startup())
                await writer.drain()
                _rst(writer)
            else:
                conn = await asyncpg_connect(b, pki, pki.client())
                task = asyncio.ensure_future(
                    conn.execute(f"SELECT pg_sleep({SLEEP_SECONDS}), '{marker}'")
                )

                async def running() -> bool:
                    return bool(await _backends(pg, f"%{marker}%"))

                await _until(running, "the query to run")
                transport = conn._transport  # the client process dies: its socket is reset
                transport.get_extra_info("socket").setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
                transport.abort()
                with pytest.raises(asyncpg.ConnectionDoesNotExistError):
                    await task

            # Served meanwhile and after.
            assert await other.fetchval("SELECT 1") == 1

            async def settled() -> bool:
                return _active(b) == 1 and not await _backends(pg, f"%{marker}%")

            await _until(settled, "the vanished client's session and backend to end")
            assert await other.fetchval("SELECT 2") == 2
        finally:
            await other.close()
    events = [json.loads(line) for line in audit.read_text().splitlines()]
    if when == "mid_handshake":
        denials = [e for e in events if e["event"] == "deny"]
        assert len(denials) == 1 and "TLS handshake" in denials[0]["reason"], denials
    else:
        ends = [e for e in events if e["event"] == "session_end" and e.get("peer") != ""]
        outcomes = sorted(e["outcome"] for e in ends)
        assert len(ends) == 2, ends  # the other client's and the vanished one's
        assert "ok" in outcomes, outcomes
        if when == "mid_query":
            vanished = [e for e in ends if e["outcome"] != "ok"]
            assert vanished and vanished[0].get("upstream_cancelled") is True, ends
    # A client can vanish at will: that is no warning, and never a traceback.
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING and r.name != "asyncio"]
    assert not loud, [r.getMessage() for r in loud]
    assert "Traceback" not in caplog.text
    assert await pg.aroles() == roles_before
