"""`upstream.set_role` (issue 21.3): objects made through the broker belong to a stable group
role, so a schema migration still works after the lease that made the tables is revoked.

Real OpenBao dynamic roles whose creation statements grant the group role, real PostgreSQL,
psql and Django `migrate` (psycopg 3) through the broker; a broker restart revokes every
lease (the dynamic user is dropped and its objects reassigned), as in production.
"""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest

from tests.compat import django_project
from tests.pki import Pki
from tests.servers import APP_RW_DEFAULT_TTL, APP_RW_MAX_TTL, VaultDatabase
from tests.test_postgres_adapter import World, host_port, mtls_dsn, psql, service

OWNER = "orders_owner"
OWNER_ROLE = "app-owner"
# What docs/adapters/postgres.md tells operators to configure, word for word.
OWNER_CREATION = [
    """CREATE ROLE "{{name}}" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}' """
    """IN ROLE orders_owner;""",
]
OWNER_REVOCATION = [
    """SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{{name}}';""",
    """REASSIGN OWNED BY "{{name}}" TO orders_owner;""",
    """DROP OWNED BY "{{name}}";""",
    """DROP ROLE IF EXISTS "{{name}}";""",
]
# Without a group role: what a lease's user made goes to the vault's admin when revoked.
PLAIN_CREATION = [
    """CREATE ROLE "{{name}}" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}' """
    """IN ROLE orders_owner;""",
]
PLAIN_REVOCATION = [
    """SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{{name}}';""",
    """REASSIGN OWNED BY "{{name}}" TO vaultadmin;""",
    """DROP OWNED BY "{{name}}";""",
    """DROP ROLE IF EXISTS "{{name}}";""",
]


@pytest.fixture
def world(
    tmp_path: Path, pki: Pki, vault_database: VaultDatabase, monkeypatch: pytest.MonkeyPatch
) -> World:
    return World(tmp_path, pki, vault_database, monkeypatch)


def owner_schema(vdb: VaultDatabase, *, group_revocation: bool = True) -> str:
    """The group role (once), a fresh schema it owns, and the vault role granting it."""
    pg = vdb.postgres
    pg.psql(
        f"DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{OWNER}') THEN "
        f"CREATE ROLE {OWNER} NOLOGIN; END IF; END $$; GRANT CONNECT ON DATABASE appdb TO {OWNER}",
        database="appdb",
    )
    schema = f"mig_{secrets.token_hex(4)}"
    pg.psql(f"CREATE SCHEMA {schema} AUTHORIZATION {OWNER}", database="appdb")
    vdb.client().secrets.database.create_role(
        name=OWNER_ROLE,
        db_name=vdb.connection,
        creation_statements=OWNER_CREATION if group_revocation else PLAIN_CREATION,
        revocation_statements=OWNER_REVOCATION if group_revocation else PLAIN_REVOCATION,
        default_ttl=APP_RW_DEFAULT_TTL,
        max_ttl=APP_RW_MAX_TTL,
        mount_point=vdb.mount,
    )
    return schema


def owner_service(world: World, *, set_role: bool) -> dict[str, object]:
    svc = service(world.vdb.postgres, credentials={"from": "vault-database", "role": OWNER_ROLE})
    if set_role:
        svc["upstream"]["set_role"] = OWNER  # type: ignore[index]
    return svc


async def test_alter_table_after_the_lease_is_revoked(world: World) -> None:
    pki, pg = world.pki, world.vdb.postgres
    schema = owner_schema(world.vdb)
    svc = owner_service(world, set_role=True)
    async with world.broker(svc) as b:
        dsn = mtls_dsn(b, pki, pki.client())
        code, out, err = await psql(
            dsn,
            f"CREATE TABLE {schema}.orders (id int); SELECT current_user || ' ' || session_user",
        )
        assert code == 0, err
        current, first_user = out.split()[-2:]
        assert current == OWNER and first_user.startswith("v-"), out
    assert first_user not in await pg.aroles(), "the shutdown revoked the lease"
    async with world.broker(svc) as b:
        code, out, err = await psql(
            mtls_dsn(b, pki, pki.client()),
            f"ALTER TABLE {schema}.orders ADD COLUMN note text; SELECT session_user",
        )
        assert code == 0, err
        assert out.strip() != first_user
    owner = pg.psql(
        f"SELECT tableowner FROM pg_tables WHERE schemaname = '{schema}'", database="appdb"
    )
    assert owner.strip() == OWNER


async def test_django_migrate_twice_across_a_lease_revocation(world: World) -> None:
    pki, pg = world.pki, world.vdb.postgres
    schema = owner_schema(world.vdb)
    svc = owner_service(world, set_role=True)
    issued = pki.client()
    project = world.tmp_path / "django"
    for step, migrations in enumerate((["0001_initial"], ["0001_initial", "0002_note"])):
        async with world.broker(svc) as b:
            host, port = host_port(b)
            database = django_project.database_settings(
                host, port, bundle=pki.bundle, cert=issued.cert, key=issued.key, schema=schema
            )
            django_project.write_project(project, database, migrations)
            code, out = await django_project.migrate(project)
            assert code == 0, out
            assert f"Applying compatapp.{migrations[-1]}... OK" in out, out
        users = await pg.aroles()
        assert not any(u.startswith("v-token-app-owner") for u in users), (step, users)
    columns = pg.psql(
        f"SELECT column_name FROM information_schema.columns WHERE table_schema = '{schema}' "
        "AND table_name = 'compatapp_order' ORDER BY column_name",
        database="appdb",
    )
    assert columns.split() == ["id", "item", "note"]


async def test_without_set_role_the_next_lease_cannot_alter(world: World) -> None:
    """What the setting is for: without it the table belongs to the lease's user, is handed
    to the vault's admin when the lease goes, and the next user may not alter it."""
    pki = world.pki
    schema = owner_schema(world.vdb, group_revocation=False)
    svc = owner_service(world, set_role=False)
    async with world.broker(svc) as b:
        dsn = mtls_dsn(b, pki, pki.client())
        code, _, err = await psql(dsn, f"CREATE TABLE {schema}.t (i int)")
        assert code == 0, err
    async with world.broker(svc) as b:
        code, _, err = await psql(
            mtls_dsn(b, pki, pki.client()), f"ALTER TABLE {schema}.t ADD COLUMN j int"
        )
        assert code != 0 and "must be owner of table t" in err, err


async def test_a_role_the_user_may_not_take_is_a_clear_refusal(world: World) -> None:
    pki = world.pki
    owner_schema(world.vdb)
    svc = owner_service(world, set_role=False)
    svc["upstream"]["set_role"] = "vaultadmin"  # type: ignore[index]
    async with world.broker(svc) as b:
        code, _, err = await psql(mtls_dsn(b, pki, pki.client()), "SELECT 1")
    assert code != 0
    assert "SET ROLE vaultadmin (upstream.set_role) failed" in err, err
    assert 'permission denied to set role "vaultadmin"' in err, err
