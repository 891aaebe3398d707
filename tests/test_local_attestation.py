"""`client_auth: local` with `local:` rules: a caller on a unix socket gets the SPIFFE ID its
kernel credentials (SO_PEERCRED uid, gid; its executable and cgroup from /proc) select, and
an unmatched caller is refused in its protocol, naming its uid (issue 18.2).

The clients are the real ones (psql, asyncpg, mariadb, redis-cli), each run as another uid
with `setpriv` (never subprocess's ``user=``: a fork of this multi-threaded process can die
before exec), over a socket with no TLS and no password; the upstream legs are TLS.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from broker.config import LocalRule
from broker.identity import IdentityError
from broker.identity.local import PeerCredentials, attest, pod_uid
from tests.brokers import audit_events, base_config, running_broker
from tests.clients import run_client
from tests.pki import Pki
from tests.servers import PG_BIN, VaultDatabase
from tests.servers_mysql_redis import MariaDB, RedisServer, VaultEngine

ORDERS = "spiffe://example.org/ns/prod/sa/orders"
REPORT = "spiffe://example.org/ns/prod/sa/report"
# Arbitrary ids with no passwd entry: the kernel names them all the same.
ORDERS_UID, REPORT_GID, STRANGER_UID = 41000, 42000, 43000
POD = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"


def rules(*entries: dict[str, Any]) -> tuple[LocalRule, ...]:
    return tuple(LocalRule(where=f"local[{i}]", **e) for i, e in enumerate(entries))


# --------------------------------------------------------------------------- attest, no broker


@pytest.fixture
def me() -> Iterator[PeerCredentials]:
    """This process as a peer, pinned by a pidfd as the broker pins its callers."""
    peer = PeerCredentials(os.getpid(), os.getuid(), os.getgid(), os.pidfd_open(os.getpid()))
    yield peer
    peer.close()


def test_first_matching_rule_wins(me: PeerCredentials) -> None:
    table = rules(
        {"uid": me.uid + 1, "id": "spiffe://example.org/other"},
        {"uid": me.uid, "gid": me.gid, "id": ORDERS},
        {"uid": me.uid, "id": REPORT},
    )
    identity = attest(table, me)
    assert (identity.spiffe_id, identity.method, identity.proof_id) == (ORDERS, "local", "local[1]")


def test_exe_selector_reads_the_peers_executable(me: PeerCredentials) -> None:
    exe = os.path.realpath(f"/proc/{me.pid}/exe")
    table = rules({"exe": "/usr/bin/false", "id": ORDERS}, {"exe": exe, "id": REPORT})
    assert attest(table, me).spiffe_id == REPORT


def test_unmatched_peer_is_refused_naming_its_uid(me: PeerCredentials) -> None:
    with pytest.raises(IdentityError, match=rf"uid {me.uid}, gid {me.gid}, pid {me.pid}"):
        attest(rules({"uid": me.uid + 1, "id": ORDERS}), me)


def test_without_a_pidfd_process_selectors_never_match(me: PeerCredentials) -> None:
    """No pidfd, no way to tell the caller from a process that took its pid since."""
    unpinned = PeerCredentials(me.pid, me.uid, me.gid)
    exe = os.path.realpath(f"/proc/{me.pid}/exe")
    with pytest.raises(IdentityError):
        attest(rules({"exe": exe, "id": ORDERS}), unpinned)
    assert attest(rules({"uid": me.uid, "id": ORDERS}), unpinned).spiffe_id == ORDERS


@pytest.mark.parametrize(
    "cgroup",
    [
        # cgroup v2, cgroupfs driver
        f"0::/kubepods/burstable/pod{POD}/3f7a0c1d2e4b\n",
        # cgroup v2, systemd driver
        "0::/kubepods.slice/kubepods-besteffort.slice/"
        f"kubepods-besteffort-pod{POD.replace('-', '_')}.slice/cri-containerd-3f7a.scope\n",
        # cgroup v1: one line per hierarchy
        f"12:pids:/kubepods/pod{POD}/3f7a\n11:memory:/kubepods/pod{POD}/3f7a\n",
    ],
)
def test_pod_uid_and_cgroup_from_the_cgroup_file(
    tmp_path: Path, me: PeerCredentials, cgroup: str
) -> None:
    (tmp_path / str(me.pid)).mkdir()
    (tmp_path / str(me.pid) / "cgroup").write_text(cgroup)
    assert pod_uid([line.split(":", 2)[2] for line in cgroup.splitlines()]) == POD
    table = rules({"pod_uid": "00000000-0000-0000-0000-000000000000", "id": ORDERS},
                  {"pod_uid": POD, "id": REPORT})  # fmt: skip
    assert attest(table, me, proc=str(tmp_path)).spiffe_id == REPORT
    assert attest(rules({"cgroup": "/kubepods*", "id": ORDERS}), me, str(tmp_path)).spiffe_id
    with pytest.raises(IdentityError):
        attest(rules({"cgroup": "/system.slice/*", "id": ORDERS}), me, proc=str(tmp_path))


# --------------------------------------------------------------------------- real clients


def as_user(uid: int, gid: int, *cmd: str) -> list[str]:
    return ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--", *cmd]


async def run(argv: list[str], pythonpath: Path | None = None) -> tuple[int, str, str]:
    env = {"HOME": "/tmp", "PGCONNECT_TIMEOUT": "10"}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return await run_client(argv, env=env)


@pytest.fixture(scope="module")
def readable_asyncpg() -> Iterator[Path]:
    """A copy of asyncpg every test uid can import (a directory for PYTHONPATH): the venv's
    may sit in a checkout only root can enter (a `mktemp -d` clone is mode 0700)."""
    lib = Path(tempfile.mkdtemp(prefix="sk-lib-"))
    shutil.copytree(Path(asyncpg.__file__).parent, lib / "asyncpg")
    for path in (lib, *lib.rglob("*")):
        path.chmod(0o755 if path.is_dir() else 0o644)
    yield lib
    shutil.rmtree(lib)


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A short path (sun_path holds 108 bytes) every test uid may traverse."""
    path = Path(tempfile.mkdtemp(prefix="sk-"))
    path.chmod(0o755)
    yield path
    for child in path.iterdir():
        child.unlink()
    path.rmdir()


