"""The MySQL and Redis rows of `make bench`: their servers and the variants that drive them.

Both rows have TLS on both legs, as the PostgreSQL rows: the tool talks mTLS to the broker,
the broker verify-full TLS to the server; the direct variant talks TLS to the server itself.

- ``redis-getset``: ``redis-benchmark -t get,set -P 1 -c 16 --tls`` against redis-server's
  TLS port, through the broker's redis service (a dynamic ACL user from OpenBao's
  redis-database-plugin) and direct (a static ACL user).
- ``mysql-point-select``: sysbench's ``oltp_point_select`` (prepared statements, 16
  threads) against MariaDB, through the broker's mysql service (a dynamic user from
  OpenBao's mysql-database-plugin) and direct (a static user). sysbench 1.0 with
  ``--mysql-ssl=on`` reads client-key.pem, client-cert.pem and cacert.pem from its working
  directory and does not verify the server's name; the broker's own leg is verify-full.

The servers start only when one of these rows is selected (BENCH_ONLY), so the PostgreSQL
and HTTP rows pay nothing for them.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import servers

KEYS = ("redis-getset", "mysql-point-select")
REDIS_ROLE = "bench-cache"
MYSQL_ROLE = "bench-mysql"
SB_DATABASE = "sbtest"
# sysbench's point selects hit one table of this many rows (fits in the buffer pool).
SB_TABLE_SIZE = 10_000
# redis-benchmark runs a request count, not a time: requests per second of window asked
# (about what the direct path does on this 2-core VM), and under callgrind (~1 % speed).
REDIS_REQUESTS_PER_SECOND = 40_000
REDIS_REQUESTS_PER_SECOND_CALLGRIND = 300


@dataclass
class Redis:
    port: int
    tls_port: int
    passwords: dict[str, str] = field(repr=False)


@dataclass
class MariaDB:
    port: int
    socket: Path
    passwords: dict[str, str] = field(repr=False)

    def sql(self, statement: str) -> None:
        result = subprocess.run(
            ["mariadb", "--no-defaults", "-uroot", f"--socket={self.socket}", "-e", statement],
            capture_output=True, text=True, check=False, timeout=60,
        )  # fmt: skip
        if result.returncode != 0:
            raise servers.BenchError(f"mariadb failed: {result.stderr.strip()}")


def _owned(path: Path, owner: str | None) -> Path:
    if owner and os.geteuid() == 0:
        shutil.chown(path, owner, owner)
    return path


def start_redis(
    procs: servers.Processes, base: Path, pki: servers.Pki, cpus: frozenset[int] | None
) -> Redis:
    base.mkdir(parents=True)
    port, tls_port = servers.free_port(), servers.free_port()
    passwords = {"vaultadmin": secrets.token_urlsafe(18), "bench": secrets.token_urlsafe(18)}
    (base / "redis.conf").write_text(
        f"""bind 127.0.0.1
