"""MariaDB and Redis clients that vanish (issue 19, "Faults"), as tests/test_faults_clients.py
does for PostgreSQL: the client's connection is reset (RST) mid-handshake (inside TLS) and
mid-query (MariaDB: SELECT SLEEP(60); Redis: BLPOP on an empty list for 60 s).

Each time another client keeps being served, the vanished client's upstream connection is
gone from the server (information_schema.processlist, CLIENT LIST) well before the query
would have ended, nothing is logged above info, and no dynamic user is left after shutdown.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import struct
import time
from pathlib import Path
from typing import Any

import pytest

from broker.runtime import Broker
from tests.brokers import base_config, running_broker
from tests.pki import Pki, client_ssl_context
from tests.servers_mysql_redis import MariaDB, RedisServer, VaultEngine
from tests.test_mysql_adapter import SERVICE as MYSQL_SERVICE
from tests.test_mysql_adapter import connect as mysql_connect
from tests.test_mysql_adapter import query as mysql_query
from tests.test_mysql_adapter import service as mysql_service
from tests.test_redis_adapter import OTHER_ID
from tests.test_redis_adapter import SERVICE as REDIS_SERVICE
from tests.test_redis_adapter import service as redis_service

GONE_WITHIN = 20.0
BLOCK_SECONDS = 60
# A MySQL SSLRequest (seq 1): CLIENT_PROTOCOL_41 | CLIENT_SSL | CLIENT_SECURE_CONNECTION.
SSL_REQUEST = struct.pack("<I", 32)[:3] + b"\x01" + struct.pack("<IIB23x", 0x8A00, 1 << 24, 33)
PARTIAL_HELLO = b"\x16\x03\x01\x02\x00" + b"\x01\x00\x01\xfc\x03\x03" + bytes(10)


def _rst(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


async def _until(predicate: Any, what: str) -> None:
    end = time.monotonic() + GONE_WITHIN
    while not await predicate():
        if time.monotonic() > end:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.2)


def _address(b: Broker, name: str) -> tuple[str, int]:
    host, _, port = b.address(name).rpartition(":")
    return host, int(port)


def _quiet(caplog: pytest.LogCaptureFixture) -> None:
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING and r.name != "asyncio"]
    assert not loud, [r.getMessage() for r in loud]


@pytest.mark.timeout(90)
@pytest.mark.parametrize("when", ["mid_handshake", "mid_query"])
async def test_vanishing_mysql_client(  # noqa: PLR0917
    when: str,
    tmp_path: Path,
    pki: Pki,
    mariadb: MariaDB,
    vault_mysql: VaultEngine,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    bao = vault_mysql.openbao
    config = base_config(
        pki, services=[mysql_service(mariadb, vault_mysql)], vault=bao, admin=False
    )
    users_before = mariadb.users()
    marker = f"sidekey-vanish-{when}"
    async with running_broker(tmp_path, config, monkeypatch, bao) as b:
        other = await asyncio.to_thread(mysql_connect, b, pki, pki.client(OTHER_ID))
        try:
            if when == "mid_handshake":
                # The broker greets first; the client asks for TLS, sends part of a hello, dies.
                reader, writer = await asyncio.open_connection(*_address(b, MYSQL_SERVICE))
                assert await asyncio.wait_for(reader.read(4096), 30)  # the greeting
                writer.write(SSL_REQUEST + PARTIAL_HELLO)
                await writer.drain()
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()
            else:
                conn = await asyncio.to_thread(mysql_connect, b, pki, pki.client())
                raw = conn._sock
                task = asyncio.ensure_future(
                    asyncio.to_thread(
                        mysql_query, conn, f"SELECT SLEEP({BLOCK_SECONDS}), '{marker}'"
                    )
                )

                async def running() -> bool:
                    return bool(await asyncio.to_thread(_processes, mariadb, marker))

                await _until(running, "the query to run")
                assert raw is not None
                _rst(raw)
                with pytest.raises(Exception):  # noqa: B017 - whatever pymysql raises
                    await task

            assert await asyncio.to_thread(mysql_query, other, "SELECT 1") == ((1,),)

            async def gone() -> bool:
                return not await asyncio.to_thread(_processes, mariadb, marker)

            await _until(gone, "the vanished client's query to end on the server")
            assert await asyncio.to_thread(mysql_query, other, "SELECT 2") == ((2,),)
        finally:
            other.close()
    _quiet(caplog)
    assert mariadb.users() == users_before


def _processes(db: MariaDB, marker: str) -> str:
    return db.sql(
        "SELECT ID FROM information_schema.processlist "
        f"WHERE INFO LIKE '%{marker}%' AND INFO NOT LIKE '%processlist%'"
    ).strip()


@pytest.mark.timeout(90)
@pytest.mark.parametrize("when", ["mid_handshake", "mid_query"])
async def test_vanishing_redis_client(  # noqa: PLR0917
    when: str,
    tmp_path: Path,
    pki: Pki,
    redis_server: RedisServer,
    vault_redis: VaultEngine,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    bao = vault_redis.openbao
    config = base_config(
        pki, services=[redis_service(redis_server, vault_redis)], vault=bao, admin=False
    )
    users_before = redis_server.users()
    key = f"sidekey-vanish-{when}"
    async with running_broker(tmp_path, config, monkeypatch, bao) as b:
        host, port = _address(b, REDIS_SERVICE)
        if when == "mid_handshake":
            sock = socket.create_connection((host, port))
            sock.sendall(PARTIAL_HELLO)
            _rst(sock)
        else:
            ctx: ssl.SSLContext = client_ssl_context(pki, pki.client())
            _, writer = await asyncio.open_connection(
                host, port, ssl=ctx, server_hostname="localhost"
            )
            writer.write(f"BLPOP {key} {BLOCK_SECONDS}\r\n".encode())
            await writer.drain()

            async def blocked() -> bool:
                return "cmd=blpop" in redis_server.command("CLIENT", "LIST")

            await _until(blocked, "the BLPOP to block")
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()

            async def gone() -> bool:
                return "cmd=blpop" not in redis_server.command("CLIENT", "LIST")

            await _until(gone, "the vanished client's BLPOP to end on the server")
        # Served after.
        ctx2 = client_ssl_context(pki, pki.client(OTHER_ID))
        reader2, writer2 = await asyncio.open_connection(
            host, port, ssl=ctx2, server_hostname="localhost"
        )
        writer2.write(b"PING\r\n")
        assert await asyncio.wait_for(reader2.readline(), 30) == b"+PONG\r\n"
        writer2.close()
    _quiet(caplog)
    assert redis_server.users() == users_before
