"""Upstream servers restarted under load (issue 19, "Faults"): a real stop and start of the
session's PostgreSQL (pg_ctl restart -m fast), MariaDB and redis-server (SIGTERM, started
again on their ports) while clients keep connecting through the broker.

- while the server is down, a client gets a clear error in its protocol (PostgreSQL: the
  server's own 57P01 relayed to a session it ends, the broker's 08001 to one that cannot
  connect; Redis: an -ERR naming the service) or, mid-session, its connection closed;
- the broker needs no restart: sessions succeed again once the server is back. A Redis
  restart drops the vault's dynamic users (they are not in its config): the broker replaces
  the lease the server now refuses (WRONGPASS) and retries once, instead of failing every
  connection until the lease's TTL;
- no lease or dynamic user is left after shutdown (pg_roles, mysql.user, ACL USERS), and
  nothing secret is in an error a client got or in the log.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import pymysql
import pytest
import redis.exceptions

from tests.brokers import base_config, running_broker
from tests.pki import Pki
from tests.servers import VaultDatabase, restart_postgres
from tests.servers_mysql_redis import (
    MariaDB,
    RedisServer,
    VaultEngine,
    restart_mariadb,
    restart_redis,
)
from tests.test_mysql_adapter import connect as mysql_connect
from tests.test_mysql_adapter import query as mysql_query
from tests.test_mysql_adapter import service as mysql_service
from tests.test_postgres_adapter import asyncpg_connect
from tests.test_postgres_adapter import service as pg_service
from tests.test_redis_adapter import client as redis_client
from tests.test_redis_adapter import service as redis_service

CLIENTS = 4
# Sessions that must succeed before the restart, and again after it.
BEFORE, AFTER = 10, 10
DEADLINE = 60.0


@dataclass
class Load:
    """CLIENTS loops of one short session each, counting successes and keeping errors."""

    session: Callable[[], Awaitable[None]]
    expected: tuple[type[BaseException], ...]
    ok: int = 0
    errors: list[BaseException] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def _loop(self) -> None:
        while not self.stop.is_set():
            try:
                await self.session()
                self.ok += 1
            except self.expected as exc:
                self.errors.append(exc)
                await asyncio.sleep(0.05)

    async def until(self, count: int, what: str) -> None:
        end = time.monotonic() + DEADLINE
        while self.ok < count:
            if time.monotonic() > end:
                pytest.fail(f"timed out waiting for {what} ({self.ok} ok, {self.errors[-3:]})")
            await asyncio.sleep(0.05)

    async def run_around(self, restart: Callable[[], None]) -> None:
        tasks = [asyncio.create_task(self._loop()) for _ in range(CLIENTS)]
        try:
            await self.until(BEFORE, "sessions before the restart")
            await asyncio.to_thread(restart)
            after = self.ok + AFTER
            await self.until(after, "sessions after the restart, without restarting the broker")
        finally:
            self.stop.set()
            await asyncio.gather(*tasks)


@pytest.mark.timeout(120)
async def test_postgres_restarted_under_load(
    tmp_path: Path,
    pki: Pki,
    vault_database: VaultDatabase,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    bao, pg = vault_database.openbao, vault_database.postgres
    config = base_config(pki, services=[pg_service(pg)], vault=bao, admin=False)
    roles_before = await pg.aroles()
    async with running_broker(tmp_path, config, monkeypatch, bao) as b:

        async def session() -> None:
            conn = await asyncpg_connect(b, pki, pki.client())
            try:
                for _ in range(5):
                    assert await conn.fetchval("SELECT 1") == 1
            finally:
                await conn.close()

        # InternalClientError: asyncpg's own reaction when the server's 57P01 reaches an idle
        # connection (the splice relays the server's bytes as they are, as without a broker).
        load = Load(session, (asyncpg.PostgresError, asyncpg.InternalClientError, OSError))
        await load.run_around(lambda: restart_postgres(pg))
    assert load.errors, "the restart went unnoticed: the test did not test anything"
    for exc in load.errors:
        if isinstance(exc, asyncpg.PostgresError) and getattr(exc, "sqlstate", None):
            # 08003: asyncpg's own, for a session the server ended with its 57P01 message.
            assert exc.sqlstate in {"57P01", "08001", "57P03", "08006", "08003"}, exc
            assert str(exc), repr(exc)
    assert await pg.aroles() == roles_before
    told = "\n".join(map(str, load.errors)) + caplog.text
    for secret in (bao.token, pg.passwords["vaultadmin"]):
        assert secret not in told


@pytest.mark.timeout(120)
async def test_redis_restarted_under_load(  # noqa: PLR0917
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
    async with running_broker(tmp_path, config, monkeypatch, bao) as b:

        async def session() -> None:
            r = redis_client(b, pki, pki.client())
            try:
                for i in range(5):
                    assert await r.set(f"fault-{i}", "x")
            finally:
                await r.aclose()

        load = Load(session, (redis.exceptions.RedisError, OSError))
        await load.run_around(lambda: restart_redis(redis_server))
        replaced = b.metrics.registry.get_sample_value(
            "sidekey_upstream_errors_total",
            {"service": "orders-cache", "kind": "credential_tampered"},
        )
        # Each session that met the refused lease counts; one new lease replaced it.
        assert replaced is not None and 1 <= replaced <= CLIENTS, replaced
    created = [r for r in caplog.records if r.getMessage().startswith("lease created")]
    assert len(created) == 2, [r.getMessage() for r in created]
    # (The restart is quick: a client may see no error at all; the replaced lease above
    # shows it happened.)
    for exc in load.errors:
        assert str(exc), repr(exc)
    assert redis_server.users() == users_before
    told = "\n".join(map(str, load.errors)) + caplog.text
    for secret in (bao.token, redis_server.passwords["vaultadmin"]):
        assert secret not in told


@pytest.mark.timeout(120)
async def test_mariadb_restarted_under_load(  # noqa: PLR0917
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
    async with running_broker(tmp_path, config, monkeypatch, bao) as b:

        def one() -> None:
            conn = mysql_connect(b, pki, pki.client())
            try:
                for _ in range(5):
                    assert mysql_query(conn, "SELECT 1") == ((1,),)
            finally:
                conn.close()

        async def session() -> None:
            await asyncio.wait_for(asyncio.to_thread(one), DEADLINE)

        load = Load(session, (pymysql.MySQLError, OSError))
        await load.run_around(lambda: restart_mariadb(mariadb))
    assert load.errors, "the restart went unnoticed: the test did not test anything"
    for exc in load.errors:
        assert str(exc), repr(exc)
    assert mariadb.users() == users_before
    told = "\n".join(map(str, load.errors)) + caplog.text
    for secret in (bao.token, mariadb.passwords["vaultadmin"]):
        assert secret not in told
