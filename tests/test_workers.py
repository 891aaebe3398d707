"""`workers: N` (broker/supervisor.py): one parent, N worker processes sharing each listener.

Real processes (`sidekey run`), a real PostgreSQL with leases from a real OpenBao, a real
HTTP upstream, real clients (asyncpg, aiohttp). Which worker served a session is read from
the audit trail (every line names its worker) and the parent's /readyz (every worker's pid).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import hvac.exceptions
import pytest
from aiohttp import web

from broker.governance.verify import verify
from tests.broker_process import BrokerProcess
from tests.pki import DEFAULT_CLIENT_ID, Pki, client_ssl_context
from tests.servers import OpenBao, VaultDatabase, free_port
from tests.test_signals import DEADLINE, Setup, _post, lease_roles, until

WORKERS = 2
# Connections spread over the workers by the kernel (a hash of the client's port): 24 of them
# all land on one of two workers with probability 2**-23.
SPREAD = 24


class WorkersSetup(Setup):
    """test_signals' broker set-up, with two workers and an HTTP service beside PostgreSQL."""

    def __init__(self, tmp_path: Path, pki: Pki, vdb: VaultDatabase, http_url: str) -> None:
        super().__init__(tmp_path, pki, vdb)
        self.http_port = free_port()
        self.http_url = http_url
        self.secret_path = f"sidekey-workers/{os.getpid()}"
        vdb.openbao.client().secrets.kv.v2.create_or_update_secret(
            path=self.secret_path, secret={"token": "tok-workers"}
        )

    def config(self, allow: list[Any] | None = None) -> dict[str, Any]:
        config = super().config(allow)
        config["workers"] = WORKERS
        config["services"].append(
            {
                "name": "orders-api",
                "adapter": "http",
                "listen": f"127.0.0.1:{self.http_port}",
                "upstream": {"url": self.http_url},
                "credentials": {"from": "vault-kv", "path": self.secret_path},
                "inject": {"headers": {"Authorization": "Bearer {token}"}},
                "allow": allow or [DEFAULT_CLIENT_ID],
            }
        )
        return config

    def pids(self, broker: BrokerProcess) -> dict[int, int]:
        _, body = broker.get("/readyz")
        return {w["worker"]: w["pid"] for w in body["workers"] if w["pid"]}

    def workers_of(self, event: str) -> list[int]:
        return [e["worker"] for e in self.events() if e["event"] == event]


async def _http_upstream() -> tuple[web.AppRunner, str]:
    async def handle(request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != "Bearer tok-workers":
            return web.Response(status=401)
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]


@pytest.fixture
async def setup(
    tmp_path: Path, pki: Pki, vault_database: VaultDatabase
) -> AsyncIterator[WorkersSetup]:
    runner, url = await _http_upstream()
    s = WorkersSetup(tmp_path, pki, vault_database, url)
    try:
        yield s
    finally:
        for broker in s.brokers:
            await asyncio.to_thread(broker.stop)
        await runner.cleanup()


async def http_get(setup: WorkersSetup, n: int) -> list[int]:
    ssl = client_ssl_context(setup.pki, setup.pki.client())
    statuses = []
    for _ in range(n):
        # A new connection each time, so the kernel picks a worker for each.
        connector = aiohttp.TCPConnector(ssl=ssl, force_close=True)
        url = f"https://localhost:{setup.http_port}/x"
        async with aiohttp.ClientSession(connector=connector) as session, session.get(url) as resp:
            statuses.append(resp.status)
    return statuses


async def pg_backend_queries(setup: WorkersSetup, n: int) -> None:
    for _ in range(n):
        conn = await setup.connect()
        assert await conn.fetchval("SELECT 1") == 1
        await conn.close()


