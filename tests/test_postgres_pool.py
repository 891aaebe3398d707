"""Upstream session reuse (`pool:`, broker/session/pool.py, the PostgreSQL reset step):
real PostgreSQL, leases from real OpenBao, psql and asyncpg connecting and disconnecting as
applications that connect per request do. Which server backend served a client is the
server's own answer (`pg_backend_pid()`), and what is left of a backend the server's
pg_stat_activity.
"""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest

from broker.runtime import Broker
from tests.test_postgres_adapter import (
    OTHER_ID,
    SERVICE,
    World,
    asyncpg_connect,
    mtls_dsn,
    psql,
    service,
    wait_for,
)
from tests.test_postgres_adapter import world as world_fixture

world = world_fixture  # the same fixture, under its name here

POOL = {"mode": "session", "size": 4, "idle": "60s", "wait": "2s"}


def pooled(world: World, **extra: Any) -> dict[str, Any]:
    return service(world.vdb.postgres, pool={**POOL, **extra})


async def backend_pid(broker: Broker, world: World, spiffe_id: str | None = None) -> int:
    """Connect, ask the server which backend this is, disconnect (asyncpg sends Terminate)."""
    conn = await asyncpg_connect(broker, world.pki, world.pki.client(spiffe_id))
    try:
        pid: int = await conn.fetchval("SELECT pg_backend_pid()")
        return pid
    finally:
        await conn.close()


async def backend_alive(world: World, pid: int) -> bool:
    rows = await world.vdb.postgres.admin_fetch(
        "SELECT 1 FROM pg_stat_activity WHERE pid = $1", pid
    )
    return bool(rows)


def pool_state(broker: Broker) -> dict[str, Any]:
    described = broker.services[SERVICE].adapter.describe_pool()
    assert described is not None
    return described


def idle_count(broker: Broker) -> int:
    return sum(k["idle"] for k in pool_state(broker)["keys"])


async def returned(broker: Broker, n: int) -> None:
    async def enough() -> bool:
        return idle_count(broker) == n

    await wait_for(enough, f"{n} idle pooled connections", deadline=10)


async def test_connect_query_disconnect_twice_reuses_one_backend(world: World) -> None:
    async with world.broker(pooled(world)) as broker:
        first = await backend_pid(broker, world)
        await returned(broker, 1)
        assert await backend_pid(broker, world) == first
        await returned(broker, 1)
        # psql too (its own startup parameters: a key of its own), twice, one backend.
        dsn = mtls_dsn(broker, world.pki, world.pki.client())
        code, out1, err = await psql(dsn, "SELECT pg_backend_pid()")
        assert code == 0, err
        await returned(broker, 2)
        code, out2, err = await psql(dsn, "SELECT pg_backend_pid()")
        assert code == 0, err
        assert out1.strip() == out2.strip() and int(out1) != first
        await returned(broker, 2)
        metrics = broker.metrics.pool_checkouts
        assert metrics.labels(SERVICE, "reused").value == 2
        assert metrics.labels(SERVICE, "new").value == 2
        assert broker.metrics.pool_connections.labels(SERVICE, "idle").value == 2
        inventory = broker.inventory()["services"][0]["pool"]
        assert inventory["size"] == POOL["size"] and len(inventory["keys"]) == 2


async def test_another_identity_never_gets_the_backend(world: World) -> None:
    async with world.broker(pooled(world)) as broker:
        mine = await backend_pid(broker, world)
        await returned(broker, 1)
        theirs = await backend_pid(broker, world, OTHER_ID)
        assert theirs != mine
        await returned(broker, 2)
        assert await backend_pid(broker, world) == mine
        assert await backend_pid(broker, world, OTHER_ID) == theirs


async def test_an_open_transaction_is_never_reused(world: World) -> None:
    async with world.broker(pooled(world)) as broker:
        conn = await asyncpg_connect(broker, world.pki, world.pki.client())
        pid = await conn.fetchval("SELECT pg_backend_pid()")
        await conn.execute("BEGIN")
        await conn.execute("CREATE TABLE pool_txn_probe (x int)")
        await conn.close()  # Terminate inside the transaction: the broker holds it back

        async def closed() -> bool:
            return not await backend_alive(world, pid)

        await wait_for(closed, "the backend in a transaction to be closed")
        assert idle_count(broker) == 0
        assert broker.metrics.pool_closed.labels(SERVICE, "not_idle").value == 1
        assert await backend_pid(broker, world) != pid
        # A failed transaction (status E) is not idle either.
        conn = await asyncpg_connect(broker, world.pki, world.pki.client())
        pid = await conn.fetchval("SELECT pg_backend_pid()")
        await conn.execute("BEGIN")
        with pytest.raises(asyncpg.PostgresError):
            await conn.execute("SELECT 1/0")
        await conn.close()
        await wait_for(closed, "the backend of a failed transaction to be closed")


