"""A workload that changes its lease user's password (issue 19.1).

PostgreSQL lets any role change its own password, so a workload can `ALTER ROLE CURRENT_USER
PASSWORD '...'` through the broker and then log in directly. The defences tested here:

- the broker notices (28P01 on its next login with that lease), audits `credential_tampered`,
  revokes the lease (which drops the role and ends the direct session) and retries once with
  a fresh lease, so the identity is not locked out until the lease expires;
- the deployment of docs/adapters/postgres.md: lease users may log in only from the broker's
  address (a real pg_hba.conf rule), so the new password is useless from anywhere else.
"""

from __future__ import annotations

import json
from pathlib import Path

import asyncpg
import pytest

from tests.faults import FaultyRelay
from tests.pki import DEFAULT_CLIENT_ID, Pki
from tests.servers import CREATION_STATEMENTS, LEASE_GROUP, REVOCATION_STATEMENTS, VaultDatabase
from tests.test_postgres_adapter import (
    REVOKE_DEADLINE,
    SERVICE,
    World,
    asyncpg_connect,
    service,
    wait_for,
)

TAMPERED = "chosen-by-the-workload-1"


@pytest.fixture
def world(
    tmp_path: Path, pki: Pki, vault_database: VaultDatabase, monkeypatch: pytest.MonkeyPatch
) -> World:
    return World(tmp_path, pki, vault_database, monkeypatch)


async def direct_login(world: World, user: str, password: str, source: str) -> asyncpg.Connection:
    """Log in to PostgreSQL without the broker, from loopback address `source`."""
    pg = world.vdb.postgres
    async with FaultyRelay(pg.host, pg.port, source_host=source) as relay:
        host, port = relay.address
        conn = await asyncpg.connect(
            host=host, port=port, user=user, password=password, database="appdb", ssl=False
        )
        # The relay is closed on exit; keep the connection only for a quick check.
        value = await conn.fetchval("SELECT current_user")
        await conn.close()
        return value


async def test_tampered_lease_is_revoked_audited_and_replaced(world: World) -> None:
    pg = world.vdb.postgres
    audit = world.tmp_path / "audit.jsonl"
    async with world.broker(service(pg), audit) as b:
        conn = await asyncpg_connect(b, world.pki, world.pki.client())
        first_user = await conn.fetchval("SELECT current_user")
        await conn.execute(f"ALTER ROLE CURRENT_USER PASSWORD '{TAMPERED}'")
        await conn.close()
        # The bypass this closes: the workload now knows a password of the lease user.
        assert await direct_login(world, first_user, TAMPERED, "127.0.0.1") == first_user

        # The next session of the identity would get 28P01 until the lease expired; now the
        # broker replaces the lease and the client does not notice.
        conn = await asyncpg_connect(b, world.pki, world.pki.client())
        second_user = await conn.fetchval("SELECT current_user")
        await conn.close()
        assert second_user != first_user and second_user.startswith("v-")

        async def first_role_dropped() -> bool:
            return first_user not in await pg.aroles()

        await wait_for(first_role_dropped, "the tampered lease's role to be revoked")
        with pytest.raises(asyncpg.InvalidPasswordError):
            await direct_login(world, first_user, TAMPERED, "127.0.0.1")
    events = [json.loads(line) for line in audit.read_text().splitlines()]
    tampered = [e for e in events if e["event"] == "credential_tampered"]
    assert len(tampered) == 1
    event = tampered[0]
    assert event["spiffe_id"] == DEFAULT_CLIENT_ID and event["service"] == SERVICE
    assert event["lease_id"] and event["upstream_sqlstate"] == "28P01"
    starts = [e for e in events if e["event"] == "session_start"]
    assert [e["upstream_user"] for e in starts] == [first_user, second_user]
    assert starts[0]["lease_id"] == event["lease_id"] != starts[1]["lease_id"]
    ends = [e for e in events if e["event"] == "session_end"]
    assert [e["outcome"] for e in ends] == ["ok", "ok"]
    assert TAMPERED not in audit.read_text()


async def test_pg_hba_lets_lease_users_in_only_from_the_broker(world: World) -> None:
    """The deployment that closes the bypass, with a real pg_hba.conf: lease users belong to
    a group role that may log in only from the broker's address (tests/servers.py writes the
    rules; 127.0.0.2 stands for any other host)."""
    vdb = world.vdb
    role = "app-hba"
    vdb.client().secrets.database.create_role(
        name=role,
        db_name=vdb.connection,
        creation_statements=[*CREATION_STATEMENTS, f'GRANT {LEASE_GROUP} TO "{{{{name}}}}";'],
        revocation_statements=REVOCATION_STATEMENTS,
        default_ttl="1h",
        max_ttl="2h",
        mount_point=vdb.mount,
    )
    pg = vdb.postgres
    svc = service(pg, credentials={"from": "vault-database", "role": role})
    async with world.broker(svc) as b:
        conn = await asyncpg_connect(b, world.pki, world.pki.client())
        user = await conn.fetchval("SELECT current_user")
        assert await conn.fetchval("SELECT pg_has_role(current_user, $1, 'MEMBER')", LEASE_GROUP)
        await conn.execute(f"ALTER ROLE CURRENT_USER PASSWORD '{TAMPERED}'")
        await conn.close()
        # From another address the right password is of no use: pg_hba.conf rejects it.
        with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError) as raised:
            await direct_login(world, user, TAMPERED, "127.0.0.2")
        assert "pg_hba.conf rejects connection" in str(raised.value)
        # The broker's own address still works (and heals the tampered lease).
        conn = await asyncpg_connect(b, world.pki, world.pki.client())
        assert (await conn.fetchval("SELECT current_user")) != user
        await conn.close()

    async def no_lease_roles() -> bool:
        rows = await pg.admin_fetch(
            "SELECT count(*) AS n FROM pg_auth_members m JOIN pg_roles r ON r.oid = m.roleid "
            "WHERE r.rolname = $1",
            LEASE_GROUP,
        )
        return bool(rows[0]["n"] == 0)

    await wait_for(no_lease_roles, "every lease user to be revoked", REVOKE_DEADLINE)