async def test_both_workers_serve_postgres_and_http(setup: WorkersSetup) -> None:
    broker = setup.start()
    pids = setup.pids(broker)
    assert sorted(pids) == [1, 2] and len(set(pids.values())) == 2
    assert broker.proc.pid not in pids.values(), "the parent serves nothing itself"
    await pg_backend_queries(setup, SPREAD)
    assert set(await http_get(setup, SPREAD)) == {200}

    async def all_recorded() -> bool:
        return len(setup.workers_of("session_end")) == SPREAD

    await until(all_recorded, "every session's end in the audit trail")
    assert set(setup.workers_of("session_end")) == {1, 2}
    assert set(setup.workers_of("request")) == {1, 2}
    # Leases stay per worker: each worker that served got a role of its own.
    users = {
        e["worker"]: e["upstream_user"] for e in setup.events() if e["event"] == "session_start"
    }
    assert len(set(users.values())) == 2

    # The parent's /metrics adds the workers' up.
    status, _ = broker.get("/readyz")
    assert status == 200
    metrics = await asyncio.to_thread(_metrics, setup.admin)
    assert metrics['sidekey_sessions_total{outcome="ok",service="orders-db"}'] == SPREAD
    assert metrics['sidekey_requests_total{decision="allow",service="orders-api"}'] == SPREAD
    assert metrics["sidekey_workers"] == WORKERS
    assert metrics['sidekey_worker_up{worker="1"}'] == metrics['sidekey_worker_up{worker="2"}'] == 1
    # /inventory shows every worker's live leases.
    status, inventory = broker.get("/inventory")
    assert status == 200 and [w["worker"] for w in inventory["workers"]] == [1, 2]
    held = {
        lease
        for ident in inventory["identities"]
        for svc in ident["services"]
        for lease in svc["credential"].get("live_leases", [])
    }
    assert len(held) == 2


