"""PostgreSQL 17's direct TLS and libpq's strict authentication options (issue 21.4).

libpq 17+ comes from the drivers' own wheels: psycopg-binary bundles libpq 18, psycopg2-binary
libpq 17 (Debian 12's psql is 15, which has neither option). Raw ClientHellos from Python's
ssl module show what a client without ALPN `postgresql` gets.
"""

from __future__ import annotations

import asyncio
import ssl
import struct
from pathlib import Path

import psycopg
import psycopg2
import pytest

from broker.codecs.postgres import BackendParser, ErrorResponse
from tests.pki import Pki, client_ssl_context
from tests.servers import VaultDatabase
from tests.test_postgres_adapter import World, host_port, mtls_dsn, service

PROTOCOL_3_0 = 196608


@pytest.fixture
def world(
    tmp_path: Path, pki: Pki, vault_database: VaultDatabase, monkeypatch: pytest.MonkeyPatch
) -> World:
    return World(tmp_path, pki, vault_database, monkeypatch)


def startup_packet(**params: str) -> bytes:
    body = b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in params.items()) + b"\0"
    return struct.pack("!II", 8 + len(body), PROTOCOL_3_0) + body


async def first_reply(
    host: str, port: int, ctx: ssl.SSLContext, packet: bytes
) -> tuple[str | None, list[object]]:
    """Open with a ClientHello (no SSLRequest), send `packet`; the ALPN the broker chose
    and every message it sent until it hung up (or went quiet)."""
    reader, writer = await asyncio.open_connection(host, port, ssl=ctx, server_hostname="localhost")
    try:
        ssl_object = writer.get_extra_info("ssl_object")
        alpn = ssl_object.selected_alpn_protocol()
        writer.write(packet)
        parser = BackendParser()
        messages: list[object] = []
        while True:
            try:
                data = await asyncio.wait_for(reader.read(65536), 10)
            except (ConnectionError, ssl.SSLError):
                break
            if not data:
                break
            parser.feed(data)
            while (message := parser.next_message()) is not None:
                messages.append(message)
            if parser.finished or any(isinstance(m, ErrorResponse) for m in messages):
                break
        return alpn, messages
    finally:
        writer.close()


async def test_libpq_17_and_18_direct_tls_on_the_same_listener(world: World) -> None:
    pki = world.pki
    async with world.broker(service(world.vdb.postgres)) as b:
        dsn = mtls_dsn(b, pki, pki.client())
        # libpq 18 (psycopg 3): direct, and the classic SSLRequest on the same port.
        for negotiation in ("direct", "postgres"):
            conn = await psycopg.AsyncConnection.connect(f"{dsn} sslnegotiation={negotiation}")
            async with conn:
                cur = await conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
                assert await cur.fetchone() == (True,), negotiation

        # libpq 17 (psycopg2), in a thread: it blocks.
        def psycopg2_direct() -> object:
            with psycopg2.connect(f"{dsn} sslnegotiation=direct") as conn, conn.cursor() as cur:
                cur.execute("SELECT current_user")
                return cur.fetchone()

        row = await asyncio.to_thread(psycopg2_direct)
        assert isinstance(row, tuple) and str(row[0]).startswith("v-")


async def test_direct_tls_needs_alpn_postgresql(world: World) -> None:
    pki = world.pki
    issued = pki.client()
    async with world.broker(service(world.vdb.postgres)) as b:
        host, port = host_port(b)
        packet = startup_packet(user="x", database="appdb")
        without = client_ssl_context(pki, issued)
        alpn, messages = await first_reply(host, port, without, packet)
        assert alpn is None
        [error] = [m for m in messages if isinstance(m, ErrorResponse)]
        assert error.sqlstate == "08P01" and "ALPN protocol 'postgresql'" in (error.message or "")
        other = client_ssl_context(pki, issued)
        other.set_alpn_protocols(["http/1.1"])
        alpn, messages = await first_reply(host, port, other, packet)
        assert alpn is None and any(isinstance(m, ErrorResponse) for m in messages)
        # With the ALPN and no certificate: in the protocol, what is missing.
        bare = client_ssl_context(pki, None)
        bare.set_alpn_protocols(["postgresql"])
        alpn, messages = await first_reply(host, port, bare, packet)
        assert alpn == "postgresql"
        [error] = [m for m in messages if isinstance(m, ErrorResponse)]
        assert error.sqlstate == "28000" and "no client certificate" in (error.message or "")


async def test_strict_libpq_auth_options(world: World) -> None:
    """require_auth=none works with mTLS; scram-sha-256 and channel_binding=require cannot
    be met by a broker whose callers hold no password, and libpq says so in its own words
    (docs/drivers.md quotes them; the server has no say in them)."""
    pki = world.pki
    async with world.broker(service(world.vdb.postgres)) as b:
        dsn = mtls_dsn(b, pki, pki.client())
        async with await psycopg.AsyncConnection.connect(f"{dsn} require_auth=none") as conn:
            assert await (await conn.execute("SELECT 1")).fetchone() == (1,)
        with pytest.raises(psycopg.OperationalError) as raised:
            await psycopg.AsyncConnection.connect(f"{dsn} require_auth=scram-sha-256")
        assert 'authentication method requirement "scram-sha-256" failed' in str(raised.value)
        with pytest.raises(psycopg.OperationalError) as raised:
            await psycopg.AsyncConnection.connect(f"{dsn} channel_binding=require")
        assert "channel binding required" in str(raised.value)
