"""Offboarding across a fleet: three `sidekey run` processes on one OpenBao and one PostgreSQL.

`sidekey offboard` writes the shared deny list; each broker, within a few seconds and with no
control plane of ours, denies the identity, closes its sessions (under load) and kept-alive
HTTP connections, revokes its leases (the database roles disappear from pg_roles) and writes
one `offboard` audit event. `sidekey onboard` lifts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiohttp import web

from tests.broker_process import BrokerProcess
from tests.brokers import base_config, write_config
from tests.pki import DEFAULT_CLIENT_ID, Pki, client_ssl_context
from tests.servers import VaultDatabase, free_port
from tests.test_reload import KeepAlive

BROKERS = 3
# The "within a few seconds": the watch interval is 1 s here.
OFFBOARD_DEADLINE = 10.0
DEADLINE = 30.0
POLL_SECONDS = 0.05
BILLING = "spiffe://example.org/ns/prod/sa/billing"


class Fleet:
    def __init__(self, tmp_path: Path, pki: Pki, vdb: VaultDatabase, upstream: str) -> None:
        self.tmp_path, self.pki, self.vdb = tmp_path, pki, vdb
        self.deny_path = f"sidekey/deny-{uuid.uuid4().hex[:8]}"
        self.env = {"SIDEKEY_TEST_VAULT_TOKEN": vdb.openbao.token, "SIDEKEY_TEST_TOKEN": "t0k3n"}
        self.brokers: list[BrokerProcess] = []
        self.pg_ports: list[int] = []
        self.http_port = free_port()
        self.upstream = upstream
        self.config_path = Path()

    def config(self, i: int) -> dict[str, Any]:
        pg = self.vdb.postgres
        services: list[dict[str, Any]] = [
            {
                "name": "orders-db",
                "adapter": "postgres",
                "listen": f"127.0.0.1:{self.pg_ports[i]}",
                "upstream": {
                    "address": f"127.0.0.1:{pg.port}",
                    "database": "appdb",
                    "tls": {"mode": "verify-full", "ca": str(pg.ca_path)},
                },
                "credentials": {"from": "vault-database", "role": "app-rw"},
                "allow": [DEFAULT_CLIENT_ID, BILLING],
            },
        ]
        if i == 0:
            services.append({
                "name": "orders-api", "adapter": "http", "listen": f"127.0.0.1:{self.http_port}",
                "upstream": {"url": self.upstream},
                "credentials": {"from": "env", "fields": {"token": "SIDEKEY_TEST_TOKEN"}},
                "inject": {"headers": {"Authorization": "Bearer {token}"}},
                "allow": [DEFAULT_CLIENT_ID, BILLING],
            })  # fmt: skip
        config = base_config(self.pki, services=services, vault=self.vdb.openbao,
                             audit=self.tmp_path / f"audit-{i}.jsonl")  # fmt: skip
        config["admin"] = {"listen": f"127.0.0.1:{free_port()}"}
        config["governance"] = {"deny_list": {"path": self.deny_path}, "watch_interval": 1}
        return config

    def start(self) -> None:
        for i in range(BROKERS):
            self.pg_ports.append(free_port())
            directory = self.tmp_path / f"broker-{i}"
            directory.mkdir()
            config = self.config(i)
            path = write_config(directory, config)
            self.config_path = path
            self.brokers.append(BrokerProcess.start(path, config["admin"]["listen"], env=self.env))

    async def connect(self, i: int, spiffe_id: str = DEFAULT_CLIENT_ID) -> asyncpg.Connection:
        return await asyncpg.connect(
            host="127.0.0.1", port=self.pg_ports[i], user="x", database="appdb", timeout=30,
            ssl=client_ssl_context(self.pki, self.pki.client(spiffe_id)),
        )  # fmt: skip

    def events(self, i: int) -> list[dict[str, Any]]:
        path = self.tmp_path / f"audit-{i}.jsonl"
        return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []

    def sidekey(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "broker", *args, "--config", str(self.config_path)],
            capture_output=True, text=True, timeout=60, check=False,
            env={**os.environ, **self.env},
        )  # fmt: skip


@contextlib.asynccontextmanager
async def upstream() -> AsyncIterator[str]:
    async def handle(request: web.BaseRequest) -> web.Response:
        return web.Response(text="ok")

    runner = web.ServerRunner(web.Server(handle, access_log=None))
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@pytest.fixture
async def fleet(tmp_path: Path, pki: Pki, vault_database: VaultDatabase) -> AsyncIterator[Fleet]:
    async with upstream() as url:
        f = Fleet(tmp_path, pki, vault_database, url)
        try:
            await asyncio.to_thread(f.start)
            yield f
        finally:
            for broker in f.brokers:
                await asyncio.to_thread(broker.stop)


async def until(predicate: Any, what: str, deadline: float = DEADLINE) -> float:
    started = time.monotonic()
    while not await predicate():
        if time.monotonic() - started > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(POLL_SECONDS)
    return time.monotonic() - started


async def load(conn: asyncpg.Connection, counter: list[int]) -> None:
    """Queries back to back until the connection is cut (the offboarding)."""
    while True:
        await conn.fetchval("SELECT 1")
        counter[0] += 1


async def test_offboard_reaches_every_broker_under_load(fleet: Fleet) -> None:
    pg = fleet.vdb.postgres
    orders = [await fleet.connect(i) for i in range(BROKERS)]
    billing = [await fleet.connect(i, BILLING) for i in range(BROKERS)]
    users = {await c.fetchval("SELECT current_user") for c in orders}
    assert len(users) == BROKERS, "one lease (and database role) per broker"
    assert users <= await pg.aroles()
    http = await KeepAlive.open(f"127.0.0.1:{fleet.http_port}", fleet.pki, DEFAULT_CLIENT_ID)
    assert (await http.get("/"))[0] == 200
    counters = [[0] for _ in orders]
    loads = [asyncio.create_task(load(c, n)) for c, n in zip(orders, counters, strict=True)]
    await until(lambda: _true(all(n[0] > 10 for n in counters)), "load on every broker")

    result = await asyncio.to_thread(
        fleet.sidekey, "offboard", DEFAULT_CLIENT_ID, "--reason", "INC-42 key leaked"
    )
    assert result.returncode == 0, result.stderr
    assert "offboarded spiffe://example.org/ns/prod/sa/orders" in result.stdout

    async def cut() -> bool:
        return all(t.done() for t in loads)

    took = await until(cut, "every loaded session to be closed", OFFBOARD_DEADLINE)
    for task in loads:
        assert isinstance(
            task.exception(), asyncpg.PostgresError | OSError | asyncpg.InterfaceError
        )
    assert await http.closed(), "the kept-alive HTTP connection is closed"

    async def roles_gone() -> bool:
        return not (users & await pg.aroles())

    await until(roles_gone, "the leases' roles to disappear", OFFBOARD_DEADLINE)
    # The other identity is untouched, everywhere.
    for conn in billing:
        assert await conn.fetchval("SELECT 1") == 1
    for i in range(BROKERS):
        offboards = [e for e in fleet.events(i) if e["event"] == "offboard"]
        assert len(offboards) == 1, fleet.brokers[i].log()
        event = offboards[0]
        assert event["spiffe_id"] == DEFAULT_CLIENT_ID and event["reason"] == "INC-42 key leaked"
        assert len(event["leases_revoked"]["orders-db"]) == 1
        assert event["sessions_closed"] == (2 if i == 0 else 1)
        status, body = fleet.brokers[i].get("/readyz")
        assert status == 200 and body["deny_list"]["ok"] and body["deny_list"]["version"] >= 1
        with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError, match="offboarded"):
            await fleet.connect(i)
    print(f"offboarding reached {BROKERS} brokers' sessions in {took:.2f}s")

    result = await asyncio.to_thread(fleet.sidekey, "onboard", DEFAULT_CLIENT_ID)
    assert result.returncode == 0, result.stderr

    async def back() -> bool:
        try:
            conn = await fleet.connect(2)
        except asyncpg.InvalidAuthorizationSpecificationError:
            return False
        await conn.close()
        return True

    await until(back, "onboarding to reach a broker", OFFBOARD_DEADLINE)
    for conn in billing:
        await conn.close()
    for conn in orders:
        conn.terminate()
    http.close()


async def _true(value: bool) -> bool:
    return value


async def test_a_broker_that_cannot_read_the_list_says_so(
    tmp_path: Path, pki: Pki, vault_database: VaultDatabase
) -> None:
    # A token without a policy for the list: the vault refuses every read.
    client = vault_database.openbao.client()
    token = client.auth.token.create(policies=["default"], ttl="10m")["auth"]["client_token"]
    admin = f"127.0.0.1:{free_port()}"
    config = base_config(pki, services=[{
        "name": "api", "adapter": "http", "listen": f"127.0.0.1:{free_port()}",
        "upstream": {"url": "http://127.0.0.1:9"},
        "credentials": {"from": "env", "fields": {"token": "SIDEKEY_TEST_TOKEN"}},
        "inject": {"headers": {"Authorization": "Bearer {token}"}},
        "allow": [DEFAULT_CLIENT_ID],
    }], vault=vault_database.openbao)  # fmt: skip
    config["admin"] = {"listen": admin}
    env = {"SIDEKEY_TEST_VAULT_TOKEN": token, "SIDEKEY_TEST_TOKEN": "t"}
    broker = await asyncio.to_thread(
        BrokerProcess.start, write_config(tmp_path, config), admin, env=env
    )
    try:
        status, body = broker.get("/readyz")
        assert status == 200
        assert body["deny_list"]["ok"] is False
        assert "permission denied" in body["deny_list"]["error"]
        with urllib_open(f"http://{admin}/metrics") as metrics:
            assert "sidekey_deny_list_up 0.0" in metrics
    finally:
        await asyncio.to_thread(broker.stop)


@contextlib.contextmanager
def urllib_open(url: str) -> Iterator[str]:
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as response:
        yield response.read().decode()