def _metrics(admin: str) -> dict[str, float]:
    import urllib.request

    with urllib.request.urlopen(f"http://{admin}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


async def test_a_killed_worker_is_restarted_and_the_others_keep_serving(
    setup: WorkersSetup,
) -> None:
    broker = setup.start()
    pids = setup.pids(broker)
    # Sessions on both workers; which one each is on, from the audit trail's peers.
    conns = [await setup.connect() for _ in range(SPREAD // 2)]
    for conn in conns:
        await conn.fetchval("SELECT 1")

    async def started() -> bool:
        return len(setup.workers_of("session_start")) == len(conns)

    await until(started, "every session_start")
    worker_of_peer = {
        e["peer"]: e["worker"] for e in setup.events() if e["event"] == "session_start"
    }
    on = {
        worker_of_peer["{}:{}".format(*c._transport.get_extra_info("sockname")[:2])]: c
        for c in conns
    }
    assert set(on) == {1, 2}, "both workers hold sessions"
    os.kill(pids[1], signal.SIGKILL)
    # The other worker's session goes on as if nothing happened; the killed one's is cut.
    assert await on[2].fetchval("SELECT 2") == 2
    with pytest.raises((asyncpg.PostgresError, OSError, asyncpg.InterfaceError)):
        await on[1].fetchval("SELECT 1")

    async def restarted() -> bool:
        now = setup.pids(broker)
        return now.get(1) not in (None, pids[1]) and broker.get("/readyz")[0] == 200

    await until(restarted, "worker 1 to be started again and ready")
    assert setup.pids(broker)[2] == pids[2]
    assert "worker 1 (pid" in broker.log() and "SIGKILL" in broker.log()
    await pg_backend_queries(setup, SPREAD)
    # The restarted worker serves again, and its audit lines continue the trail.
    starts = [e for e in setup.events() if e["event"] == "session_start"]
    assert {e["worker"] for e in starts[len(conns) :]} == {1, 2}
    metrics = await asyncio.to_thread(_metrics, setup.admin)
    assert metrics['sidekey_worker_restarts_total{worker="1"}'] == 1
    # The restarted worker continued its own hash chain where the killed one stopped.
    report = verify([setup.audit])
    assert report.ok, report.problems
    firsts = [e for e in setup.events() if e.get("worker") == 1 and "chain_prev" in e]
    assert len(firsts) == 2 and firsts[1]["chain_prev"] != "", "a link, not a fresh chain"
    for conn in conns:
        conn.terminate()


async def test_the_leases_of_a_killed_worker_are_revoked_by_the_one_started_in_its_place(
    setup: WorkersSetup,
) -> None:
    """A worker killed outright cannot revoke its leases; the worker started in its slot
    revokes what it left (its lease journal), and leaves the other worker's alone."""
    broker = setup.start()
    pids = setup.pids(broker)
    conns = [await setup.connect() for _ in range(SPREAD // 2)]
    users = {}
    for conn in conns:
        users[conn] = await conn.fetchval("SELECT current_user")

    async def started() -> bool:
        return len(setup.workers_of("session_start")) == len(conns)

    await until(started, "every session_start")
    role_of = {}  # worker -> its lease's database role
    lease_of = {}  # worker -> its lease ID
    for e in setup.events():
        if e["event"] == "session_start":
            lease_of[e["worker"]] = e["lease_id"]
    worker_of_peer = {
        e["peer"]: e["worker"] for e in setup.events() if e["event"] == "session_start"
    }
    for conn in conns:
        peer = "{}:{}".format(*conn._transport.get_extra_info("sockname")[:2])
        role_of[worker_of_peer[peer]] = users[conn]
    assert set(role_of) == {1, 2} and role_of[1] != role_of[2], "a lease on each worker"
    pg = setup.vdb.postgres
    assert {role_of[1], role_of[2]} <= await lease_roles(pg)
    os.kill(pids[1], signal.SIGKILL)

    async def dropped() -> bool:
        return role_of[1] not in await lease_roles(pg)

    await until(dropped, "the killed worker's role to be dropped")
    assert setup.pids(broker)[1] != pids[1], "revoked by the worker started again"
    assert role_of[2] in await lease_roles(pg), "the other worker's lease is untouched"
    with pytest.raises(hvac.exceptions.InvalidRequest, match=r"invalid lease"):
        setup.vdb.openbao.client().sys.read_lease(lease_of[1])
    revoked = [e for e in setup.events() if e["event"] == "lease_revoked"]
    assert [(e["worker"], e["lease_id"], e["reason"]) for e in revoked] == [
        (1, lease_of[1], "left by the previous process")
    ]
    # The worker on the other side serves on; the killed one's clients reconnect.
    for conn in conns:
        if users[conn] == role_of[2]:
            assert await conn.fetchval("SELECT 2") == 2
        conn.terminate()
    await pg_backend_queries(setup, SPREAD)


def kill_outright(setup: WorkersSetup, broker: BrokerProcess) -> None:
    """SIGKILL the parent and every worker, none of them able to stop cleanly: the parent
    held still first, so it starts no worker in place of a killed one."""
    pids = setup.pids(broker)
    broker.signal(signal.SIGSTOP)
    for pid in pids.values():
        os.kill(pid, signal.SIGKILL)
    broker.signal(signal.SIGKILL)
    broker.wait(10)


async def test_a_broker_started_with_fewer_workers_revokes_the_leases_of_slots_it_does_not_run(
    setup: WorkersSetup,
) -> None:
    """Journals are found by name: leases.journal for a single process, leases-N.journal for
    worker slot N. A broker killed outright, then started again with fewer journals (one
    process after two workers, or the other way round), takes the others over and revokes
    what they hold: a single process takes both workers' journals, worker 1 takes a single
    process's."""
    state = setup.tmp_path / "state"
    pg = setup.vdb.postgres
    several = {**setup.config(), "state_dir": str(state)}
    single = {**several, "workers": 1}

    broker = setup.start(config=single)
    conn = await setup.connect()
    single_role = await conn.fetchval("SELECT current_user")
    broker.signal(signal.SIGKILL)
    broker.wait(10)
    conn.terminate()
    assert single_role in await lease_roles(pg)

    broker = setup.start(config=several)

    async def single_dropped() -> bool:
        return single_role not in await lease_roles(pg)

    await until(single_dropped, "worker 1 to revoke the single process's lease")
    conns = [await setup.connect() for _ in range(SPREAD // 2)]
    roles = {await c.fetchval("SELECT current_user") for c in conns}
    assert len(roles) == 2, "a lease on each worker"
    assert sorted(p.name for p in state.glob("*.journal")) == [
        "leases-1.journal",
        "leases-2.journal",
    ], "the single process's journal was taken over, then deleted"
    kill_outright(setup, broker)
    for c in conns:
        c.terminate()
    assert roles <= await lease_roles(pg), "nothing revoked them yet"

    setup.start(config=single)

    async def workers_dropped() -> bool:
        return not roles & await lease_roles(pg)

    await until(workers_dropped, "the single process to revoke both workers' leases")
    revoked = [e for e in setup.events() if e["event"] == "lease_revoked"]
    assert [e.get("worker") for e in revoked] == [1, None, None], revoked
    assert {e["reason"] for e in revoked} == {"left by the previous process"}
    assert [p.name for p in state.glob("*.journal")] == ["leases.journal"]
    conn = await setup.connect()
    assert await conn.fetchval("SELECT 1") == 1
    await conn.close()


async def test_sighup_reaches_every_worker_and_sigterm_drains_them_all(
    setup: WorkersSetup,
) -> None:
    broker = setup.start(drain=30.0)
    pg = setup.vdb.postgres
    conns = [await setup.connect() for _ in range(SPREAD // 2)]
    users = {await c.fetchval("SELECT current_user") for c in conns}
    assert len(users) == 2, "one lease per worker"

    broker.signal(signal.SIGHUP)

    async def reloaded() -> bool:
        events = setup.events()
        return {
            e["worker"] for e in events if e["event"] == "policy" and e["reason"] == "reload"
        } == {1, 2}

    await until(reloaded, "both workers' reload")
    for conn in conns:
        assert await conn.fetchval("SELECT 1") == 1

    broker.signal(signal.SIGTERM)

    async def refusing() -> bool:
        try:
            extra = await setup.connect()
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            return True
        await extra.close()
        return False

    await until(refusing, "the listeners to stop accepting")
    # Draining: the open sessions of both workers still work.
    for conn in conns:
        assert await conn.fetchval("SELECT 1") == 1
    assert broker.running
    for conn in conns:
        await conn.close()
    assert await asyncio.to_thread(broker.wait, DEADLINE) == 0
    left = await lease_roles(pg)
    assert not users & left, "every worker revoked its leases (their roles are gone)"
    assert sorted(setup.workers_of("stop")) == [1, 2]
    # One trail, one hash chain per worker: it verifies.
    report = verify([setup.audit])
    assert report.ok, report.problems


def test_workers_one_is_the_single_process(tmp_path: Path, pki: Pki, openbao: OpenBao) -> None:
    """`workers: 1`: no parent, the broker is the process (its pid serves)."""
    from tests.brokers import base_config

    port, admin = free_port(), f"127.0.0.1:{free_port()}"
    config = base_config(pki, services=[{
        "name": "api", "adapter": "http", "listen": f"127.0.0.1:{port}",
        "upstream": {"url": "http://127.0.0.1:9"},
        "credentials": {"from": "env", "fields": {"value": "X"}},
        "inject": {"headers": {"Authorization": "Bearer {value}"}}, "allow": [DEFAULT_CLIENT_ID],
    }])  # fmt: skip
    config["admin"] = {"listen": admin}
    path = tmp_path / "sidekey.yaml"
    path.write_text(json.dumps(config))
    broker = BrokerProcess.start(path, admin, env={"X": "x"})
    try:
        status, body = broker.get("/readyz")
        assert status == 200 and "workers" not in body
        assert "supervising" not in broker.log()
    finally:
        broker.stop()


async def test_post_reload_reloads_every_worker_and_a_broken_config_none(
    setup: WorkersSetup,
) -> None:
    broker = setup.start()
    setup.write(setup.config(allow=[DEFAULT_CLIENT_ID]))
    status, body = await asyncio.to_thread(_post, setup.admin, "/reload")
    assert status == 200, body
    assert body["ok"] and sorted(w["worker"] for w in body["workers"]) == [1, 2]
    assert all(w["ok"] for w in body["workers"]), body

    async def reloaded() -> bool:
        return sorted(
            e["worker"]
            for e in setup.events()
            if e["event"] == "policy" and e["reason"] == "reload"
        ) == [1, 2]

    await until(reloaded, "both workers' reload")
    # A broken config is refused by the parent before any worker is asked.
    good = setup.config()
    setup.write({**good, "services": [{**good["services"][0], "adapter": "ftp"}]})
    status, body = await asyncio.to_thread(_post, setup.admin, "/reload")
    assert status == 422 and "unknown adapter 'ftp'" in body["error"]
    assert setup.workers_of("policy").count(1) == 2, "worker 1: start and one reload only"
    assert broker.running
    conn = await setup.connect()
    assert await conn.fetchval("SELECT 1") == 1
    await conn.close()
