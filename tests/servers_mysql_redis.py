"""Real-server fixtures for the MySQL and Redis adapters: Debian's redis-server and
mariadb-server, started as throwaway instances on free loopback ports, and the session
OpenBao's database engine wired to each (redis-database-plugin, mysql-database-plugin).

Each server starts once per test session. MariaDB refuses to run as root, so when the tests
run as root its files belong to the `mysql` account and it runs as that user; redis-server
runs as whoever runs the tests. Readiness is polled with a deadline; every process is
stopped by its PID at teardown.

    async def test_x(redis_server, vault_redis):
        creds = vault_redis.client().secrets.database.generate_credentials(
            vault_redis.role, mount_point=vault_redis.mount)
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hvac
import pytest
import trustme

from tests.servers import POLL_SECONDS, OpenBao, _stop_pid, free_port

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
MARIADBD = shutil.which("mariadbd") or "/usr/sbin/mariadbd"
MARIADB_INSTALL_DB = shutil.which("mariadb-install-db") or "/usr/bin/mariadb-install-db"
# A redis-server is ready in milliseconds; mariadb-install-db plus the first start take a
# few seconds, more on a loaded 2-core CI box.
REDIS_START_SECONDS = 30.0
MARIADB_START_SECONDS = 90.0
# Lease lengths of the dynamic users: long enough that no test sees one expire.
ROLE_DEFAULT_TTL = "1h"
ROLE_MAX_TTL = "24h"


def _tls_files(directory: Path, owner: str | None = None) -> Path:
    """A CA and a server certificate for localhost/127.0.0.1 in `directory`; returns the
    CA's path."""
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    (directory / "ca.pem").write_bytes(ca.cert_pem.bytes())
    (directory / "server.pem").write_bytes(b"".join(p.bytes() for p in cert.cert_chain_pems))
    key = directory / "server-key.pem"
    key.write_bytes(cert.private_key_pem.bytes())
    key.chmod(0o600)
    if owner is not None and os.geteuid() == 0:
        for name in ("ca.pem", "server.pem", "server-key.pem"):
            shutil.chown(directory / name, owner, owner)
    return directory / "ca.pem"


# --------------------------------------------------------------------------- Redis


@dataclass
class RedisServer:
    """A running redis-server: plain TCP on `port`, TLS on `tls_port` (CA at `ca_path`; no
    client certificate asked for). ``requirepass`` is set; `passwords` holds the ACL users'
    passwords (``vaultadmin`` manages users, ``static_user`` is for KV credentials)."""

    host: str
    port: int
    tls_port: int
    ca_path: Path
    workdir: Path
    passwords: dict[str, str] = field(repr=False)
    proc: subprocess.Popen[bytes] = field(repr=False)

    def command(self, *args: str) -> str:
        """Run one command as vaultadmin over plain TCP with redis-cli; its raw output."""
        result = subprocess.run(
            ["redis-cli", "-h", self.host, "-p", str(self.port), "--user", "vaultadmin",
             "--pass", self.passwords["vaultadmin"], "--no-auth-warning", *args],
            capture_output=True, text=True, check=False, timeout=30,
        )  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(f"redis-cli failed: {result.stderr.strip()}")
        return result.stdout

    def users(self) -> set[str]:
        """Every ACL user name (ACL USERS)."""
        return set(self.command("ACL", "USERS").split())

    def log(self) -> str:
        return (self.workdir / "redis.log").read_text(errors="replace")


def _ping(host: str, port: int, password: str) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1) as sock:
            sock.sendall(f"AUTH vaultadmin {password}\r\nPING\r\n".encode())
            data = b""
            while data.count(b"\r\n") < 2:
                chunk = sock.recv(256)
                if not chunk:
                    return False
                data += chunk
            return data == b"+OK\r\n+PONG\r\n"
    except OSError:
        return False


