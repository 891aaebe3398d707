"""The backend PID a client sees is the server's own (issue 21.2), while the cancel secret
stays the broker's: a CancelRequest needs the broker's key, reaches only that session's
upstream connection, and over mTLS only from the session's own identity.

Real clients: asyncpg (get_server_pid, a NOTIFY's sender pid), psycopg 3 (info.backend_pid,
cancel), against pg_backend_pid() on the real server.
"""

from __future__ import annotations

import asyncio
import struct
from pathlib import Path

import psycopg
import pytest

from tests.pki import Pki, client_ssl_context
from tests.servers import VaultDatabase
from tests.test_postgres_adapter import (
    OTHER_ID,
    World,
    asyncpg_connect,
    host_port,
    mtls_dsn,
    service,
)


@pytest.fixture
def world(
    tmp_path: Path, pki: Pki, vault_database: VaultDatabase, monkeypatch: pytest.MonkeyPatch
) -> World:
    return World(tmp_path, pki, vault_database, monkeypatch)


CANCEL_REQUEST_CODE = 80877102
SSL_REQUEST_CODE = 80877103


async def test_asyncpg_sees_the_server_pid_and_its_own_notifies(world: World) -> None:
    pki = world.pki
    async with world.broker(service(world.vdb.postgres)) as b:
        conn = await asyncpg_connect(b, pki, pki.client())
        try:
            assert conn.get_server_pid() == await conn.fetchval("SELECT pg_backend_pid()")
            heard: asyncio.Queue[int] = asyncio.Queue()
            await conn.add_listener("compat_pid", lambda _c, pid, _ch, _p: heard.put_nowait(pid))
            await conn.execute("NOTIFY compat_pid, 'self'")
            sender = await asyncio.wait_for(heard.get(), 10)
            assert sender == conn.get_server_pid(), "code that skips its own NOTIFYs works"
        finally:
            await conn.close()


async def test_psycopg_backend_pid_and_cancel(world: World) -> None:
    pki = world.pki
    async with world.broker(service(world.vdb.postgres)) as b:
        dsn = mtls_dsn(b, pki, pki.client())
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            cur = await conn.execute("SELECT pg_backend_pid()")
            row = await cur.fetchone()
            assert row is not None and conn.info.backend_pid == row[0]
            query = asyncio.create_task(conn.execute("SELECT pg_sleep(30)"))
            await asyncio.sleep(0.5)
            await conn.cancel_safe(timeout=10)
            with pytest.raises(psycopg.errors.QueryCanceled):
                await asyncio.wait_for(query, 10)


async def test_the_real_pid_alone_cancels_nothing(world: World) -> None:
    """The pid is now public knowledge (pg_stat_activity shows it): without the broker's
    secret, or from another identity over mTLS, a CancelRequest is ignored."""
    pki = world.pki
    async with world.broker(service(world.vdb.postgres)) as b:
        conn = await asyncpg_connect(b, pki, pki.client())
        try:
            pid, secret = conn.get_server_pid(), conn._protocol.backend_secret
            query = asyncio.create_task(conn.fetchval("SELECT pg_sleep(1.5)"))
            await asyncio.sleep(0.3)
            host, port = host_port(b)
            # Plaintext, a guessed secret.
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(struct.pack("!iiI", 16, CANCEL_REQUEST_CODE, pid) + b"\0\0\0\1")
            assert await reader.read() == b""
            writer.close()
            # The right key, from another identity over mTLS.
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(struct.pack("!II", 8, SSL_REQUEST_CODE))
            assert await reader.readexactly(1) == b"S"
            await writer.start_tls(client_ssl_context(pki, pki.client(OTHER_ID)))
            writer.write(struct.pack("!iii", 16, CANCEL_REQUEST_CODE, pid) + _secret(secret))
            assert await reader.read() == b""
            writer.close()
            assert await query is None, "the query ran to its end"
        finally:
            await conn.close()


def _secret(secret: object) -> bytes:
    # asyncpg keeps the BackendKeyData secret as an int (protocol 3.0's 4 bytes).
    return struct.pack("!i", secret) if isinstance(secret, int) else bytes(secret)  # type: ignore[call-overload]
