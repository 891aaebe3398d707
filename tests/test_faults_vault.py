"""OpenBao frozen (SIGSTOP, as in a partition: connections hang) or stopped while clients
connect through the PostgreSQL adapter (issue 19.9 and "Faults"):

- an identity whose lease is cached keeps being served;
- an identity that needs a fresh lease fails closed with 08006 within the vault timeout,
  never a hang;
- /readyz answers at once, 503, and names the vault's reachability and each credential's
  state; sidekey_vault_up goes to 0;
- after SIGCONT the broker recovers by itself, and no lease or role is left at the end;
- nothing secret reaches a client, a log line or the audit trail.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from broker.credentials.journal import LeaseJournal
from broker.runtime import Broker
from tests.brokers import base_config, running_broker
from tests.pki import DEFAULT_CLIENT_ID, Pki
from tests.servers import OpenBao, Postgres, configure_database
from tests.test_postgres_adapter import OTHER_ID, SERVICE, asyncpg_connect, service

# The broker's vault timeout here; a fetch must fail within it plus the call margin (1 s) and
# the scheduling slack of a loaded box.
VAULT_TIMEOUT = 2.0
FAIL_WITHIN = VAULT_TIMEOUT + 1.0 + 4.0
# /readyz must answer at once even while the vault hangs.
READYZ_WITHIN = 1.0
DEADLINE = 60.0


async def readyz(session: aiohttp.ClientSession, broker: Broker) -> tuple[int, dict[str, Any]]:
    assert broker.admin is not None
    started = time.monotonic()
    async with session.get(f"http://{broker.admin.address}/readyz") as resp:
        body = await resp.json()
    assert time.monotonic() - started < READYZ_WITHIN
    return resp.status, body


async def metrics(session: aiohttp.ClientSession, broker: Broker) -> str:
    assert broker.admin is not None
    async with session.get(f"http://{broker.admin.address}/metrics") as resp:
        return await resp.text()


async def until(predicate: Callable[[], Any], what: str, deadline: float = DEADLINE) -> Any:
    end = time.monotonic() + deadline
    while True:
        result = await predicate()
        if result:
            return result
        if time.monotonic() > end:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.2)


async def select_user(b: Broker, pki: Pki, spiffe_id: str) -> str:
    conn = await asyncpg_connect(b, pki, pki.client(spiffe_id))
    try:
        return str(await conn.fetchval("SELECT current_user"))
    finally:
        await conn.close()


@pytest.mark.timeout(240)
async def test_frozen_openbao_fails_closed_fast_and_recovers(  # noqa: PLR0917 - fixtures
    tmp_path: Path,
    pki: Pki,
    postgres: Postgres,
    openbao_factory: Callable[[], OpenBao],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    bao = openbao_factory()
    vdb = configure_database(bao, postgres)
    audit = tmp_path / "audit.jsonl"
    config = base_config(pki, services=[service(postgres)], vault=bao, audit=audit)
    config["vault"]["timeout"] = VAULT_TIMEOUT
    roles_before = await postgres.aroles()
    frozen = False
    try:
        async with (
            running_broker(tmp_path, config, monkeypatch, bao) as b,
            aiohttp.ClientSession() as http,
        ):
            await until(lambda: _ready(http, b), "the broker to be ready")
            cached_user = await select_user(b, pki, DEFAULT_CLIENT_ID)
            assert 'sidekey_vault_up{address="' in await metrics(http, b)

            os.kill(bao.pid, signal.SIGSTOP)
            frozen = True
            # A cached lease keeps serving its identity while the vault hangs.
            assert await select_user(b, pki, DEFAULT_CLIENT_ID) == cached_user
            # An identity without a lease fails closed, within the vault timeout.
            started = time.monotonic()
            with pytest.raises(asyncpg.PostgresError) as raised:
                await select_user(b, pki, OTHER_ID)
            assert time.monotonic() - started < FAIL_WITHIN
            assert raised.value.sqlstate == "08006"
            assert "no credential for service" in str(raised.value)
            # Readiness says so at once, and why.
            _, body = await until(lambda: _not_ready(http, b), "/readyz to say 503")
            assert body["vault"]["reachable"] is False and body["vault"]["error"]
            cred = body["services"][SERVICE]["credential"]
            assert cred["state"] == "valid" and cred["leases"] == 1 and cred["error"]
            text = await metrics(http, b)
            up = [line for line in text.splitlines() if line.startswith("sidekey_vault_up{")]
            assert len(up) == 1 and up[0].endswith(" 0.0"), up
            # Still serving the cached identity while not ready.
            assert await select_user(b, pki, DEFAULT_CLIENT_ID) == cached_user

            os.kill(bao.pid, signal.SIGCONT)
            frozen = False
            await until(lambda: _ready(http, b), "/readyz to recover without a restart")
            other_user = await select_user(b, pki, OTHER_ID)
            assert other_user.startswith("v-") and other_user != cached_user
            assert "vault_up" in await metrics(http, b)
    finally:
        if frozen:
            os.kill(bao.pid, signal.SIGCONT)
    # Shutdown revoked every lease: no dynamic role is left behind.
    assert await postgres.aroles() == roles_before
    secrets = [bao.token, postgres.passwords["vaultadmin"]]
    logs = "\n".join(r.getMessage() for r in caplog.records)
    for secret in secrets:
        assert secret not in logs and secret not in audit.read_text()
    assert vdb.mount == "database"


async def _ready(http: aiohttp.ClientSession, b: Broker) -> bool:
    status, _ = await readyz(http, b)
    return status == 200


async def _not_ready(http: aiohttp.ClientSession, b: Broker) -> tuple[int, dict[str, Any]] | None:
    status, body = await readyz(http, b)
    return (status, body) if status == 503 else None


@pytest.mark.timeout(120)
async def test_stopped_openbao_makes_readyz_say_why(
    tmp_path: Path,
    pki: Pki,
    postgres: Postgres,
    openbao_factory: Callable[[], OpenBao],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bao = openbao_factory()
    configure_database(bao, postgres)
    config = base_config(pki, services=[service(postgres)], vault=bao)
    config["vault"]["timeout"] = VAULT_TIMEOUT
    async with (
        running_broker(tmp_path, config, monkeypatch, bao) as b,
        aiohttp.ClientSession() as http,
    ):
        await until(lambda: _ready(http, b), "the broker to be ready")
        user = await select_user(b, pki, DEFAULT_CLIENT_ID)
        bao.stop()
        _, body = await until(lambda: _not_ready(http, b), "/readyz to say 503")
        assert "cannot reach" in body["vault"]["error"]
        assert body["ready"] is False
        # The cached lease still serves; a new identity fails closed at once (refused port).
        assert await select_user(b, pki, DEFAULT_CLIENT_ID) == user
        started = time.monotonic()
        with pytest.raises(asyncpg.PostgresError) as raised:
            await select_user(b, pki, OTHER_ID)
        assert raised.value.sqlstate == "08006"
        assert time.monotonic() - started < FAIL_WITHIN
        json.dumps(body)  # the body is plain JSON, nothing secret in it
        assert bao.token not in json.dumps(body)
    # With the vault gone, shutdown cannot revoke: the role lives until its lease TTL.
    # (The frozen test above checks that nothing is left when the vault comes back.)


@pytest.mark.timeout(120)
async def test_leases_left_by_a_killed_broker_are_revoked_once_the_vault_answers(  # noqa: PLR0917
    tmp_path: Path,
    pki: Pki,
    postgres: Postgres,
    openbao_factory: Callable[[], OpenBao],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A broker that starts while the vault hangs cannot revoke what its killed predecessor
    left in the state_dir's lease journal yet: it says so once, serves on, and revokes it
    when the vault answers again (broker.credentials.journal)."""
    bao = openbao_factory()
    vdb = configure_database(bao, postgres)
    # What a killed broker leaves: a live lease (its role in PostgreSQL) in the journal.
    leased = vdb.client().secrets.database.generate_credentials(vdb.role, mount_point=vdb.mount)
    user, lease_id = leased["data"]["username"], leased["lease_id"]
    state = tmp_path / "state"
    state.mkdir()
    expires = time.time() + leased["lease_duration"]
    (state / "leases.journal").write_text(f"+ {expires:.0f} {lease_id}\n")
    assert user in await postgres.aroles()
    audit = tmp_path / "audit.jsonl"
    config = base_config(pki, services=[service(postgres)], vault=bao, audit=audit)
    config["vault"]["timeout"] = VAULT_TIMEOUT
    config["state_dir"] = str(state)
    os.kill(bao.pid, signal.SIGSTOP)
    frozen = True
    try:
        async with running_broker(tmp_path, config, monkeypatch, bao):

            def warned() -> bool:
                return any("cannot revoke a lease left" in r.getMessage() for r in caplog.records)

            async def said() -> bool:
                return warned()

            await until(said, "the broker to say it cannot revoke the left lease yet")
            assert user in await postgres.aroles()
            os.kill(bao.pid, signal.SIGCONT)
            frozen = False

            async def revoked() -> bool:
                return user not in await postgres.aroles()

            await until(revoked, "the left lease to be revoked once the vault answers")
            warnings = [
                r for r in caplog.records
                if r.levelno == logging.WARNING and "cannot revoke a lease left" in r.getMessage()
            ]  # fmt: skip
            assert len(warnings) == 1, "said once, not at every retry"
    finally:
        if frozen:
            os.kill(bao.pid, signal.SIGCONT)
    events = [json.loads(line) for line in audit.read_text().splitlines()]
    assert [(e["lease_id"], e["reason"]) for e in events if e["event"] == "lease_revoked"] == [
        (lease_id, "left by the previous process")
    ]
    journal = LeaseJournal(state / "leases.journal")
    assert journal.left == {}, "nothing left for the next one"
    journal.close()
