"""Signals, as an operator sends them to `sidekey run`: SIGHUP reloads, SIGTERM drains.

Real processes, a real PostgreSQL with leases from a real OpenBao, real clients (asyncpg,
pgbench). Issue 19.2 was: SIGHUP killed the broker at once, cutting sessions and leaving
their leases and database roles behind until their TTL.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import yaml

from tests.broker_process import BrokerProcess
from tests.brokers import base_config
from tests.pki import DEFAULT_CLIENT_ID, Pki, client_ssl_context
from tests.servers import Postgres, VaultDatabase, free_port

CLIENT_TIMEOUT = 30.0
DEADLINE = 30.0
POLL_SECONDS = 0.05
SERVICE = "orders-db"
OTHER_ID = "spiffe://example.org/ns/prod/sa/billing"


def pg_service(pg: Postgres, port: int, allow: list[Any]) -> dict[str, Any]:
    return {
        "name": SERVICE,
        "adapter": "postgres",
        "listen": f"127.0.0.1:{port}",
        "upstream": {
            "address": f"127.0.0.1:{pg.port}",
            "database": "appdb",
            "tls": {"mode": "verify-full", "ca": str(pg.ca_path)},
        },
        "credentials": {"from": "vault-database", "role": "app-rw"},
        "allow": allow,
    }


class Setup:
    def __init__(self, tmp_path: Path, pki: Pki, vdb: VaultDatabase) -> None:
        self.tmp_path, self.pki, self.vdb = tmp_path, pki, vdb
        self.port = free_port()
        self.admin = f"127.0.0.1:{free_port()}"
        self.audit = tmp_path / "audit.jsonl"
        self.env = {"SIDEKEY_TEST_VAULT_TOKEN": vdb.openbao.token}
        self.brokers: list[BrokerProcess] = []

    def config(self, allow: list[Any] | None = None) -> dict[str, Any]:
        svc = pg_service(self.vdb.postgres, self.port, allow or [DEFAULT_CLIENT_ID, OTHER_ID])
        config = base_config(self.pki, services=[svc], vault=self.vdb.openbao, audit=self.audit)
        config["admin"] = {"listen": self.admin}
        return config

    def write(self, config: dict[str, Any] | str) -> Path:
        """Replace the config file atomically, as an operator's tooling should: a reload
        that reads a half-written file refuses it."""
        path = self.tmp_path / "sidekey.yaml"
        text = config if isinstance(config, str) else yaml.safe_dump(config, sort_keys=False)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(path)
        return path

    def start(self, drain: float = 10.0, config: dict[str, Any] | None = None) -> BrokerProcess:
        config = config if config is not None else self.config()
        broker = BrokerProcess.start(self.write(config), self.admin, env=self.env,
                                     drain=drain)  # fmt: skip
        self.brokers.append(broker)
        return broker

    async def connect(self, spiffe_id: str = DEFAULT_CLIENT_ID) -> asyncpg.Connection:
        return await asyncpg.connect(
            host="127.0.0.1", port=self.port, user="ignored", database="appdb",
            ssl=client_ssl_context(self.pki, self.pki.client(spiffe_id)), timeout=CLIENT_TIMEOUT,
        )  # fmt: skip

    def events(self) -> list[dict[str, Any]]:
        if not self.audit.exists():
            return []
        return [json.loads(line) for line in self.audit.read_text().splitlines()]


@pytest.fixture
def setup(tmp_path: Path, pki: Pki, vault_database: VaultDatabase) -> Iterator[Setup]:
    s = Setup(tmp_path, pki, vault_database)
    try:
        yield s
    finally:
        for broker in s.brokers:
            broker.stop()


async def until(predicate: Any, what: str, deadline: float = DEADLINE) -> None:
    end = time.monotonic() + deadline
    while not await predicate():
        if time.monotonic() > end:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(POLL_SECONDS)


async def lease_roles(pg: Postgres) -> set[str]:
    return {r for r in await pg.aroles() if r.startswith("v-")}


async def test_sighup_keeps_the_broker_and_its_sessions(setup: Setup) -> None:
    """19.2: SIGHUP must reload, not kill: the open session keeps working, the lease stays."""
    broker = setup.start()
    conn = await setup.connect()
    try:
        user = await conn.fetchval("SELECT current_user")
        broker.signal(signal.SIGHUP)

        async def reloaded() -> bool:
            assert broker.running, f"SIGHUP ended the broker:\n{broker.log()}"
            return any(e["event"] == "policy" and e["reason"] == "reload" for e in setup.events())

        await until(reloaded, "the reload's policy event")
        assert await conn.fetchval("SELECT current_user") == user
        again = await setup.connect()
        assert await again.fetchval("SELECT current_user") == user, "the same lease is reused"
        await again.close()
        assert user in await lease_roles(setup.vdb.postgres)
    finally:
        await conn.close()


async def test_sighup_applies_new_policy_and_closes_denied_sessions(setup: Setup) -> None:
    broker = setup.start()
    orders = await setup.connect()
    billing = await setup.connect(OTHER_ID)
    try:
        assert await billing.fetchval("SELECT 1") == 1
        setup.write(setup.config(allow=[DEFAULT_CLIENT_ID]))
        broker.signal(signal.SIGHUP)

        async def billing_closed() -> bool:
            return any(e["event"] == "session_closed" for e in setup.events())

        await until(billing_closed, "the denied session to be closed")
        closed = [e for e in setup.events() if e["event"] == "session_closed"]
        assert [e["spiffe_id"] for e in closed] == [OTHER_ID]
        assert "reload" in closed[0]["reason"]
        with pytest.raises((asyncpg.PostgresError, OSError, asyncpg.InterfaceError)):
            await billing.fetchval("SELECT 1")
        # The allowed session is untouched; new connections follow the new policy.
        assert await orders.fetchval("SELECT 1") == 1
        with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError):
            await setup.connect(OTHER_ID)
        ends = [e for e in setup.events() if e["event"] == "session_end"]
        assert [e["outcome"] for e in ends if e["spiffe_id"] == OTHER_ID] == ["revoked"]
    finally:
        await orders.close()
        billing.terminate()


async def test_sighup_refuses_a_broken_config_and_keeps_the_old(setup: Setup) -> None:
    broker = setup.start()
    good = setup.config()
    broken = yaml.safe_dump({**good, "services": [{**good["services"][0], "listen": "nowhere"}]})
    setup.write(broken)
    broker.signal(signal.SIGHUP)

    async def refused() -> bool:
        return "reload refused" in broker.log()

    await until(refused, "the reload to be refused in the log")
    assert "services[0].listen: must be HOST:PORT" in broker.log()
    assert broker.running
    conn = await setup.connect()
    assert await conn.fetchval("SELECT 1") == 1
    await conn.close()
    assert [e.get("reason") for e in setup.events() if e["event"] == "policy"] == ["start"]


async def test_sigterm_drains_sessions_then_revokes_leases(setup: Setup) -> None:
    broker = setup.start(drain=30.0)
    pg = setup.vdb.postgres
    conn = await setup.connect()
    user = await conn.fetchval("SELECT current_user")
    broker.signal(signal.SIGTERM)

    async def refusing() -> bool:
        try:
            extra = await setup.connect()
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            return True
        await extra.close()
        return False

    await until(refusing, "the listener to stop accepting")
    # Draining: the open session still works, the broker is still up.
    assert await conn.fetchval("SELECT 1") == 1
    assert broker.running
    await conn.close()
    assert broker.wait(DEADLINE) == 0
    assert user not in await lease_roles(pg), "the lease was revoked (its role is gone)"
    events = setup.events()
    end = [e for e in events if e["event"] == "session_end"]
    # The probe above may have got one session in before the signal was handled: every
    # session, the probe's too, ended cleanly.
    assert end and all(e["outcome"] == "ok" for e in end)
    assert events[-1]["event"] == "stop"


async def test_sigterm_cuts_sessions_after_the_drain_timeout(setup: Setup) -> None:
    broker = setup.start(drain=1.0)
    conn = await setup.connect()
    user = await conn.fetchval("SELECT current_user")
    started = time.monotonic()
    broker.signal(signal.SIGTERM)
    assert broker.wait(DEADLINE) == 0
    assert time.monotonic() - started < 15
    assert user not in await lease_roles(setup.vdb.postgres)
    ends = [e for e in setup.events() if e["event"] == "session_end"]
    assert [e["outcome"] for e in ends] == ["cancelled"]
    conn.terminate()


async def test_reload_keeps_a_running_pgbench_alive(setup: Setup) -> None:
    broker = setup.start()
    issued = setup.pki.client()
    script = setup.tmp_path / "select.sql"
    script.write_text("SELECT 1;\n")
    env = {
        **os.environ, "PGHOST": "127.0.0.1", "PGPORT": str(setup.port), "PGDATABASE": "appdb",
        "PGUSER": "ignored", "PGSSLMODE": "verify-full", "PGSSLROOTCERT": str(setup.pki.bundle),
        "PGSSLCERT": str(issued.cert), "PGSSLKEY": str(issued.key), "PGCONNECT_TIMEOUT": "10",
    }  # fmt: skip
    bench = await asyncio.create_subprocess_exec(
        "pgbench", "-n", "-T", "6", "-c", "2", "-f", str(script), env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip

    async def sessions_open() -> bool:
        events = setup.events()
        starts = sum(e["event"] == "session_start" for e in events)
        return starts - sum(e["event"] == "session_end" for e in events) >= 2

    await until(sessions_open, "pgbench's sessions")

    # One reload that changes nothing, one that changes the policy but still allows pgbench.
    def reloads() -> list[dict[str, Any]]:
        return [e for e in setup.events() if e["event"] == "policy" and e["reason"] == "reload"]

    async def reloaded(n: int) -> None:
        async def done() -> bool:
            return len(reloads()) == n

        await until(done, f"reload {n}")

    broker.signal(signal.SIGHUP)
    await reloaded(1)
    setup.write(setup.config(allow=[DEFAULT_CLIENT_ID]))
    broker.signal(signal.SIGHUP)
    await reloaded(2)
    out, err = await asyncio.wait_for(bench.communicate(), 60)
    assert bench.returncode == 0, err.decode()
    assert "number of failed transactions: 0" in out.decode()
    assert not [e for e in setup.events() if e["event"] == "session_closed"]

    async def all_ended() -> bool:
        events = setup.events()
        return sum(e["event"] == "session_start" for e in events) == sum(
            e["event"] == "session_end" for e in events
        )

    await until(all_ended, "the broker to see pgbench's sessions end")
    ends = [e for e in setup.events() if e["event"] == "session_end"]
    assert ends and all(e["outcome"] == "ok" for e in ends)
    # pgbench's two client sessions were open across both reloads (it also opens a short
    # first connection of its own).
    assert sum(e["time"] > reloads()[-1]["time"] for e in ends) >= 2


def sidekey(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "broker", *args], capture_output=True, text=True, timeout=60,
        check=False, env={**os.environ, **(env or {})},
    )  # fmt: skip


async def test_reload_command_reports_the_outcome(setup: Setup) -> None:
    broker = setup.start()
    path = setup.write(setup.config(allow=[DEFAULT_CLIENT_ID]))
    result = await asyncio.to_thread(sidekey, "reload", "--config", str(path), env=setup.env)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["ok"] and summary["updated"] == [SERVICE]
    # A broken config is refused by the command itself (as `sidekey check` would), and the
    # broker, asked directly, refuses it too and keeps running the old one.
    good = setup.config()
    setup.write(yaml.safe_dump({**good, "services": [{**good["services"][0], "adapter": "ftp"}]}))
    result = await asyncio.to_thread(sidekey, "reload", "--config", str(path), env=setup.env)
    assert result.returncode == 2
    assert "services[0].adapter: unknown adapter 'ftp'" in result.stderr
    status, body = await asyncio.to_thread(_post, setup.admin, "/reload")
    assert status == 422 and "unknown adapter 'ftp'" in body["error"]
    check = await asyncio.to_thread(sidekey, "check", "--config", str(path), env=setup.env)
    assert check.returncode == 2 and "unknown adapter 'ftp'" in check.stderr
    assert broker.running
    conn = await setup.connect()
    assert await conn.fetchval("SELECT 1") == 1
    await conn.close()


def _post(admin: str, path: str) -> tuple[int, Any]:
    request = urllib.request.Request(f"http://{admin}{path}", method="POST", data=b"")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


async def test_a_broker_killed_outright_has_its_leases_revoked_by_the_next_one(
    setup: Setup,
) -> None:
    """With a `state_dir`, the broker journals its leases there: killed outright (SIGKILL,
    the OOM killer), it cannot revoke them, and the broker started after it does. While it
    runs, a second broker cannot take the same state_dir."""
    state = setup.tmp_path / "state"
    config = {**setup.config(), "state_dir": str(state)}
    broker = setup.start(config=config)
    conn = await setup.connect()
    user = await conn.fetchval("SELECT current_user")
    assert user in await lease_roles(setup.vdb.postgres)
    assert (state / "leases.journal").read_text().count("+ ") == 1
    other = setup.tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({**config, "admin": {"listen": f"127.0.0.1:{free_port()}"}}))
    code, out = await _sidekey_exits("run", other, setup.env)
    assert code != 0 and "in use by another running broker" in out, out
    # Checking the running broker's config (as `sidekey reload` does first) takes no lock.
    code, out = await _sidekey_exits("check", setup.tmp_path / "sidekey.yaml", setup.env)
    assert code == 0, out
    broker.signal(signal.SIGKILL)
    broker.wait(10)
    conn.terminate()
    assert user in await lease_roles(setup.vdb.postgres), "nothing revoked it yet"
    setup.start(config=config)

    async def dropped() -> bool:
        return user not in await lease_roles(setup.vdb.postgres)

    await until(dropped, "the killed broker's lease to be revoked by the next one")
    revoked = [e for e in setup.events() if e["event"] == "lease_revoked"]
    assert [e["reason"] for e in revoked] == ["left by the previous process"], revoked
    conn = await setup.connect()
    assert await conn.fetchval("SELECT 1") == 1
    await conn.close()


async def _sidekey_exits(command: str, config: Path, env: dict[str, str]) -> tuple[int, str]:
    """`sidekey <command>` on `config` until it exits (it must, at once): code and output."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "broker", command, "--config", str(config),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, **env},
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), DEADLINE)
    return proc.returncode or 0, out.decode()