def local_service(
    name: str, adapter: str, listen: str, *, upstream: dict[str, Any],
    credentials: dict[str, Any], exe: str,
) -> dict[str, Any]:  # fmt: skip
    return {
        "name": name,
        "adapter": adapter,
        "listen": f"unix:{listen}",
        "socket_mode": "0666",  # the test's uids are strangers to the broker's group
        "client_auth": "local",
        "local": [
            {"uid": ORDERS_UID, "id": ORDERS},
            {"gid": REPORT_GID, "exe": exe, "id": REPORT},
        ],
        "upstream": upstream,
        "credentials": credentials,
        "allow": [ORDERS, REPORT],
    }


ASYNCPG_SCRIPT = """
import asyncio, sys, asyncpg
async def main():
    try:
        conn = await asyncpg.connect(host=sys.argv[1], port=5432, user="x", database="appdb",
                                     timeout=20)
    except asyncpg.PostgresError as exc:
        print(exc.sqlstate, exc)
        return
    print("ok", await conn.fetchval("SELECT current_user"))
    await conn.close()
asyncio.run(main())
"""


async def test_postgres_callers_get_the_id_their_uid_gid_and_exe_select(
    *, tmp_path: Path, pki: Pki, vault_database: VaultDatabase, sock_dir: Path,
    monkeypatch: pytest.MonkeyPatch, readable_asyncpg: Path,
) -> None:  # fmt: skip
    pg = vault_database.postgres
    psql = str(PG_BIN / "psql")  # the executable itself (/usr/bin/psql is a Perl wrapper)
    svc = local_service(
        "orders-db", "postgres", f"{sock_dir}/.s.PGSQL.5432",
        upstream={"address": f"127.0.0.1:{pg.port}", "database": "appdb",
                  "tls": {"mode": "verify-full", "ca": str(pg.ca_path)}},
        credentials={"from": "vault-database", "role": "app-rw"}, exe=psql,
    )  # fmt: skip
    audit = tmp_path / "audit.jsonl"
    config = base_config(pki, services=[svc], vault=vault_database.openbao, audit=audit,
                         admin=False)  # fmt: skip
    sql = [psql, "-X", "-w", "-At", "-h", str(sock_dir), "-p", "5432", "-U", "x", "-d", "appdb"]
    async with running_broker(tmp_path, config, monkeypatch, vault_database.openbao):
        assert (sock_dir / ".s.PGSQL.5432").stat().st_mode & 0o777 == 0o666
        # uid 41000: the first rule; no TLS, no password on the socket, a dynamic role upstream.
        code, out, err = await run(as_user(ORDERS_UID, ORDERS_UID, *sql, "-c", "SELECT 1"))
        assert (code, out.strip()) == (0, "1"), err
        # gid 42000 with psql: the second rule.
        code, out, err = await run(as_user(STRANGER_UID, REPORT_GID, *sql, "-c", "SELECT 2"))
        assert (code, out.strip()) == (0, "2"), err
        # gid 42000 but not psql (asyncpg in Python): no rule, refused with 28000.
        script = [sys.executable, "-c", ASYNCPG_SCRIPT, str(sock_dir)]
        code, out, err = await run(as_user(STRANGER_UID, REPORT_GID, *script), readable_asyncpg)
        assert code == 0, err
        assert out.startswith("28000 ") and f"uid {STRANGER_UID}" in out, out
        # uid 41000 with asyncpg: the first rule does not care about the executable.
        code, out, err = await run(as_user(ORDERS_UID, ORDERS_UID, *script), readable_asyncpg)
        assert out.startswith("ok v-"), (out, err)
        # Nobody's rule: psql prints the broker's FATAL naming the uid.
        code, out, err = await run(as_user(STRANGER_UID, STRANGER_UID, *sql, "-c", "SELECT 3"))
        assert code != 0 and f"uid {STRANGER_UID}, gid {STRANGER_UID}" in err, err
    starts = audit_events(audit, "session_start")
    assert [(e["spiffe_id"], e["auth_method"]) for e in starts] == [
        (ORDERS, "local"), (REPORT, "local"), (ORDERS, "local")
    ]  # fmt: skip
    assert f"uid={ORDERS_UID}" in starts[0]["peer"] and f"gid={REPORT_GID}" in starts[1]["peer"]
    denials = audit_events(audit, "deny")
    assert len(denials) == 2 and all(f"uid {STRANGER_UID}" in d["reason"] for d in denials)