async def test_session_state_does_not_leak_to_the_next_client(world: World) -> None:
    async with world.broker(pooled(world)) as broker:
        conn = await asyncpg_connect(broker, world.pki, world.pki.client())
        pid = await conn.fetchval("SELECT pg_backend_pid()")
        await conn.execute("SET search_path TO pg_catalog")
        await conn.execute("SET statement_timeout = '1234s'")
        await conn.execute("CREATE TEMP TABLE leak_probe (secret text)")
        await conn.execute("INSERT INTO leak_probe VALUES ('from the last client')")
        await conn.execute("PREPARE leak_stmt AS SELECT 42")
        await conn.execute("LISTEN leak_channel")
        assert await conn.fetchval("SELECT pg_try_advisory_lock(4242)")
        # asyncpg's own named prepared statements too (its statement cache).
        assert await conn.fetchval("SELECT $1::int + 1", 1) == 2
        await conn.close()
        await returned(broker, 1)

        conn = await asyncpg_connect(broker, world.pki, world.pki.client())
        try:
            assert await conn.fetchval("SELECT pg_backend_pid()") == pid, "the same backend"
            assert await conn.fetchval("SHOW search_path") == '"$user", public'
            assert await conn.fetchval("SHOW statement_timeout") == "0"
            assert await conn.fetchval("SELECT to_regclass('pg_temp.leak_probe')") is None
            # (asyncpg prepares each of these queries itself: only the last client's count.)
            assert await conn.fetchval(
                "SELECT count(*) FROM pg_prepared_statements WHERE name = 'leak_stmt'"
            ) == 0  # fmt: skip
            assert await conn.fetchval("SELECT count(*) FROM pg_listening_channels()") == 0
            assert await conn.fetchval(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = $1", pid
            ) == 0  # fmt: skip
            # Preparing the same statement again works: asyncpg's names were freed.
            assert await conn.fetchval("SELECT $1::int + 1", 1) == 2
        finally:
            await conn.close()


async def test_a_revoked_lease_or_offboarding_empties_the_pool(world: World) -> None:
    async with world.broker(pooled(world)) as broker:
        pid = await backend_pid(broker, world)
        await returned(broker, 1)
        source = broker.services[SERVICE].context.credentials
        revoked = await source.revoke_identity("spiffe://example.org/ns/prod/sa/orders")
        assert revoked, "the identity's lease was revoked"
        assert idle_count(broker) == 0
        assert broker.metrics.pool_closed.labels(SERVICE, "lease_ended").value == 1

        async def closed() -> bool:
            return not await backend_alive(world, pid)

        await wait_for(closed, "the pooled backend of the revoked lease to end")
        # The next session gets a new lease and a new backend.
        assert await backend_pid(broker, world) != pid
        await returned(broker, 1)
        # A reload whose policy no longer allows the identity closes its pooled connection.
        entries = [e for e in broker.live if e.kind == "pooled"]
        assert len(entries) == 1
        assert broker.close_entry(entries[0], "offboarded: test", "offboard") == 1
        assert idle_count(broker) == 0


async def test_a_full_pool_makes_the_next_client_wait_then_refuses(world: World) -> None:
    async with world.broker(pooled(world, size=1, wait="1s")) as broker:
        held = await asyncpg_connect(broker, world.pki, world.pki.client())
        with pytest.raises(asyncpg.PostgresError, match=r"pool\.size"):
            await asyncpg_connect(broker, world.pki, world.pki.client())
        assert broker.metrics.pool_waits.labels(SERVICE).value == 1
        assert broker.metrics.pool_checkouts.labels(SERVICE, "full").value == 1
        pid = await held.fetchval("SELECT pg_backend_pid()")
        await held.close()
        await returned(broker, 1)
        assert await backend_pid(broker, world) == pid


