"""`sidekey access` on a trail recorded here by a real broker: the answer is known."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from broker.config import load_config
from broker.runtime import Broker
from tests.brokers import base_config, write_config
from tests.pki import DEFAULT_CLIENT_ID, Pki, client_ssl_context
from tests.servers import VaultDatabase

BILLING = "spiffe://example.org/ns/prod/sa/billing"


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def access(*args: str) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-m", "broker", "access", *args, "--json"],
        capture_output=True, text=True, check=False, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    out: dict[str, Any] = json.loads(result.stdout)
    return out


async def test_access_at_answers_from_a_recorded_trail(
    tmp_path: Path, pki: Pki, vault_database: VaultDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SIDEKEY_TEST_VAULT_TOKEN", vault_database.openbao.token)
    pg = vault_database.postgres
    audit = tmp_path / "audit.jsonl"
    svc: dict[str, Any] = {
        "name": "orders-db", "adapter": "postgres", "listen": "127.0.0.1:0",
        "upstream": {"address": f"127.0.0.1:{pg.port}", "database": "appdb",
                     "tls": {"mode": "verify-full", "ca": str(pg.ca_path)}},
        "credentials": {"from": "vault-database", "role": "app-rw"},
        "allow": [DEFAULT_CLIENT_ID, {"id": BILLING, "from": ["127.0.0.0/8"]}],
    }  # fmt: skip
    config = base_config(pki, services=[svc], vault=vault_database.openbao, audit=audit)
    before = now()
    await asyncio.sleep(0.01)
    broker = Broker(load_config(write_config(tmp_path, config)))
    await broker.start()
    try:
        host, _, port = broker.address("orders-db").rpartition(":")
        conn = await asyncpg.connect(
            host=host, port=int(port), user="x", database="appdb", timeout=30,
            ssl=client_ssl_context(pki, pki.client()),
        )  # fmt: skip
        user = await conn.fetchval("SELECT current_user")
        during = now()
        config["services"] = [{**svc, "allow": [DEFAULT_CLIENT_ID]}]
        write_config(tmp_path, config)
        await broker.reload()
        await asyncio.sleep(0.01)
        after_reload = now()
        await conn.close()
        await asyncio.sleep(0.05)
    finally:
        await broker.stop(drain_timeout=2.0)
    later = now()
    lease = next(json.loads(x) for x in audit.read_text().splitlines() if '"session_start"' in x)

    out = access("--audit", str(audit), "--at", during)
    could = {row["rule"]: row for row in out["could_reach"]}
    assert set(could) == {DEFAULT_CLIENT_ID, BILLING}
    assert could[DEFAULT_CLIENT_ID]["identities"] == [DEFAULT_CLIENT_ID]
    assert could[BILLING]["conditions"] == {"from": ["127.0.0.0/8"]}
    [did] = out["did_reach"]
    assert did["spiffe_id"] == DEFAULT_CLIENT_ID and did["kind"] == "session"
    assert did["upstream_user"] == user and did["lease_id"] == lease["lease_id"]
    assert did["began"] <= during <= did["ended"]

    # After the reload only orders could; by then its session had ended; nothing before start.
    out = access("--audit", str(audit), "--at", later)
    assert [r["rule"] for r in out["could_reach"]] == [DEFAULT_CLIENT_ID]
    assert out["did_reach"] == []
    assert (
        access("--audit", str(audit), "--at", after_reload, "--identity", BILLING)["could_reach"]
        == []
    )
    assert access("--audit", str(audit), "--at", before) == {
        **access("--audit", str(audit), "--at", before),
        "could_reach": [],
        "did_reach": [],
    }

    # A window, and two trails (two replicas) merged: each row names its trail.
    replica = tmp_path / "replica.jsonl"
    shutil.copy(audit, replica)
    out = access("--audit", str(tmp_path / "*.jsonl"), "--since", before, "--until", later,
                 "--service", "orders-db")  # fmt: skip
    assert {r["trail"] for r in out["did_reach"]} == {str(audit), str(replica)}
    assert len(out["did_reach"]) == 2
