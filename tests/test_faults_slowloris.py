"""1,000 half-open TLS handshakes (slowloris) against the PostgreSQL adapter (issue 19,
"Faults"): each connection sends an SSLRequest, gets its 'S', starts a TLS record and stops;
and against an HTTP service, where TLS starts with the first byte.

- an allowed client still connects and queries while all 1,000 are held open;
- each stuck handshake is closed by the handshake (hello) timeout, and audited as a denial
  that says why; none is let through, no lease is taken for one;
- the default of that timeout is at most 10 s (PostgreSQL and HTTP); the test shortens it
  to stay quick.
"""

from __future__ import annotations

import asyncio
import json
import resource
import struct
from pathlib import Path

import pytest

from adapters.http import adapter as http_adapter
from adapters.postgres import PostgresAdapter
from broker.config import DEFAULT_REFUSAL_LINES_PER_MINUTE
from broker.session.lifecycle import DEFAULT_HELLO_TIMEOUT
from tests.brokers import base_config, running_broker
from tests.pki import Pki, client_ssl_context
from tests.servers import OpenBao, VaultDatabase
from tests.test_http_adapter import SERVICE as HTTP_SERVICE
from tests.test_http_adapter import (
    Upstream,
    call,
    http_service,
    new_secret,
    upstream,  # noqa: F401  (a fixture)
)
from tests.test_postgres_adapter import asyncpg_connect, host_port, service

STUCK = 1000
# Connections opened at once: under the listener's accept backlog, so none waits for a SYN
# retransmission.
BATCH = 100
# The shortened handshake timeout: long enough to open all 1,000 and serve the allowed client
# on a loaded 2-core box, short enough to keep the test quick.
HELLO_TIMEOUT = 6.0
# How long past the timeout the last stuck connection may take to be closed (a loaded box).
CLOSE_SLACK = 15.0
SSL_REQUEST = struct.pack("!ii", 8, 80877103)
# A TLS handshake record header announcing 512 bytes, and 16 of them: a ClientHello that never
# ends.
PARTIAL_HELLO = b"\x16\x03\x01\x02\x00" + b"\x01\x00\x01\xfc\x03\x03" + bytes(10)


def test_handshake_timeout_defaults_are_at_most_10_s() -> None:
    assert DEFAULT_HELLO_TIMEOUT <= 10.0
    assert PostgresAdapter.hello_timeout <= 10.0
    assert http_adapter.TLS_HANDSHAKE_TIMEOUT_SECONDS <= 10.0


def _enough_descriptors(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {needed} descriptors this test needs")
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


async def _stuck(host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(SSL_REQUEST)
    assert await reader.readexactly(1) == b"S"
    writer.write(PARTIAL_HELLO)
    await writer.drain()
    return reader, writer


async def _closed(reader: asyncio.StreamReader) -> bool:
    try:
        return await reader.read(1) == b""
    except ConnectionError:
        return True


@pytest.mark.timeout(120)
async def test_slowloris_tls_handshakes_are_closed_and_others_served(
    tmp_path: Path,
    pki: Pki,
    vault_database: VaultDatabase,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Both ends of every connection live in this process, plus the broker's and the fixtures'.
    _enough_descriptors(2 * STUCK + 1024)
    monkeypatch.setattr(PostgresAdapter, "hello_timeout", HELLO_TIMEOUT)
    bao, pg = vault_database.openbao, vault_database.postgres
    audit = tmp_path / "audit.jsonl"
    config = base_config(pki, services=[service(pg)], vault=bao, audit=audit, admin=False)
    roles_before = await pg.aroles()
    stuck: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        async with running_broker(tmp_path, config, monkeypatch, bao) as b:
            host, port = host_port(b)
            for _ in range(STUCK // BATCH):
                stuck += await asyncio.gather(*(_stuck(host, port) for _ in range(BATCH)))
            # Served while every stuck handshake is still held open.
            conn = await asyncpg_connect(b, pki, pki.client())
            try:
                assert await conn.fetchval("SELECT 1") == 1
            finally:
                await conn.close()
            assert not any(reader.at_eof() for reader, _ in stuck)
            # Then each one is closed by the handshake timeout.
            closed = await asyncio.wait_for(
                asyncio.gather(*(_closed(reader) for reader, _ in stuck)),
                HELLO_TIMEOUT + CLOSE_SLACK,
            )
            assert all(closed)
    finally:
        for _, writer in stuck:
            writer.close()
    events = [json.loads(line) for line in audit.read_text().splitlines()]
    denials = [e for e in events if e["event"] == "deny"]
    # One peer address: the first audit.refusal_lines_per_minute refusals in full, the rest
    # counted in one line (written at the stop, the minute not over).
    assert len(denials) == DEFAULT_REFUSAL_LINES_PER_MINUTE
    assert all("did not finish the TLS handshake" in e["reason"] for e in denials), denials[0]
    [summary] = [e for e in events if e["event"] == "deny_suppressed"]
    assert summary["refusals"] == STUCK - DEFAULT_REFUSAL_LINES_PER_MINUTE, summary
    assert "did not finish the TLS handshake" in summary["reason"], summary
    assert await pg.aroles() == roles_before


async def _stuck_tls(host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(PARTIAL_HELLO)
    await writer.drain()
    return reader, writer


@pytest.mark.timeout(120)
async def test_slowloris_against_https_is_closed_and_others_served(
    tmp_path: Path,
    pki: Pki,
    openbao: OpenBao,
    upstream: Upstream,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same flood against an HTTP service: TLS from the first byte, so each connection
    sends 16 bytes of a ClientHello and stops; the listener's TLS handshake timeout closes it
    (before any request exists, so there is no audit event: nothing was asked)."""
    _enough_descriptors(2 * STUCK + 1024)
    monkeypatch.setattr(http_adapter, "TLS_HANDSHAKE_TIMEOUT_SECONDS", HELLO_TIMEOUT)
    kv = new_secret(openbao, upstream)
    config = base_config(pki, services=[http_service(upstream.url, kv.path)], vault=openbao)
    stuck: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        async with running_broker(tmp_path, config, monkeypatch, openbao) as b:
            host, _, port = b.address(HTTP_SERVICE).rpartition(":")
            for _ in range(STUCK // BATCH):
                stuck += await asyncio.gather(*(_stuck_tls(host, int(port)) for _ in range(BATCH)))
            ctx = client_ssl_context(pki, pki.client())
            reply = await call(ctx, f"https://{b.address(HTTP_SERVICE)}/orders")
            assert reply.status == 200, reply
            assert not any(reader.at_eof() for reader, _ in stuck)
            closed = await asyncio.wait_for(
                asyncio.gather(*(_closed(reader) for reader, _ in stuck)),
                HELLO_TIMEOUT + CLOSE_SLACK,
            )
            assert all(closed)
            # Still serving after the flood.
            assert (await call(ctx, f"https://{b.address(HTTP_SERVICE)}/orders")).status == 200
    finally:
        for _, writer in stuck:
            writer.close()