async def test_mariadb_and_redis_cli_over_unix_sockets(
    *, tmp_path: Path, pki: Pki, mariadb: MariaDB, vault_mysql: VaultEngine,
    redis_server: RedisServer, vault_redis: VaultEngine, sock_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    mysql_exe = os.path.realpath("/usr/bin/mariadb")
    redis_exe = os.path.realpath("/usr/bin/redis-cli")
    services = [
        local_service(
            "orders-mysql", "mysql", f"{sock_dir}/mysql.sock",
            upstream={"address": f"127.0.0.1:{mariadb.port}", "database": "appdb",
                      "tls": {"mode": "verify-full", "ca": str(mariadb.ca_path)}},
            credentials={"from": "vault-database", "mount": vault_mysql.mount,
                         "role": vault_mysql.role},
            exe=mysql_exe,
        ),
        local_service(
            "orders-cache", "redis", f"{sock_dir}/redis.sock",
            upstream={"address": f"127.0.0.1:{redis_server.tls_port}",
                      "tls": {"mode": "verify-full", "ca": str(redis_server.ca_path)}},
            credentials={"from": "vault-database", "mount": vault_redis.mount,
                         "role": vault_redis.role},
            exe=redis_exe,
        ),
    ]  # fmt: skip
    config = base_config(pki, services=services, vault=vault_mysql.openbao, admin=False)
    mysql = ["mariadb", "--no-defaults", f"--socket={sock_dir}/mysql.sock", "--protocol=socket",
             "-u", "x", "-N", "-B", "-D", "appdb", "-e"]  # fmt: skip
    redis = ["redis-cli", "-s", f"{sock_dir}/redis.sock"]
    async with running_broker(tmp_path, config, monkeypatch, vault_mysql.openbao):
        code, out, err = await run(as_user(ORDERS_UID, ORDERS_UID, *mysql, "SELECT 40 + 2"))
        assert (code, out.strip()) == (0, "42"), err
        code, out, err = await run(as_user(STRANGER_UID, REPORT_GID, *mysql, "SELECT USER()"))
        assert code == 0 and out.strip().startswith("v-"), err
        code, out, err = await run(as_user(STRANGER_UID, STRANGER_UID, *mysql, "SELECT 1"))
        assert code != 0 and f"uid {STRANGER_UID}" in err, (out, err)

        code, out, err = await run(as_user(ORDERS_UID, ORDERS_UID, *redis, "PING"))
        assert (code, out.strip()) == (0, "PONG"), err
        code, out, err = await run(as_user(STRANGER_UID, REPORT_GID, *redis, "ACL", "WHOAMI"))
        assert code == 0 and out.strip().startswith("V_"), (out, err)
        code, out, err = await run(as_user(STRANGER_UID, STRANGER_UID, *redis, "PING"))
        # The adapter's error code for an identity refusal (Redis's own for a denied ACL).
        assert out.startswith("NOPERM ") and f"uid {STRANGER_UID}" in out, (out, err)