port {port}
tls-port {tls_port}
tls-cert-file {pki.server.cert}
tls-key-file {pki.server.key}
tls-ca-cert-file {pki.bundle}
tls-auth-clients no
dir {base}
save ""
appendonly no
requirepass {secrets.token_urlsafe(18)}
user vaultadmin on >{passwords["vaultadmin"]} ~* &* +@all
user bench on >{passwords["bench"]} ~* &* +@all
"""
    )
    proc = procs.start(
        "redis-server", ["redis-server", str(base / "redis.conf")], log=base / "redis.log",
        cpus=cpus,
    )  # fmt: skip
    servers.wait_for_port(port, proc, "redis-server")
    return Redis(port, tls_port, passwords)


def start_mariadb(
    procs: servers.Processes, base: Path, pki: servers.Pki, cpus: frozenset[int] | None
) -> MariaDB:
    owner = "mysql" if os.geteuid() == 0 else None
    base.mkdir(parents=True)
    _owned(base, owner)
    tls = {}
    for name, src in (("ca", pki.bundle), ("cert", pki.server.cert), ("key", pki.server.key)):
        dst = base / f"{name}.pem"
        shutil.copyfile(src, dst)
        dst.chmod(0o600 if name == "key" else 0o644)
        tls[name] = _owned(dst, owner)
    datadir, sock = base / "data", base / "mysqld.sock"
    install = subprocess.run(
        ["mariadb-install-db", "--no-defaults", f"--datadir={datadir}",
         "--auth-root-authentication-method=normal", "--skip-test-db", "--skip-name-resolve"],
        capture_output=True, text=True, check=False, timeout=120, user=owner, group=owner,
    )  # fmt: skip
    if install.returncode != 0:
        raise servers.BenchError(f"mariadb-install-db failed: {install.stderr[-2000:]}")
    port = servers.free_port()
    proc = procs.start(
        "mariadbd",
        ["mariadbd", "--no-defaults", f"--datadir={datadir}", f"--socket={sock}",
         f"--port={port}", "--bind-address=127.0.0.1", f"--log-error={base}/error.log",
         f"--pid-file={base}/mysqld.pid", "--skip-name-resolve", f"--ssl-ca={tls['ca']}",
         f"--ssl-cert={tls['cert']}", f"--ssl-key={tls['key']}", "--skip-log-bin",
         "--innodb-buffer-pool-size=128M", "--max-connections=500"],
        log=base / "mariadbd.out", user=owner, cpus=cpus,
    )  # fmt: skip
    servers.wait_for_port(port, proc, "mariadbd")
    passwords = {"vaultadmin": secrets.token_urlsafe(18), "bench": secrets.token_urlsafe(18)}
    db = MariaDB(port, sock, passwords)
    deadline = time.monotonic() + servers.START_SECONDS
    while True:
        try:
            db.sql("SELECT 1")
            break
        except servers.BenchError:
            proc.check("mariadbd")
            if time.monotonic() > deadline:
                raise
            time.sleep(servers.POLL_SECONDS)
    db.sql(
        f"CREATE DATABASE {SB_DATABASE};"
        f"CREATE USER vaultadmin@'%' IDENTIFIED BY '{passwords['vaultadmin']}';"
        "GRANT ALL PRIVILEGES ON *.* TO vaultadmin@'%' WITH GRANT OPTION;"
        f"CREATE USER bench@'%' IDENTIFIED BY '{passwords['bench']}';"
        f"GRANT ALL PRIVILEGES ON {SB_DATABASE}.* TO bench@'%';"
    )
    return db


def setup_vault(
    bao: servers.OpenBao, redis: Redis | None, db: MariaDB | None, pki: servers.Pki
) -> None:
    client = bao.client()
    if redis is not None:
        client.sys.enable_secrets_engine("database", path="redis-db")
        client.secrets.database.configure(
            name="cache", plugin_name="redis-database-plugin", host="localhost",
            port=redis.tls_port, tls=True, ca_cert=pki.bundle.read_text(), username="vaultadmin",
            password=redis.passwords["vaultadmin"], allowed_roles=["*"], mount_point="redis-db",
        )  # fmt: skip
        client.secrets.database.create_role(
            name=REDIS_ROLE, db_name="cache", creation_statements=['["~*", "&*", "+@all"]'],
            default_ttl="2h", max_ttl="24h", mount_point="redis-db",
        )  # fmt: skip
    if db is not None:
        client.sys.enable_secrets_engine("database", path="mysql-db")
        client.secrets.database.configure(
            name="orders", plugin_name="mysql-database-plugin",
            connection_url=f"{{{{username}}}}:{{{{password}}}}@tcp(127.0.0.1:{db.port})/",
            username="vaultadmin", password=db.passwords["vaultadmin"], allowed_roles=["*"],
            mount_point="mysql-db",
        )  # fmt: skip
        client.secrets.database.create_role(
            name=MYSQL_ROLE, db_name="orders",
            creation_statements=[
                "CREATE USER '{{name}}'@'%' IDENTIFIED BY '{{password}}';",
                f"GRANT ALL PRIVILEGES ON {SB_DATABASE}.* TO '{{{{name}}}}'@'%';",
            ],
            default_ttl="2h", max_ttl="24h", mount_point="mysql-db",
        )  # fmt: skip


def broker_services(
    redis: Redis | None, db: MariaDB | None, pki: servers.Pki
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """The broker's redis and mysql services (verify-full upstream TLS) and their ports."""
    services: list[dict[str, Any]] = []
    ports: dict[str, int] = {}
    tls = {"mode": "verify-full", "ca": str(pki.bundle), "server_name": "localhost"}
    if redis is not None:
        ports["redis"] = servers.free_port()
        services.append({
            "name": "redis", "adapter": "redis", "listen": f"127.0.0.1:{ports['redis']}",
            "upstream": {"address": f"127.0.0.1:{redis.tls_port}", "tls": tls},
            "credentials": {"from": "vault-database", "mount": "redis-db", "role": REDIS_ROLE},
            "allow": [servers.PGBENCH_ID],
        })  # fmt: skip
    if db is not None:
        ports["mysql"] = servers.free_port()
        services.append({
            "name": "mysql", "adapter": "mysql", "listen": f"127.0.0.1:{ports['mysql']}",
            "upstream": {"address": f"127.0.0.1:{db.port}", "database": SB_DATABASE, "tls": tls},
            "credentials": {"from": "vault-database", "mount": "mysql-db", "role": MYSQL_ROLE},
            "allow": [servers.PGBENCH_ID],
        })  # fmt: skip
    return services, ports