def start_redis(workdir: Path) -> RedisServer:
    workdir.mkdir(parents=True, exist_ok=True)
    ca_path = _tls_files(workdir)
    port, tls_port = free_port(), free_port()
    passwords = {
        "default": secrets.token_urlsafe(18),
        "vaultadmin": secrets.token_urlsafe(18),
        "static_user": secrets.token_urlsafe(18),
    }
    p = passwords
    (workdir / "redis.conf").write_text(
        f"""bind 127.0.0.1
port {port}
tls-port {tls_port}
tls-cert-file {workdir}/server.pem
tls-key-file {workdir}/server-key.pem
tls-ca-cert-file {ca_path}
tls-auth-clients no
dir {workdir}
logfile {workdir}/redis.log
save ""
appendonly no
daemonize no
protected-mode yes
# The default user needs a password: RESET would otherwise log any session in as it.
requirepass {p["default"]}
user vaultadmin on >{p["vaultadmin"]} ~* &* +@all
user static_user on >{p["static_user"]} ~* &* +@all
"""
    )
    server = RedisServer(
        "127.0.0.1", port, tls_port, ca_path, workdir, passwords, _spawn_redis(workdir)
    )
    _wait_redis(server)
    return server


def _spawn_redis(workdir: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [REDIS_SERVER, str(workdir / "redis.conf")],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )  # fmt: skip


def _wait_redis(server: RedisServer) -> None:
    deadline = time.monotonic() + REDIS_START_SECONDS
    proc = server.proc
    while not _ping(server.host, server.port, server.passwords["vaultadmin"]):
        if proc.poll() is not None:
            log = server.log() if (server.workdir / "redis.log").exists() else ""
            raise RuntimeError(f"redis-server exited with {proc.returncode}:\n{log[-3000:]}")
        if time.monotonic() > deadline:
            _stop_pid(proc)
            raise RuntimeError(f"redis-server not ready after {REDIS_START_SECONDS}s")
        time.sleep(POLL_SECONDS)


