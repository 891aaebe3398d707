"""The broker's own vault token over its life, through a running broker: a max TTL shorter
than the test, a token revoked from outside, a vault that is down, readiness, metrics, and
revocation at shutdown after the leases. Real OpenBao, real PostgreSQL, asyncpg clients.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import hvac
import pytest

from broker.runtime import Broker
from tests.brokers import base_config, running_broker
from tests.pki import DEFAULT_CLIENT_ID, Pki, client_ssl_context
from tests.servers import (
    OpenBao,
    Postgres,
    VaultDatabase,
    configure_database,
    free_port,
    start_openbao,
)
from tests.vault_roles import approle, broker_policy

SERVICE = "orders-db"
OTHER_ID = "spiffe://example.org/ns/prod/sa/billing"
CLIENT_TIMEOUT = 30.0
DEADLINE_SECONDS = 30.0


def pg_service(pg: Postgres, role: str = "app-rw") -> dict[str, Any]:
    return {
        "name": SERVICE,
        "adapter": "postgres",
        "listen": "127.0.0.1:0",
        "upstream": {
            "address": f"127.0.0.1:{pg.port}",
            "database": "appdb",
            "tls": {"mode": "verify-full", "ca": str(pg.ca_path)},
        },
        "credentials": {"from": "vault-database", "role": role, "idle_timeout": 60},
        "allow": [DEFAULT_CLIENT_ID, OTHER_ID],
    }


def approle_vault(bao: Any, mount: str, role_id: Path, secret_id: Path) -> dict[str, Any]:
    return {
        "address": bao.address,
        "auth": {
            "method": "approle",
            "mount": mount,
            "role_id_file": str(role_id),
            "secret_id_file": str(secret_id),
        },
    }


@asynccontextmanager
async def broker_with(
    tmp_path: Path, pki: Pki, vault: dict[str, Any], services: list[dict[str, Any]]
) -> AsyncIterator[Broker]:
    config = base_config(pki, services=services, audit=tmp_path / "audit.jsonl")
    config["vault"] = vault
    async with running_broker(tmp_path, config) as broker:
        yield broker


async def query_user(broker: Broker, pki: Pki, spiffe_id: str = DEFAULT_CLIENT_ID) -> str:
    host, _, port = broker.address(SERVICE).rpartition(":")
    conn = await asyncpg.connect(
        host=host,
        port=int(port),
        user="ignored",
        database="appdb",
        ssl=client_ssl_context(pki, pki.client(spiffe_id)),
        timeout=CLIENT_TIMEOUT,
    )
    try:
        return str(await conn.fetchval("SELECT current_user"))
    finally:
        await conn.close()


def sample(broker: Broker, name: str, **labels: str) -> float:
    return broker.metrics.registry.get_sample_value(name, labels) or 0.0


def audit(tmp_path: Path, event: str | None = None) -> list[dict[str, Any]]:
    path = tmp_path / "audit.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    events = [json.loads(line) for line in lines]
    return [e for e in events if event is None or e["event"] == event]


async def readyz(broker: Broker) -> tuple[int, dict[str, Any]]:
    assert broker.admin is not None
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://{broker.admin.address}/readyz") as resp,
    ):
        return resp.status, await resp.json()


async def eventually(predicate: Any, what: str, deadline: float = DEADLINE_SECONDS) -> Any:
    end = time.monotonic() + deadline
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if time.monotonic() > end:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def our_roles(roles: set[str]) -> set[str]:
    return {r for r in roles if r.startswith("v-")}


async def test_max_ttl_shorter_than_the_test_no_request_fails(
    vault_database: VaultDatabase, pki: Pki, tmp_path: Path
) -> None:
    """Token TTL 4 s, max TTL 10 s, 20 s of connections: the broker renews, logs in again
    before each token ends, and moves new connections to leases of the new token (the vault
    revokes an old token's leases when it ends)."""
    bao, pg = vault_database.openbao, vault_database.postgres
    before = our_roles(await pg.aroles())
    mount, role_id, secret_id = approle(bao, tmp_path, token_ttl="4s", token_max_ttl="10s")
    vault = approle_vault(bao, mount, role_id, secret_id)
    failures: list[str] = []
    users: list[str] = []
    async with broker_with(tmp_path, pki, vault, [pg_service(vault_database.postgres)]) as broker:
        end = time.monotonic() + 20.0
        while time.monotonic() < end:
            try:
                user = await query_user(broker, pki)
            except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
                failures.append(f"{time.monotonic() - end + 20:.1f}s: {exc!r}")
            else:
                if not users or users[-1] != user:
                    users.append(user)
            await asyncio.sleep(0.1)
        logins = sample(broker, "sidekey_vault_logins_total", method="approle", outcome="ok")
        renewals = sample(broker, "sidekey_vault_token_renewals_total", outcome="ok")
    assert failures == []
    assert logins >= 3, "logged in again before each max TTL"
    assert renewals >= 4
    assert len(users) >= 3, f"a fresh lease under each new token: {users}"
    # Shutdown revoked the current lease; older ones went with their tokens or were revoked.
    assert our_roles(await pg.aroles()) - before == set()


async def test_token_revoked_from_outside_leases_follow_the_new_token(
    vault_database: VaultDatabase, pki: Pki, tmp_path: Path
) -> None:
    """Revoking the broker's token revokes its leases (the database roles go); the broker's
    check finds the token gone, logs in again and hands out fresh leases."""
    bao, pg = vault_database.openbao, vault_database.postgres
    mount, role_id, secret_id = approle(bao, tmp_path, token_ttl="10m")
    vault = approle_vault(bao, mount, role_id, secret_id)
    async with broker_with(tmp_path, pki, vault, [pg_service(vault_database.postgres)]) as broker:
        first = await query_user(broker, pki)
        (login,) = audit(tmp_path, "vault_login")
        revoked_at = time.monotonic()
        bao.client().auth.token.revoke_accessor(login["accessor"])
        await eventually(lambda: first not in pg.roles(), "the lease revoked with the token")

        async def fresh_user() -> str | None:
            try:
                user = await query_user(broker, pki)
            except (OSError, asyncpg.PostgresError):
                return None
            return user if user != first else None

        second = await eventually(fresh_user, "a connection with a lease of the new token")
        recovered = time.monotonic() - revoked_at
        (lost,) = audit(tmp_path, "vault_token_invalid")
        assert lost["accessor"] == login["accessor"]
        logins = [e for e in audit(tmp_path, "vault_login") if e["outcome"] == "ok"]
        assert len(logins) == 2 and second in pg.roles()
    # The broker's check runs every TOKEN_CHECK_SECONDS (10 s): recovery within that + slack.
    assert recovered < 15.0


async def test_readiness_says_why_there_is_no_token_and_recovers(
    openbao: OpenBao, vault_database: VaultDatabase, pki: Pki, tmp_path: Path
) -> None:
    mount, role_id, secret_id = approle(openbao, tmp_path)
    good = secret_id.read_text()
    secret_id.write_text("wrong-secret-id")
    vault = approle_vault(openbao, mount, role_id, secret_id)
    async with broker_with(tmp_path, pki, vault, [pg_service(vault_database.postgres)]) as broker:
        status, body = await eventually(
            lambda: _failed_readyz(broker), "readiness with the login error"
        )
        assert status == 503 and body["ready"] is False
        error = body["vault"]["error"]
        assert "approle auth" in error and str(secret_id) in error
        assert "wrong-secret-id" not in json.dumps(body)
        assert sample(broker, "sidekey_vault_token_expiry_seconds") == 0
        assert sample(broker, "sidekey_vault_logins_total", method="approle", outcome="error") >= 1
        metrics = broker.metrics_text().decode()
        assert "wrong-secret-id" not in metrics

        secret_id.write_text(good)
        status, body = await eventually(
            lambda: _readyz_is(broker, 200), "readiness once the secret_id is right"
        )
        assert body["vault"]["ready"] is True and body["vault"]["token_expires_in"] > 0
        assert sample(broker, "sidekey_vault_token_expiry_seconds") > 0
    text = (tmp_path / "audit.jsonl").read_text()
    assert good not in text and "wrong-secret-id" not in text


async def _failed_readyz(broker: Broker) -> tuple[int, dict[str, Any]] | None:
    """/readyz once it reports a failed login (not just "not logged in yet")."""
    status, body = await readyz(broker)
    error = body.get("vault", {}).get("error", "")
    return (status, body) if error and "not logged in yet" not in error else None


async def _readyz_is(broker: Broker, want: int) -> tuple[int, dict[str, Any]] | None:
    status, body = await readyz(broker)
    return (status, body) if status == want else None


async def test_vault_down_at_start_backs_off_then_logs_in(
    postgres: Postgres, pki: Pki, tmp_path: Path
) -> None:
    """No vault yet: logins back off (not a tight loop) and readiness says "cannot reach";
    once the vault is up and the files are written, the broker logs in by itself."""
    port = free_port()
    address = f"http://127.0.0.1:{port}"
    role_id, secret_id = tmp_path / "role-id", tmp_path / "secret-id"
    role_id.write_text("not-yet")
    secret_id.write_text("not-yet")
    vault = {
        "address": address,
        "auth": {
            "method": "approle",
            "role_id_file": str(role_id),
            "secret_id_file": str(secret_id),
        },
    }
    bao: OpenBao | None = None
    try:
        async with broker_with(tmp_path, pki, vault, [pg_service(postgres)]) as broker:
            _, body = await eventually(lambda: _failed_readyz(broker), "not ready")
            assert "cannot reach" in body["vault"]["error"]
            await asyncio.sleep(4.0)
            attempts = sample(
                broker, "sidekey_vault_logins_total", method="approle", outcome="error"
            )
            # Doubling from 0.5 s with jitter: about five attempts in four seconds, never 40.
            assert 2 <= attempts <= 8, attempts

            bao = start_openbao(tmp_path / "late-openbao", port=port)
            configure_database(bao, postgres)
            root = bao.client()
            root.sys.enable_auth_method("approle")
            root.auth.approle.create_or_update_approle(
                "sidekey", token_policies=[broker_policy(bao)], token_no_default_policy=True
            )
            role_id.write_text(root.auth.approle.read_role_id("sidekey")["data"]["role_id"])
            secret_id.write_text(
                root.auth.approle.generate_secret_id("sidekey")["data"]["secret_id"]
            )
            await eventually(lambda: _readyz_is(broker, 200), "ready once the vault is up")
            assert (await query_user(broker, pki)).startswith("v-")
    finally:
        if bao is not None:
            bao.stop()


async def test_shutdown_revokes_the_token_after_the_leases(
    vault_database: VaultDatabase, pki: Pki, tmp_path: Path
) -> None:
    bao, pg = vault_database.openbao, vault_database.postgres
    mount, role_id, secret_id = approle(bao, tmp_path, token_ttl="10m")
    vault = approle_vault(bao, mount, role_id, secret_id)
    async with broker_with(tmp_path, pki, vault, [pg_service(vault_database.postgres)]) as broker:
        users = {await query_user(broker, pki), await query_user(broker, pki, OTHER_ID)}
        assert users <= pg.roles()
        (login,) = audit(tmp_path, "vault_login")
        metrics = broker.metrics
    # The lease manager revoked both leases itself (its token still valid then)...
    revoked = metrics.registry.get_sample_value(
        "sidekey_leases_total", {"service": SERVICE, "event": "revoked"}
    )
    assert revoked == 2
    assert not users & pg.roles()
    # ...and then the token was revoked, which the audit trail records after the sessions.
    with pytest.raises(hvac.exceptions.InvalidRequest):
        bao.client().auth.token.lookup_accessor(login["accessor"])
    events = audit(tmp_path)
    (at,) = [i for i, e in enumerate(events) if e["event"] == "vault_token_revoked"]
    assert events[at]["accessor"] == login["accessor"] and events[at]["outcome"] == "ok"
    ends = [i for i, e in enumerate(events) if e["event"] == "session_end"]
    assert ends and max(ends) < at