# --------------------------------------------------------------------------- tool runs


def _tls_dir(env: Any) -> Path:
    """sysbench's fixed file names, in a directory of their own."""
    path = env.tmp / "sysbench-tls"
    if not path.exists():
        path.mkdir()
        shutil.copyfile(env.pki.pgbench.cert, path / "client-cert.pem")
        shutil.copyfile(env.pki.pgbench.key, path / "client-key.pem")
        shutil.copyfile(env.pki.bundle, path / "cacert.pem")
    return path


def _sysbench_args(env: Any, target: str) -> list[str]:
    db: MariaDB = env.mariadb
    if target == "broker":
        port, user, password = env.broker.ports["mysql"], "ignored", "ignored"
    else:
        port, user, password = db.port, "bench", db.passwords["bench"]
    return [
        "oltp_point_select", "--mysql-host=127.0.0.1", f"--mysql-port={port}",
        f"--mysql-user={user}", f"--mysql-password={password}", f"--mysql-db={SB_DATABASE}",
        "--mysql-ssl=on", "--tables=1", f"--table-size={SB_TABLE_SIZE}",
    ]  # fmt: skip


def prepare_mysql(env: Any) -> None:
    marker = env.tmp / "sysbench-prepared"
    if marker.exists():
        return
    result = subprocess.run(
        ["sysbench", *_sysbench_args(env, "direct"), "prepare"],
        cwd=_tls_dir(env), capture_output=True, text=True, check=False, timeout=300,
    )  # fmt: skip
    if result.returncode != 0:
        raise servers.BenchError(
            f"sysbench prepare failed: {(result.stderr or result.stdout)[-1500:]}"
        )
    marker.touch()


_QPS = re.compile(r"queries:\s+(\d+)\s+\(([\d.]+) per sec")
_P95 = re.compile(r"95th percentile:\s+([\d.]+)")
_AVG = re.compile(r"avg:\s+([\d.]+)")


