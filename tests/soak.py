"""`make soak DURATION=<seconds>`: the broker under pgbench and HTTP load for a long while.

Real parts only: a throwaway PostgreSQL cluster, an OpenBao server with file storage (so it
can be restarted and unsealed mid-run, keeping its leases), the broker as its own process,
pgbench (mTLS through the broker, one process with persistent connections and one that
reconnects for every transaction) and an HTTP client that reconnects every few requests to a
local upstream. Credential TTLs are short, so leases are renewed and replaced (max TTL) and
the KV credential is refetched many times; OpenBao is stopped and restarted in the middle.

Every minute it prints queries, errors, p99 latency, and the broker's RSS and open file
descriptors; at the end the totals, the memory growth after warm-up, the errors outside the
fault window and the leases left behind, and exits non-zero if a goal is missed:
0 errors outside the fault window, < 5 % RSS growth after warm-up, 0 leases left.
(The >= 10^6 queries goal of a 30-minute run is printed, not enforced: it depends on the box.)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from tests.brokers import base_config
from tests.pki import Pki, client_ssl_context
from tests.procs import broker_process
from tests.servers import (
    CREATION_STATEMENTS,
    REVOCATION_STATEMENTS,
    _bao_binary,
    free_port,
    start_postgres,
    stop_postgres,
)

TOKEN_ENV = "SIDEKEY_TEST_VAULT_TOKEN"
# Short leases: renewed every ~13 s, replaced at max TTL every 2 min (the churn service);
# the persistent service's max TTL outlives the run so its sessions are never cut.
CHURN_TTL, CHURN_MAX_TTL = "20s", "120s"
STEADY_TTL, STEADY_MAX_TTL = "20s", "24h"
KV_TTL = 5  # seconds the broker caches the HTTP service's token
SAMPLE_SECONDS = 10
MINUTE = 60
WARM_UP_FRACTION = 0.2
MAX_RSS_GROWTH = 0.05
# How long around the OpenBao restart errors count as injected (the restart itself takes a
# few seconds; a lease due for renewal retries every 2 s).
FAULT_MARGIN_SECONDS = 20
QUERIES_PER_TRANSACTION = 10


@dataclass
class Tally:
    queries: int = 0
    # (from, to, what): seconds since the start when the error was seen (a pgbench run
    # that lost a client only tells which minute it was).
    errors: list[tuple[float, float, str]] = field(default_factory=list)
    latencies: dict[int, list[float]] = field(default_factory=dict)  # minute -> seconds

    def latency(self, at: float, seconds: float) -> None:
        self.latencies.setdefault(int(at // MINUTE), []).append(seconds)


class Bao:
    """OpenBao with file storage: init once, unseal after every (re)start."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.address = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.unseal_key = ""
        self.token = ""
        (workdir / "data").mkdir(parents=True)
        cluster_port = free_port()
        # Integrated (raft) storage, one node: OpenBao 2 has no file backend any more.
        (workdir / "bao.hcl").write_text(
            f'storage "raft" {{ path = "{workdir / "data"}" node_id = "soak" }}\n'
            f'listener "tcp" {{ address = "127.0.0.1:{self.port}" tls_disable = true\n'
            f'  cluster_address = "127.0.0.1:{cluster_port}" }}\n'
            f'api_addr = "{self.address}"\n'
            f'cluster_addr = "http://127.0.0.1:{cluster_port}"\n'
        )

    def _bao(self, *args: str, token: bool = True) -> str:
        env = {**os.environ, "BAO_ADDR": self.address, "VAULT_ADDR": self.address}
        if token:
            env["BAO_TOKEN"] = env["VAULT_TOKEN"] = self.token
        result = subprocess.run(
            [_bao_binary(), *args], capture_output=True, text=True, env=env, check=True
        )
        return result.stdout

    def start(self) -> None:
        log = (self.workdir / "bao.log").open("ab")
        self.proc = subprocess.Popen(
            [_bao_binary(), "server", f"-config={self.workdir / 'bao.hcl'}"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, "BAO_DISABLE_MLOCK": "true", "VAULT_DISABLE_MLOCK": "true"},
        )  # fmt: skip
        log.close()
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{self.address}/v1/sys/seal-status", timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("OpenBao did not start") from None
                time.sleep(0.1)
        if not self.token:
            init = json.loads(
                self._bao("operator", "init", "-key-shares=1", "-key-threshold=1",
                          "-format=json", token=False)
            )  # fmt: skip
            self.unseal_key, self.token = init["unseal_keys_b64"][0], init["root_token"]
        self._bao("operator", "unseal", self.unseal_key, token=False)
        deadline = time.monotonic() + 30
        while True:
            try:
                # 200 once unsealed and active (raft elects itself leader first).
                with urllib.request.urlopen(f"{self.address}/v1/sys/health", timeout=1) as r:
                    if json.load(r).get("sealed") is False:
                        return
            except (OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("OpenBao did not unseal")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def setup(self, pg: Any) -> None:
        self._bao("secrets", "enable", "-path=secret", "kv-v2")
        self._bao("kv", "put", "-mount=secret", "soak-api", "token=soak-0")
        self._bao("secrets", "enable", "database")
        self._bao(
            "write", "database/config/appdb", "plugin_name=postgresql-database-plugin",
            f"connection_url=postgresql://{{{{username}}}}:{{{{password}}}}@localhost:{pg.port}"
            f"/appdb?sslmode=verify-full&sslrootcert={pg.ca_path}",
            "username=vaultadmin", f"password={pg.passwords['vaultadmin']}",
            "allowed_roles=*",
        )  # fmt: skip
        for role, ttl, max_ttl in (
            ("soak-churn", CHURN_TTL, CHURN_MAX_TTL),
            ("soak-steady", STEADY_TTL, STEADY_MAX_TTL),
        ):
            self._bao(
                "write", f"database/roles/{role}", "db_name=appdb",
                f"creation_statements={' '.join(CREATION_STATEMENTS)}",
                f"revocation_statements={' '.join(REVOCATION_STATEMENTS)}",
                f"default_ttl={ttl}", f"max_ttl={max_ttl}",
            )  # fmt: skip

    def leases(self) -> int:
        total = 0
        for role in ("soak-churn", "soak-steady"):
            try:
                out = self._bao("list", "-format=json", f"sys/leases/lookup/database/creds/{role}")
            except subprocess.CalledProcessError:
                continue  # none
            total += len(json.loads(out))
        return total


async def pgbench(  # noqa: PLR0917 - one call site per process
    name: str, dsn_env: dict[str, str], host: str, port: int, until: float, clients: int,
    connect_per_transaction: bool, workdir: Path, started: float, tally: Tally,
) -> Path:  # fmt: skip
    """pgbench in one-minute runs until `until` (loop time): a client that pgbench aborts
    (it does on any connection error) is counted and back in the next minute."""
    script = workdir / f"{name}.sql"
    script.write_text(
        "\\set aid random(1, 1000)\n"
        + "SELECT abalance FROM pgbench_accounts WHERE aid = :aid;\n" * QUERIES_PER_TRANSACTION
    )
    logdir = workdir / name
    logdir.mkdir()
    loop = asyncio.get_running_loop()
    run = 0
    while (left := int(until - loop.time())) > 0:
        run += 1
        args = [
            "pgbench", "-n", "-h", host, "-p", str(port), "-U", "ignored",
            "-c", str(clients), "-j", "1", "-T", str(min(MINUTE, left)), "-f", str(script),
            "-l", "--log-prefix", str(logdir / f"tx{run:04d}"),
        ]  # fmt: skip
        if connect_per_transaction:
            args.append("-C")
        args.append("appdb")
        t0 = time.time() - started
        proc = await asyncio.create_subprocess_exec(
            *args, env={**os.environ, **dsn_env}, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await proc.communicate()
        t1 = time.time() - started
        text = err.decode(errors="replace")
        aborted = [line for line in text.splitlines() if "aborted" in line or "error" in line]
        if proc.returncode != 0 or aborted:
            detail = (aborted or text.splitlines() or ["?"])[0][:200]
            tally.errors.append((t0, t1, f"pgbench {name}: rc={proc.returncode}: {detail}"))
        (logdir / f"run{run:04d}.out").write_bytes(out + b"\n---\n" + err)
    return logdir


def read_pgbench_logs(logdir: Path, started: float, tally: Tally, wall: list[float]) -> None:
    """pgbench -l lines: client tx_no latency_us script_no epoch_s epoch_us."""
    for path in logdir.glob("tx*"):
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) < 6:
                continue
            at = int(parts[4]) + int(parts[5]) / 1e6 - started
            if parts[2] == "failed":
                tally.errors.append((at, at, f"pgbench {logdir.name}: failed transaction"))
                continue
            tally.queries += QUERIES_PER_TRANSACTION
            tally.latency(at, int(parts[2]) / 1e6)
            wall.append(at)


async def http_load(  # noqa: PLR0917
    url: str, ctx: Any, until: float, started: float, tally: Tally, per_connection: int = 20
) -> None:
    loop = asyncio.get_running_loop()
    while loop.time() < until:
        connector = aiohttp.TCPConnector(ssl=ctx, limit=1)
        async with aiohttp.ClientSession(connector=connector) as session:
            for _ in range(per_connection):
                t0 = loop.time()
                try:
                    async with session.get(url) as resp:
                        body = await resp.read()
                        if resp.status != 200:
                            raise RuntimeError(f"HTTP {resp.status}: {body[:200]!r}")
                except Exception as exc:
                    at = time.time() - started
                    tally.errors.append((at, at, f"http: {exc}"[:300]))
                    await asyncio.sleep(0.1)
                    continue
                tally.queries += 1
                tally.latency(time.time() - started, loop.time() - t0)


async def upstream_server() -> tuple[web.AppRunner, int]:
    async def handle(request: web.Request) -> web.Response:
        auth = request.headers.get("Authorization", "")
        if not auth.startswith("Bearer soak-"):
            return web.Response(status=401, text="no token")
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, port


def p99(values: list[float]) -> float:
    if not values:
        return float("nan")
    if len(values) < 100:
        return max(values)
    return statistics.quantiles(values, n=100)[98]


LOADS = ("steady", "churn", "http", "restart", "kv")


async def idle(until: float) -> None:
    """What a load left out of `--loads` does: wait for the end."""
    await asyncio.sleep(max(0.0, until - asyncio.get_running_loop().time()))


async def soak(
    duration: int, workdir: Path, loads: frozenset[str] = frozenset(LOADS),
    event_loop: str = "auto", upstream_tls: bool = True,
) -> int:  # fmt: skip
    pki = Pki(workdir / "pki")
    pg_base = Path(tempfile.mkdtemp(prefix="sidekey-soak-pg-"))
    pg = start_postgres(pg_base)
    bao = Bao(workdir / "bao")
    upstream, upstream_port = await upstream_server()
    try:
        bao.start()
        bao.setup(pg)
        subprocess.run(
            ["pgbench", "-i", "-s", "1", "-q", "-h", str(pg.socket_dir), "-p", str(pg.port),
             "-U", pg.admin_user, "appdb"], check=True, capture_output=True,
        )  # fmt: skip
        pg.psql("GRANT SELECT ON ALL TABLES IN SCHEMA public TO PUBLIC", database="appdb")
        roles_before = pg.roles()
        tls = {"mode": "verify-full", "ca": str(pg.ca_path)}
        if not upstream_tls:
            tls = {"mode": "disable"}
        db = {"address": f"127.0.0.1:{pg.port}", "database": "appdb", "tls": tls}
        client_id = f"spiffe://{pki.trust_domain}/ns/soak/sa/load"
        services = [
            {"name": "db-steady", "adapter": "postgres", "listen": "127.0.0.1:0",
             "upstream": db, "credentials": {"from": "vault-database", "role": "soak-steady"},
             "allow": [client_id]},
            {"name": "db-churn", "adapter": "postgres", "listen": "127.0.0.1:0",
             "upstream": db, "credentials": {"from": "vault-database", "role": "soak-churn",
                                              "idle_timeout": 30},
             "allow": [client_id]},
            {"name": "api", "adapter": "http", "listen": "127.0.0.1:0",
             "upstream": {"url": f"http://127.0.0.1:{upstream_port}"},
             "credentials": {"from": "vault-kv", "path": "soak-api", "ttl": KV_TTL},
             "inject": {"headers": {"Authorization": "Bearer {token}"}},
             "allow": [client_id]},
        ]  # fmt: skip

        class _Vault:
            address, token = bao.address, bao.token

        config = base_config(pki, services=services, vault=_Vault, admin=False)
        config["vault"]["timeout"] = 3
        config["event_loop"] = event_loop
        issued = pki.client(client_id)
        pg_env = {
            "PGSSLMODE": "verify-full", "PGSSLROOTCERT": str(pki.bundle),
            "PGSSLCERT": str(issued.cert), "PGSSLKEY": str(issued.key), "PGCONNECT_TIMEOUT": "10",
        }  # fmt: skip
        tally = Tally()
        samples: list[tuple[float, int, int]] = []
        async with broker_process(workdir, config, env={TOKEN_ENV: bao.token}) as broker:
            started = time.time()
            print(f"broker pid {broker.pid}; loads: {', '.join(sorted(loads))}", flush=True)
            loop = asyncio.get_running_loop()
            until = loop.time() + duration
            host, steady_port = broker.address("db-steady")
            _, churn_port = broker.address("db-churn")
            api_host, api_port = broker.address("api")
            fault: list[float] = []

            async def sample() -> None:
                while loop.time() < until:
                    samples.append((time.time() - started, broker.rss_bytes(), broker.open_fds()))
                    await asyncio.sleep(SAMPLE_SECONDS)

            async def restart_openbao() -> None:
                await asyncio.sleep(duration / 2)
                fault.append(time.time() - started)
                print(f"[{fault[0]:7.0f}s] stopping OpenBao", flush=True)
                await asyncio.to_thread(bao.stop)
                await asyncio.sleep(5)
                await asyncio.to_thread(bao.start)
                fault.append(time.time() - started)
                print(f"[{fault[1]:7.0f}s] OpenBao restarted and unsealed", flush=True)

            async def rotate_kv() -> None:
                n = 0
                while loop.time() < until - MINUTE:
                    await asyncio.sleep(MINUTE)
                    n += 1
                    # Fails while OpenBao is being restarted: the next minute rotates.
                    with contextlib.suppress(subprocess.CalledProcessError):
                        await asyncio.to_thread(
                            bao._bao, "kv", "put", "-mount=secret", "soak-api", f"token=soak-{n}"
                        )

            async def report() -> None:
                minute = 0
                while loop.time() < until:
                    await asyncio.sleep(MINUTE)
                    rss, fds = (samples[-1][1], samples[-1][2]) if samples else (0, 0)
                    print(
                        f"[{(minute + 1) * MINUTE:5d}s] http requests {tally.queries:>9,} "
                        f"errors {len(tally.errors):>4} p99(http, this minute) "
                        f"{p99(tally.latencies.get(minute, [])) * 1000:7.1f} ms "
                        f"rss {rss / 2**20:6.1f} MB fds {fds}",
                        flush=True,
                    )
                    minute += 1

            ctx = client_ssl_context(pki, issued)
            url = f"https://{api_host}:{api_port}/soak"
            benches = [
                pgbench("steady", pg_env, host, steady_port, until, 3, False, workdir,
                        started, tally),
                pgbench("churn", pg_env, host, churn_port, until, 2, True, workdir,
                        started, tally),
            ]  # fmt: skip
            chosen = [b for b, name in zip(benches, LOADS[:2], strict=True) if name in loads]
            for b, name in zip(benches, LOADS[:2], strict=True):
                if name not in loads:
                    b.close()
            results = await asyncio.gather(
                *chosen,
                *(http_load(url, ctx, until, started, tally) if "http" in loads else idle(until)
                  for _ in range(2)),
                sample(), report(),
                restart_openbao() if "restart" in loads else idle(until),
                rotate_kv() if "kv" in loads else idle(until),
                return_exceptions=True,
            )  # fmt: skip
            for result in results:
                if isinstance(result, BaseException):
                    raise result
            http_queries = tally.queries
            wall: list[float] = []
            for logdir in results[: len(chosen)]:
                assert isinstance(logdir, Path)
                read_pgbench_logs(logdir, started, tally, wall)
            secrets = [bao.token, pg.passwords["vaultadmin"]]
            leaked = [s for s in secrets if s.encode() in broker.raw_log]
        await asyncio.sleep(2)
        leases_left = bao.leases()
        roles_left = sorted(pg.roles() - roles_before)

        print("\nminute  samples  p99 ms  (pgbench transactions of 10 queries, http requests)")
        for minute in sorted(tally.latencies):
            values = tally.latencies[minute]
            print(f"{minute:6d}  {len(values):8,}  {p99(values) * 1000:7.1f}")
        print("\n  time     RSS MB   fds")
        for at, rss, fds in samples[:: max(1, MINUTE // SAMPLE_SECONDS)]:
            print(f"{at:6.0f}s  {rss / 2**20:8.1f}  {fds:5d}")
        lo, hi = (
            (fault[0] - FAULT_MARGIN_SECONDS, fault[-1] + FAULT_MARGIN_SECONDS)
            if fault
            else (0.0, 0.0)
        )
        outside = [e for e in tally.errors if e[1] < lo or e[0] > hi]
        warm = [s for s in samples if s[0] >= duration * WARM_UP_FRACTION]
        growth = (warm[-1][1] - warm[0][1]) / warm[0][1] if len(warm) > 1 else 0.0
        pgbench_queries = tally.queries - http_queries
        print(
            f"\nqueries: {tally.queries:,} ({pgbench_queries:,} PostgreSQL, {http_queries:,} "
            f"HTTP) in {duration}s; errors: {len(tally.errors)} "
            f"({len(outside)} outside the fault window {lo:.0f}-{hi:.0f}s)"
        )
        for t0, t1, what in outside[:10]:
            print(f"  error at {t0:.0f}-{t1:.0f}s: {what}")
        print(
            f"RSS after warm-up: {warm[0][1] / 2**20:.1f} -> {warm[-1][1] / 2**20:.1f} MB "
            f"({growth * 100:+.1f} %); fds {samples[0][2]} -> {samples[-1][2]}"
            if warm
            else "RSS: too short a run to tell"
        )
        print(f"leases left in OpenBao: {leases_left}; roles left in PostgreSQL: {roles_left}")
        print(f"secrets in the broker's log: {len(leaked)}")
        goals = {
            "0 errors outside the fault window": not outside,
            "< 5 % RSS growth after warm-up": growth < MAX_RSS_GROWTH,
            "0 leases left": leases_left == 0 and not roles_left,
            "no secret in the broker's log": not leaked,
        }
        for goal, met in goals.items():
            print(f"  {'met ' if met else 'MISSED'}  {goal}")
        print(f"  {'met ' if tally.queries >= 10**6 else 'short'}  >= 10^6 queries "
              "(the 30-minute goal)")  # fmt: skip
        return 0 if all(goals.values()) else 1
    finally:
        await upstream.cleanup()
        bao.stop()
        stop_postgres(pg)
        shutil.rmtree(pg_base, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=int, default=1800, help="seconds (default 1800)")
    parser.add_argument(
        "--loads", default=",".join(LOADS),
        help=f"which loads to run, comma-separated (default all: {','.join(LOADS)}); "
        "fewer to find which one a change in memory or errors comes with",
    )  # fmt: skip
    parser.add_argument("--event-loop", default="auto", choices=("auto", "asyncio", "uvloop"))
    parser.add_argument(
        "--upstream-tls", default="on", choices=("on", "off"),
        help="TLS from the broker to PostgreSQL (default on, verify-full)",
    )  # fmt: skip
    args = parser.parse_args()
    loads = frozenset(args.loads.split(","))
    if unknown := loads - set(LOADS):
        parser.error(f"unknown load(s) {', '.join(sorted(unknown))}; choose from {','.join(LOADS)}")
    workdir = Path(tempfile.mkdtemp(prefix="sidekey-soak-"))
    print(f"soak: {args.duration}s, work directory {workdir}", flush=True)
    try:
        return asyncio.run(
            soak(args.duration, workdir, loads, args.event_loop, args.upstream_tls == "on")
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