async def test_shutdown_closes_pooled_connections_before_revoking(world: World) -> None:
    async with world.broker(pooled(world)) as broker:
        pid = await backend_pid(broker, world)
        await returned(broker, 1)
    assert not await backend_alive(world, pid)


def test_pool_config_is_checked() -> None:
    from broker.config.pool import parse_pool
    from broker.config.section import Section
    from broker.errors import ConfigError

    assert parse_pool(Section({"idle": "500ms", "wait": 3}, "pool")).idle == 0.5
    with pytest.raises(ConfigError, match=r"pool\.idle: must be a duration"):
        parse_pool(Section({"idle": "soon"}, "pool"))
    with pytest.raises(ConfigError, match=r"pool\.mode: must be one of session"):
        parse_pool(Section({"mode": "transaction"}, "pool"))


def test_pool_on_an_adapter_that_cannot_reset_is_refused(tmp_path: Any, pki: Any) -> None:
    from broker.config import load_config
    from broker.errors import ConfigError
    from tests.brokers import base_config, write_config

    svc = {
        "name": "api", "adapter": "http", "listen": "127.0.0.1:0",
        "upstream": {"url": "http://127.0.0.1:9"},
        "credentials": {"from": "env", "fields": {"token": "X"}},
        "inject": {"headers": {"Authorization": "Bearer {token}"}},
        "allow": ["spiffe://example.org/ns/prod/sa/orders"], "pool": POOL,
    }  # fmt: skip
    config = load_config(write_config(tmp_path, base_config(pki, services=[svc])))
    with pytest.raises(ConfigError, match=r"services\[0\]\.pool: the http adapter does not"):
        Broker(config)


async def test_pooled_sessions_keep_the_password_change_guard(world: World) -> None:
    """The guard sees the client's bytes first, the pool's tracker what the guard forwards."""
    svc = pooled(world)
    svc["guard"] = {"deny_password_change": True}
    async with world.broker(svc) as broker:
        for _ in range(2):
            conn = await asyncpg_connect(broker, world.pki, world.pki.client())
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute("ALTER ROLE CURRENT_USER PASSWORD 'mine-now'")
            pid = await conn.fetchval("SELECT pg_backend_pid()")
            await conn.close()
            await returned(broker, 1)
        assert broker.metrics.pool_checkouts.labels(SERVICE, "reused").value == 1
        assert await backend_pid(broker, world) == pid


async def test_a_lease_reaching_its_end_empties_the_pool(world: World) -> None:
    """app-short: 6 s leases renewable to 20 s. Near its max TTL the lease is retired (new
    sessions get a fresh one), and its pooled backend goes with it, before the role does."""
    svc = pooled(world)
    svc["credentials"] = {"from": "vault-database", "role": world.vdb.short_role}
    async with world.broker(svc) as broker:
        conn = await asyncpg_connect(broker, world.pki, world.pki.client())
        pid = await conn.fetchval("SELECT pg_backend_pid()")
        user = await conn.fetchval("SELECT current_user")
        await conn.close()
        await returned(broker, 1)

        async def emptied() -> bool:
            return idle_count(broker) == 0 and not await backend_alive(world, pid)

        await wait_for(emptied, "the pool to let the ending lease's backend go", deadline=40)
        assert broker.metrics.pool_closed.labels(SERVICE, "lease_ended").value == 1
        conn = await asyncpg_connect(broker, world.pki, world.pki.client())
        try:
            assert await conn.fetchval("SELECT current_user") != user, "a fresh lease"
        finally:
            await conn.close()


async def test_a_pooled_backend_the_server_ended_is_replaced_and_pooled_again(
    world: World,
) -> None:
    """A pooled backend ended while idle (pg_terminate_backend, as a restart does): the next
    client gets a new backend, and that one is pooled and reused in turn."""
    async with world.broker(pooled(world)) as broker:
        first = await backend_pid(broker, world)
        await returned(broker, 1)
        await world.vdb.postgres.admin_fetch("SELECT pg_terminate_backend($1)", first)

        async def gone() -> bool:
            return not await backend_alive(world, first)

        await wait_for(gone, "the pooled backend to be terminated")
        second = await backend_pid(broker, world)
        assert second != first
        await returned(broker, 1)
        assert await backend_pid(broker, world) == second
        closed = broker.metrics.pool_closed.labels(SERVICE, "upstream_closed").value
        assert closed == 1