def restart_redis(server: RedisServer) -> None:
    """Stop the server (SIGTERM) and start it again on its ports with its config, as an
    operator's restart does: users not in the config (the vault's dynamic ones) are gone."""
    _stop_pid(server.proc)
    server.proc = _spawn_redis(server.workdir)
    _wait_redis(server)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for the session."""
    if not Path(REDIS_SERVER).exists():
        pytest.skip("redis-server is not installed (scripts/system-deps.sh installs it)")
    server = start_redis(tmp_path_factory.mktemp("redis"))
    try:
        yield server
    finally:
        _stop_pid(server.proc)


@dataclass
class VaultEngine:
    """A database secrets engine mount of the session OpenBao, wired to one server."""

    openbao: OpenBao
    mount: str
    connection: str
    role: str

    def client(self) -> hvac.Client:
        return self.openbao.client()

    def mount_database(self, plugin: str, creation: list[str], **connection: Any) -> None:
        """Enable the database engine at `mount`, configure its connection (`connection`:
        the plugin's address and admin login) and create `role` with `creation`."""
        client = self.client()
        client.sys.enable_secrets_engine("database", path=self.mount)
        client.secrets.database.configure(
            name=self.connection,
            plugin_name=plugin,
            allowed_roles=["*"],
            verify_connection=True,
            mount_point=self.mount,
            **connection,
        )
        client.secrets.database.create_role(
            name=self.role,
            db_name=self.connection,
            creation_statements=creation,
            default_ttl=ROLE_DEFAULT_TTL,
            max_ttl=ROLE_MAX_TTL,
            mount_point=self.mount,
        )

    def leases(self) -> list[str]:
        """Lease ids under <mount>/creds/<role>/ (empty if none)."""
        try:
            listed = self.client().sys.list_leases(f"{self.mount}/creds/{self.role}")
        except hvac.exceptions.InvalidPath:
            return []
        return list(listed["data"]["keys"])


# ACL rules of a dynamic Redis user: every key and command (like app-rw for PostgreSQL).
REDIS_CREATION = ['["~*", "&*", "+@all"]']


@pytest.fixture(scope="session")
def vault_redis(openbao: OpenBao, redis_server: RedisServer) -> VaultEngine:
    """Mount `redis-db` on the session OpenBao, pointed at the session redis-server over
    TLS as vaultadmin, with role cache-rw."""
    engine = VaultEngine(openbao, "redis-db", "cache", "cache-rw")
    engine.mount_database(
        "redis-database-plugin",
        REDIS_CREATION,
        host=redis_server.host,
        port=redis_server.tls_port,
        tls=True,
        ca_cert=redis_server.ca_path.read_text(),
        username="vaultadmin",
        password=redis_server.passwords["vaultadmin"],
    )
    return engine


# --------------------------------------------------------------------------- MariaDB


def _as_mysql(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "mysql", "--", *cmd] if os.geteuid() == 0 else cmd


@dataclass
class MariaDB:
    """A running throwaway MariaDB: TCP on 127.0.0.1:`port` (TLS offered, certificate for
    localhost/127.0.0.1 from the CA at `ca_path`), and a unix socket where root (no
    password) administers it. Databases appdb and otherdb; `passwords` holds the users'
    (vaultadmin: all privileges; native_user and ed25519_user: appdb only)."""

    host: str
    port: int
    socket: Path
    base: Path
    ca_path: Path
    passwords: dict[str, str] = field(repr=False)
    proc: subprocess.Popen[bytes] = field(repr=False)
    # The server's command line, to start it again (`restart_mariadb`).
    argv: list[str] = field(default_factory=list, repr=False)

    def sql(self, statement: str, database: str = "") -> str:
        """Run SQL as root over the unix socket; tab-separated rows without headers."""
        result = subprocess.run(
            ["mariadb", "--no-defaults", "-uroot", f"--socket={self.socket}", "-N", "-B",
             "-e", statement, *([database] if database else [])],
            capture_output=True, text=True, check=False, timeout=60,
        )  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(f"mariadb failed: {result.stderr.strip()}")
        return result.stdout

    def users(self) -> set[str]:
        """Every user name in mysql.user."""
        return set(self.sql("SELECT User FROM mysql.user").split())

    def log(self) -> str:
        path = self.base / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""


def start_mariadb(base: Path) -> MariaDB:
    datadir, sock = base / "data", base / "mysqld.sock"
    owner = "mysql" if os.geteuid() == 0 else None
    if owner:
        shutil.chown(base, owner, owner)
    ca_path = _tls_files(base, owner)
    install = subprocess.run(
        _as_mysql([MARIADB_INSTALL_DB, "--no-defaults", f"--datadir={datadir}",
                   "--auth-root-authentication-method=normal", "--skip-test-db",
                   "--skip-name-resolve"]),
        capture_output=True, text=True, check=False, timeout=MARIADB_START_SECONDS,
    )  # fmt: skip
    if install.returncode != 0:
        raise RuntimeError(f"mariadb-install-db failed: {install.stderr.strip()[-3000:]}")
    port = free_port()
    argv = _as_mysql([MARIADBD, "--no-defaults", f"--datadir={datadir}", f"--socket={sock}",
                   f"--port={port}", "--bind-address=127.0.0.1", f"--pid-file={base}/mysqld.pid",
                   f"--log-error={base}/error.log", "--skip-name-resolve",
                   f"--ssl-ca={ca_path}", f"--ssl-cert={base}/server.pem",
                   f"--ssl-key={base}/server-key.pem", "--plugin-load-add=auth_ed25519",
                   # A throwaway server: durability and big buffers buy nothing here.
                   "--innodb-buffer-pool-size=32M", "--innodb-flush-log-at-trx-commit=0",
                   "--skip-log-bin", "--max-connections=300"])  # fmt: skip
    proc = _spawn(argv)
    passwords = {
        "vaultadmin": secrets.token_urlsafe(18),
        "native_user": secrets.token_urlsafe(18),
        "ed25519_user": secrets.token_urlsafe(18),
    }
    db = MariaDB("127.0.0.1", port, sock, base, ca_path, passwords, proc, argv)
    _wait_mariadb(db)
    p = passwords
    db.sql(
        "CREATE DATABASE appdb; CREATE DATABASE otherdb;"
        "CREATE TABLE appdb.items (id INT PRIMARY KEY, name VARCHAR(40));"
        "INSERT INTO appdb.items VALUES (1, 'one'), (2, 'two');"
        f"CREATE USER vaultadmin@'%' IDENTIFIED BY '{p['vaultadmin']}';"
        "GRANT ALL PRIVILEGES ON *.* TO vaultadmin@'%' WITH GRANT OPTION;"
        f"CREATE USER native_user@'%' IDENTIFIED BY '{p['native_user']}';"
        "GRANT ALL PRIVILEGES ON appdb.* TO native_user@'%';"
        "CREATE USER ed25519_user@'%' IDENTIFIED VIA ed25519 "
        f"USING PASSWORD('{p['ed25519_user']}');"
        "GRANT ALL PRIVILEGES ON appdb.* TO ed25519_user@'%';"
    )
    return db


def _spawn(argv: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
    )


def _wait_mariadb(db: MariaDB) -> None:
    deadline = time.monotonic() + MARIADB_START_SECONDS
    while True:
        if db.proc.poll() is not None:
            raise RuntimeError(f"mariadbd exited with {db.proc.returncode}:\n{db.log()[-3000:]}")
        try:
            db.sql("SELECT 1")
            return
        except RuntimeError:
            if time.monotonic() > deadline:
                _stop_pid(db.proc)
                raise RuntimeError(f"MariaDB not ready after {MARIADB_START_SECONDS}s") from None
            time.sleep(POLL_SECONDS)


def restart_mariadb(db: MariaDB) -> None:
    """Stop the server (SIGTERM: a clean shutdown that ends every session) and start it again
    with the same command line, as an operator's restart does; users are kept on disk."""
    _stop_pid(db.proc)
    db.proc = _spawn(db.argv)
    _wait_mariadb(db)


def stop_mariadb(db: MariaDB) -> None:
    _stop_pid(db.proc)


@pytest.fixture(scope="session")
def mariadb() -> Iterator[MariaDB]:
    """One MariaDB for the session (databases appdb and otherdb)."""
    if not Path(MARIADBD).exists():
        pytest.skip("mariadb-server is not installed (scripts/system-deps.sh installs it)")
    # Not tmp_path_factory: its base is 0700 root, which the mysql account cannot traverse.
    base = Path(tempfile.mkdtemp(prefix="sidekey-mariadb-"))
    try:
        db = start_mariadb(base)
        try:
            yield db
        finally:
            stop_mariadb(db)
    finally:
        shutil.rmtree(base, ignore_errors=True)


# Statements of the dynamic MySQL users: appdb only, like app-rw for PostgreSQL.
MYSQL_CREATION = [
    "CREATE USER '{{name}}'@'%' IDENTIFIED BY '{{password}}';",
    "GRANT ALL PRIVILEGES ON appdb.* TO '{{name}}'@'%';",
]


@pytest.fixture(scope="session")
def vault_mysql(openbao: OpenBao, mariadb: MariaDB) -> VaultEngine:
    """Mount `mysql-db` on the session OpenBao, pointed at the session MariaDB as
    vaultadmin, with role orders-rw."""
    engine = VaultEngine(openbao, "mysql-db", "orders", "orders-rw")
    engine.mount_database(
        "mysql-database-plugin",
        MYSQL_CREATION,
        connection_url=f"{{{{username}}}}:{{{{password}}}}@tcp({mariadb.host}:{mariadb.port})/",
        username="vaultadmin",
        password=mariadb.passwords["vaultadmin"],
    )
    return engine
