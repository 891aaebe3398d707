"""LeaseManager against real OpenBao + PostgreSQL: per-identity leases and their lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

import asyncpg
import pytest

from broker.credentials import Credential
from broker.credentials.leases import LeaseManager
from broker.credentials.vault import VaultClient
from broker.errors import CredentialUnavailable
from broker.identity import local_identity
from broker.observe.metrics import Metrics
from tests.servers import OpenBao, Postgres, VaultDatabase, configure_database

ALICE = local_identity("spiffe://example.org/ns/test/sa/alice")
BOB = local_identity("spiffe://example.org/ns/test/sa/bob")
CAROL = local_identity("spiffe://example.org/ns/test/sa/carol")

# Generous: OpenBao's expiration manager and PostgreSQL both answer in milliseconds, but CI
# boxes stall.
DEADLINE_SECONDS = 20.0


async def eventually(check: Callable[[], Awaitable[bool] | bool], what: str) -> None:
    """Poll `check` until it holds, or fail after DEADLINE_SECONDS."""
    deadline = time.monotonic() + DEADLINE_SECONDS
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for: {what}")
        await asyncio.sleep(0.05)


def events(metrics: Metrics, event: str) -> float:
    value = metrics.registry.get_sample_value(
        "sidekey_leases_total", {"service": "db", "event": event}
    )
    return value or 0.0


@pytest.fixture
async def vault(vault_database: VaultDatabase):
    client = VaultClient(vault_database.openbao.address, vault_database.openbao.token)
    yield client
    await client.close()


async def login(pg: Postgres, cred: Credential) -> str:
    conn = await asyncpg.connect(
        pg.dsn(cred.fields["username"], cred.fields["password"], ssl="verify-full")
    )
    try:
        return str(await conn.fetchval("SELECT current_user"))
    finally:
        await conn.close()


async def test_one_lease_per_identity(vault_database: VaultDatabase, vault: VaultClient) -> None:
    pg, metrics = vault_database.postgres, Metrics()
    leases = LeaseManager("db", vault, vault_database.mount, vault_database.role, metrics)
    try:
        async with leases.use(ALICE) as a1:
            assert await login(pg, a1) == a1.fields["username"]
            assert a1.ref.lease_id and a1.ref.lease_id == leases.lease_id(ALICE)
            async with leases.use(ALICE) as a2:  # a second connection of the same workload
                assert a2.fields == a1.fields
        async with leases.use(ALICE) as a3:
            assert a3.fields["username"] == a1.fields["username"]
        async with leases.use(BOB) as b:
            assert b.fields["username"] != a1.fields["username"]
            assert await login(pg, b) == b.fields["username"]

        # Concurrent first connections of a new identity share one read.
        async def carol() -> str:
            async with leases.use(CAROL) as cred:
                return cred.fields["username"]

        names = await asyncio.gather(*(carol() for _ in range(10)))
        assert len(set(names)) == 1
        assert events(metrics, "created") == 3
        users = {a1.fields["username"], b.fields["username"], names[0]}
        assert users <= await pg.aroles()
    finally:
        await leases.close()
    # close() revokes every lease: the engine dropped the roles.
    assert not users & await pg.aroles()
    assert events(metrics, "revoked") == 3
    with pytest.raises(CredentialUnavailable, match="closed"):
        async with leases.use(ALICE):
            pass


async def test_lease_is_renewed(vault_database: VaultDatabase, vault: VaultClient) -> None:
    role = vault_database.create_role("lease-renew", "6s", "1h")
    metrics = Metrics()
    leases = LeaseManager("db", vault, vault_database.mount, role, metrics, renew_fraction=0.25)
    try:
        async with leases.use(ALICE) as cred:
            lease_id = cred.ref.lease_id
            before = vault_database.client().sys.read_lease(lease_id)["data"]
            assert before["last_renewal"] is None
            await eventually(lambda: events(metrics, "renewed") >= 2, "two renewals")
            after = vault_database.client().sys.read_lease(lease_id)["data"]
            assert after["last_renewal"] is not None
            assert after["expire_time"] > before["expire_time"]
            assert leases.lease_id(ALICE) == lease_id
            assert await login(vault_database.postgres, cred) == cred.fields["username"]
    finally:
        await leases.close()


async def test_idle_lease_is_revoked(vault_database: VaultDatabase, vault: VaultClient) -> None:
    pg, metrics = vault_database.postgres, Metrics()
    leases = LeaseManager(
        "db", vault, vault_database.mount, vault_database.role, metrics, idle_timeout=0.5
    )
    try:
        async with leases.use(ALICE) as cred:
            username = cred.fields["username"]
            await asyncio.sleep(0.7)  # in use for longer than idle_timeout: not idle
            assert leases.lease_id(ALICE) == cred.ref.lease_id
        assert username in await pg.aroles()

        async def gone() -> bool:
            return username not in await pg.aroles()

        await eventually(gone, "idle lease revoked and its role dropped")
        assert events(metrics, "revoked") == 1
        assert leases.lease_id(ALICE) is None
        async with leases.use(ALICE) as again:
            assert again.fields["username"] != username
    finally:
        await leases.close()


async def test_near_max_ttl_new_connections_get_a_fresh_lease(
    vault_database: VaultDatabase, vault: VaultClient
) -> None:
    pg, metrics = vault_database.postgres, Metrics()
    role = vault_database.create_role("lease-max", "4s", "8s")
    leases = LeaseManager(
        "db", vault, vault_database.mount, role, metrics, renew_fraction=0.5, min_remaining=0.5
    )
    try:
        async with leases.use(BOB) as bob_old:
            pass  # Bob's lease is kept (not idle yet) but nobody holds it
        async with leases.use(ALICE) as old:
            old_id = old.ref.lease_id
            await eventually(lambda: leases.lease_id(ALICE) is None, "Alice's lease retired")
            assert events(metrics, "renewed") >= 1
            # A new connection gets a fresh lease; the open session keeps the old one.
            async with leases.use(ALICE) as new:
                assert new.ref.lease_id != old_id
                assert new.fields["username"] != old.fields["username"]
                assert await login(pg, new) == new.fields["username"]
            assert old.fields["username"] in await pg.aroles()
            # Bob's retired lease had no user: revoked at once.
            await eventually(lambda: leases.lease_id(BOB) is None, "Bob's lease retired")

            async def bob_gone() -> bool:
                return bob_old.fields["username"] not in await pg.aroles()

            await eventually(bob_gone, "Bob's retired, unused lease revoked")
            # The old session's lease runs out at its max TTL.
            await eventually(lambda: events(metrics, "expired") >= 1, "old lease expired")

            async def old_gone() -> bool:
                return old.fields["username"] not in await pg.aroles()

            await eventually(old_gone, "OpenBao revoked the expired lease")
    finally:
        await leases.close()


async def test_vault_down_existing_lease_served_new_identity_fails_closed(
    openbao_factory: Callable[[], OpenBao],
    postgres: Postgres,
    caplog: pytest.LogCaptureFixture,
) -> None:
    bao = openbao_factory()
    vdb = configure_database(bao, postgres)
    vault = VaultClient(bao.address, bao.token, timeout=2.0)
    metrics = Metrics()
    leases = LeaseManager("db", vault, vdb.mount, vdb.role, metrics)
    usernames: list[str] = []
    try:
        async with leases.use(ALICE) as before:
            usernames.append(before.fields["username"])
        bao.stop()
        async with leases.use(ALICE) as after:
            assert after.fields == before.fields
            assert await login(postgres, after) == before.fields["username"]
        with pytest.raises(CredentialUnavailable, match=r"cannot reach .*vault\.address") as info:
            async with leases.use(BOB):
                pass
        assert before.fields["password"] not in str(info.value)
        await leases.close()  # revocation fails (vault down): logged, not raised
        assert "revocation failed" in caplog.text
    finally:
        await leases.close()
        await vault.close()
        # The dead OpenBao can no longer revoke its roles; drop them by hand.
        for name in usernames:
            postgres.psql(
                f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{name}';"
            )
            postgres.psql(f'DROP OWNED BY "{name}"; DROP ROLE IF EXISTS "{name}";', "appdb")


async def test_password_never_in_repr_or_logs(
    vault_database: VaultDatabase, vault: VaultClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    role = vault_database.create_role("lease-logs", "4s", "1h")
    leases = LeaseManager(
        "db", vault, vault_database.mount, role, Metrics(), renew_fraction=0.25, idle_timeout=60
    )
    seen: list[str] = []
    try:
        async with leases.use(ALICE) as cred:
            seen.append(cred.fields["password"])
            for text in (repr(cred), str(cred), repr(leases), leases.describe()):
                assert cred.fields["password"] not in text
            await eventually(lambda: "lease renewed" in caplog.text, "a renewal logged")
    finally:
        await leases.close()
    assert "lease created" in caplog.text and "lease revoked" in caplog.text
    for password in seen:
        assert password not in caplog.text


async def test_prime_checks_token(vault_database: VaultDatabase) -> None:
    good = VaultClient(vault_database.openbao.address, vault_database.openbao.token)
    bad = VaultClient(vault_database.openbao.address, "bogus-token")
    try:
        await LeaseManager("db", good, "database", "app-rw", Metrics()).prime()
        with pytest.raises(CredentialUnavailable, match="permission denied"):
            await LeaseManager("db", bad, "database", "app-rw", Metrics()).prime()
    finally:
        with contextlib.suppress(Exception):
            await good.close()
            await bad.close()


async def test_unknown_role_fails_closed(vault: VaultClient) -> None:
    leases = LeaseManager("db", vault, "database", "no-such-role", Metrics())
    with pytest.raises(CredentialUnavailable, match="unknown role"):
        async with leases.use(ALICE):
            pass
    await leases.close()
