"""Smoke tests for the real-server fixtures in tests/servers.py."""

from __future__ import annotations

import subprocess

import asyncpg
import pytest

from tests.servers import OpenBao, Postgres, VaultDatabase


def test_openbao_kv_roundtrip(openbao: OpenBao) -> None:
    client = openbao.client()
    assert client.is_authenticated()
    client.secrets.kv.v2.create_or_update_secret(
        path="smoke/kv", secret={"user": "u", "token": "t"}
    )
    read = client.secrets.kv.v2.read_secret_version(path="smoke/kv", raise_on_deleted_version=True)
    assert read["data"]["data"] == {"user": "u", "token": "t"}
    assert read["data"]["metadata"]["version"] == 1


def test_openbao_factory_is_independent(openbao: OpenBao, openbao_factory) -> None:
    other = openbao_factory()
    assert other.address != openbao.address and other.token != openbao.token
    assert other.client().is_authenticated()
    other.stop()
    assert not other.running
    assert openbao.client().is_authenticated()


def test_postgres_admin_and_users(postgres: Postgres) -> None:
    assert {"postgres", "vaultadmin", "md5_user", "plain_user"} <= postgres.roles()
    assert postgres.psql("SHOW password_encryption").strip() == "scram-sha-256"
    stored = postgres.psql("SELECT rolpassword FROM pg_authid WHERE rolname = 'md5_user'")
    assert stored.startswith("md5")


async def test_postgres_auth_methods(postgres: Postgres) -> None:
    p = postgres.passwords
    # SCRAM over verified TLS.
    conn = await asyncpg.connect(postgres.dsn("app_user", p["app_user"], ssl="verify-full"))
    try:
        assert await conn.fetchval("SELECT current_user") == "app_user"
        assert await conn.fetchval("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
    finally:
        await conn.close()
    # MD5 without TLS.
    conn = await asyncpg.connect(postgres.dsn("md5_user", p["md5_user"], ssl="disable"))
    try:
        assert await conn.fetchval("SELECT current_user") == "md5_user"
    finally:
        await conn.close()
    # Cleartext password only over TLS.
    conn = await asyncpg.connect(postgres.dsn("plain_user", p["plain_user"], ssl="verify-full"))
    await conn.close()
    with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError):
        await asyncpg.connect(postgres.dsn("plain_user", p["plain_user"], ssl="disable"))
    records = await postgres.admin_fetch("SELECT 1 AS one")
    assert records[0]["one"] == 1


async def test_dynamic_credentials_log_in(vault_database: VaultDatabase) -> None:
    pg = vault_database.postgres
    client = vault_database.client()
    resp = client.secrets.database.generate_credentials(
        vault_database.role, mount_point=vault_database.mount
    )
    user, password = resp["data"]["username"], resp["data"]["password"]
    assert resp["lease_duration"] > 0 and resp["renewable"]
    assert user in await pg.aroles()
    conn = await asyncpg.connect(pg.dsn(user, password, ssl="verify-full"))
    try:
        await conn.execute("CREATE TABLE IF NOT EXISTS smoke (id int)")
        assert await conn.fetchval("SELECT current_user") == user
    finally:
        await conn.close()
    # psql, as users run it.
    out = subprocess.run(
        ["psql", "-X", "-At", pg.dsn(user, password, ssl="verify-full"), "-c", "SELECT 42"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "42"
    client.sys.revoke_lease(resp["lease_id"])
    assert user not in pg.roles()