def run_sysbench(env: Any, probe: Any, duration: float, *, target: str, threads: int) -> Any:
    from bench.scenarios import Measurement

    workdir = env.run_dir(f"sysbench-{target}")
    cmd = ["sysbench", *_sysbench_args(env, target), f"--threads={threads}",
           f"--time={max(1, round(duration))}", "--report-interval=0", "run"]  # fmt: skip
    probe.start()
    started = time.monotonic()
    result = subprocess.run(
        cmd, cwd=_tls_dir(env), capture_output=True, text=True, check=False,
        timeout=duration + 120,
    )  # fmt: skip
    elapsed = time.monotonic() - started
    probe.stop()
    (workdir / "sysbench.out").write_text(result.stdout + "\n--- stderr\n" + result.stderr)
    qps = _QPS.search(result.stdout)
    if result.returncode != 0 or not qps:
        raise servers.BenchError(
            f"sysbench via {target} failed ({result.returncode}): "
            f"{(result.stderr or result.stdout)[-1500:]}"
        )
    m = Measurement(
        ops=int(qps.group(1)), seconds=elapsed, rate=float(qps.group(2)), connections=threads
    )
    avg, p95 = _AVG.search(result.stdout), _P95.search(result.stdout)
    if avg:
        m.p50_us = float(avg.group(1)) * 1000  # sysbench prints the mean, not the median
        m.extra["p50_is_mean"] = True
    if p95:
        m.extra["p95_us"] = float(p95.group(1)) * 1000
    return probe.fill(m)


def run_redis_benchmark(env: Any, probe: Any, duration: float, *, target: str, clients: int) -> Any:
    from bench.scenarios import Measurement

    redis: Redis = env.redis
    pki = env.pki
    workdir = env.run_dir(f"redis-benchmark-{target}")
    per_second = (
        REDIS_REQUESTS_PER_SECOND_CALLGRIND if env.settings.callgrind else REDIS_REQUESTS_PER_SECOND
    )
    requests = max(1000, int(duration * per_second / 2))
    if target == "broker":
        where = ["-p", str(env.broker.ports["redis"])]
    else:
        where = ["-p", str(redis.tls_port), "--user", "bench", "-a", redis.passwords["bench"]]
    cmd = [
        "redis-benchmark", "-h", "127.0.0.1", *where, "--tls", "--cert", str(pki.pgbench.cert),
        "--key", str(pki.pgbench.key), "--cacert", str(pki.bundle), "--sni", "localhost",
        "-t", "get,set", "-P", "1", "-c", str(clients), "-n", str(requests), "--csv",
    ]  # fmt: skip
    probe.start()
    started = time.monotonic()
    result = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=600)
    elapsed = time.monotonic() - started
    probe.stop()
    (workdir / "redis-benchmark.out").write_text(result.stdout + "\n--- stderr\n" + result.stderr)
    rates: dict[str, tuple[float, float, float]] = {}
    for line in result.stdout.splitlines():
        cells = [c.strip('"') for c in line.split(",")]
        if len(cells) >= 7 and cells[0] in ("SET", "GET"):
            rates[cells[0]] = (float(cells[1]), float(cells[4]), float(cells[6]))
    if result.returncode != 0 or len(rates) != 2:
        raise servers.BenchError(
            f"redis-benchmark via {target} failed ({result.returncode}): "
            f"{(result.stderr or result.stdout)[-1500:]}"
        )
    # Both tests' requests over both tests' time: the rate of the run as a whole.
    seconds = sum(requests / rps for rps, _, _ in rates.values())
    m = Measurement(
        ops=2 * requests, seconds=seconds, rate=2 * requests / seconds, connections=clients,
        p50_us=max(p50 for _, p50, _ in rates.values()) * 1000,
        p99_us=max(p99 for _, _, p99 in rates.values()) * 1000,
    )  # fmt: skip
    m.extra.update({f"{k.lower()}_rps": v[0] for k, v in rates.items()})
    m.extra["wall_seconds"] = round(elapsed, 3)
    # The probe's window is the whole tool run, connection set-up included: CPU per op
    # is over every request, as for the other rows.
    return probe.fill(m)


def wait_for_redis(port: int) -> None:
    deadline = time.monotonic() + servers.START_SECONDS
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(servers.POLL_SECONDS)


def needed(only: tuple[str, ...]) -> Mapping[str, bool]:
    """Which of the two servers the selected rows need."""
    picked = not only
    return {
        "redis": picked or "redis-getset" in only,
        "mariadb": picked or "mysql-point-select" in only,
    }
