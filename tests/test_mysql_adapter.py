"""End-to-end tests of the MySQL adapter: real MariaDB, real OpenBao (its
mysql-database-plugin), real clients (the mariadb/mysql CLI, PyMySQL, mysqlslap).

Every test runs a broker in-process and talks to it as an application would: the client's
certificate is its only credential; its user name and password are ignored. PyMySQL is
synchronous, so it runs in a thread while the broker runs on the test's loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pymysql
import pytest

from broker.identity.ca import IssuedFiles
from broker.runtime import Broker
from tests import clients
from tests.brokers import base_config, running_broker
from tests.clients import CLIENT_TIMEOUT, run_client
from tests.pki import DEFAULT_CLIENT_ID, Pki
from tests.servers_mysql_redis import MariaDB, VaultEngine

REVOKE_DEADLINE = 20.0
POLL_SECONDS = 0.1

SERVICE = "orders-mysql"
OTHER_ID = "spiffe://example.org/ns/prod/sa/billing"
DENIED_ID = "spiffe://example.org/ns/prod/sa/intruder"
LOCAL_ID = "spiffe://example.org/ns/dev/sa/local-app"
T = TypeVar("T")


def service(
    db: MariaDB,
    engine: VaultEngine,
    *,
    credentials: dict[str, Any] | None = None,
    tls: dict[str, Any] | None = None,
    client_auth: str = "mtls",
    port: int | None = None,
    database: Any = "appdb",
    **extra: Any,
) -> dict[str, Any]:
    svc: dict[str, Any] = {
        "name": SERVICE,
        "adapter": "mysql",
        "listen": "127.0.0.1:0",
        "client_auth": client_auth,
        "upstream": {
            "address": f"127.0.0.1:{port or db.port}",
            "database": database,
            "tls": tls or {"mode": "verify-full", "ca": str(db.ca_path)},
        },
        "credentials": credentials
        or {"from": "vault-database", "mount": engine.mount, "role": engine.role},
        "allow": [DEFAULT_CLIENT_ID, OTHER_ID],
    }
    if client_auth == "local":
        svc["local_identity"] = LOCAL_ID
        svc["allow"] = [LOCAL_ID]
    svc.update(extra)
    return svc


@dataclass
class World:
    tmp_path: Path
    pki: Pki
    db: MariaDB
    engine: VaultEngine
    monkeypatch: pytest.MonkeyPatch

    def service(self, **kwargs: Any) -> dict[str, Any]:
        return service(self.db, self.engine, **kwargs)

    @asynccontextmanager
    async def broker(
        self, svc: dict[str, Any] | None = None, audit: Path | None = None
    ) -> AsyncIterator[Broker]:
        config = base_config(
            self.pki, services=[svc or self.service()], vault=self.engine.openbao,
            audit=audit, admin=False,
        )  # fmt: skip
        async with running_broker(
            self.tmp_path, config, self.monkeypatch, self.engine.openbao
        ) as broker:
            yield broker

    def kv(self, path: str, user: str, password: str) -> dict[str, Any]:
        self.engine.client().secrets.kv.v2.create_or_update_secret(
            path=path, secret={"username": user, "password": password}
        )
        return {"from": "vault-kv", "path": path}


@pytest.fixture
def world(
    tmp_path: Path,
    pki: Pki,
    mariadb: MariaDB,
    vault_mysql: VaultEngine,
    monkeypatch: pytest.MonkeyPatch,
) -> World:
    return World(tmp_path, pki, mariadb, vault_mysql, monkeypatch)


def host_port(broker: Broker) -> tuple[str, int]:
    return clients.host_port(broker, SERVICE)


def connect(
    broker: Broker, pki: Pki, issued: IssuedFiles | None, **kwargs: Any
) -> pymysql.connections.Connection[Any]:
    host, port = host_port(broker)
    tls: dict[str, Any] = {}
    if issued is not None:
        tls = {
            "ssl_ca": str(pki.bundle), "ssl_cert": str(issued.cert), "ssl_key": str(issued.key),
            "ssl_verify_cert": True, "ssl_verify_identity": True,
        }  # fmt: skip
    options: dict[str, Any] = {
        "user": "ignored", "password": "ignored-too", "database": "appdb",
        "connect_timeout": CLIENT_TIMEOUT, "read_timeout": CLIENT_TIMEOUT,
    }  # fmt: skip
    options.update(kwargs)
    return pymysql.connect(host=host, port=port, **tls, **options)


async def in_thread(fn: Callable[[], T]) -> T:
    return await asyncio.wait_for(asyncio.to_thread(fn), CLIENT_TIMEOUT)


def query(conn: pymysql.connections.Connection[Any], sql: str) -> Any:
    with conn.cursor() as cursor:
        cursor.execute(sql)
        return cursor.fetchall()


async def run(*argv: str) -> tuple[int, str, str]:
    return await run_client(argv)


def cli(broker: Broker, pki: Pki, issued: IssuedFiles, database: str = "appdb") -> list[str]:
    """The mariadb client, as a user runs it (Debian 12's spells VERIFY_IDENTITY
    --ssl-verify-server-cert)."""
    host, port = host_port(broker)
    return [
        "mariadb", "--no-defaults", "-h", host, "-P", str(port), "-u", "ignored",
        f"--ssl-ca={pki.bundle}", f"--ssl-cert={issued.cert}", f"--ssl-key={issued.key}",
        "--ssl-verify-server-cert", "-N", "-B", "-D", database,
    ]  # fmt: skip


async def wait_for(predicate: Any, what: str, deadline: float = REVOKE_DEADLINE) -> None:
    end = time.monotonic() + deadline
    while not await predicate():
        if time.monotonic() > end:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(POLL_SECONDS)


def events(audit: Path, kind: str) -> list[dict[str, Any]]:
    return [e for e in map(json.loads, audit.read_text().splitlines()) if e["event"] == kind]


# --------------------------------------------------------------------------- mTLS clients


async def test_mariadb_cli_gets_a_dynamic_user(world: World) -> None:
    async with world.broker() as b:
        code, out, err = await run(
            *cli(b, world.pki, world.pki.client()), "-e",
            "SELECT CURRENT_USER(); SELECT DATABASE(); SHOW STATUS LIKE 'Ssl_version'",
        )  # fmt: skip
        assert code == 0, err
        user, database, ssl = out.splitlines()
        assert user.startswith("v-token-orders-rw-"), user
        assert user.split("@")[0] in world.db.users()
        assert database == "appdb"
        assert ssl.split("\t")[1].startswith("TLS"), "the upstream session is TLS"


async def test_pymysql_identities_get_their_own_reused_users(world: World) -> None:
    audit = world.tmp_path / "audit.jsonl"
    pki = world.pki
    async with world.broker(audit=audit) as b:
        conns = [
            await in_thread(lambda issued=issued: connect(b, pki, issued))
            for issued in (pki.client(), pki.client(), pki.client(OTHER_ID))
        ]
        try:
            users = [
                (await in_thread(lambda conn=conn: query(conn, "SELECT CURRENT_USER()")))[0][0]
                for conn in conns
            ]
            assert users[0] == users[1], "the same identity reuses its lease"
            assert users[0] != users[2], "another identity gets its own user"
            rows = await in_thread(lambda: query(conns[0], "SELECT name FROM items ORDER BY id"))
            assert rows == (("one",), ("two",))
        finally:
            for conn in conns:
                conn.close()
    starts, ends = events(audit, "session_start"), events(audit, "session_end")
    assert len(starts) == 3 and len(ends) == 3
    assert {e["upstream_user"] + "@%" for e in starts} == set(users)
    assert all(e["database"] == "appdb" for e in starts)
    assert all(e["lease_id"].startswith("mysql-db/creds/orders-rw/") for e in starts)
    assert all(e["outcome"] == "ok" for e in ends), [(e["outcome"], e.get("error")) for e in ends]


async def test_denied_identity_gets_an_error_naming_identity_and_service(world: World) -> None:
    audit = world.tmp_path / "audit.jsonl"
    pki = world.pki
    async with world.broker(audit=audit) as b:
        with pytest.raises(pymysql.err.OperationalError) as raised:
            await in_thread(lambda: connect(b, pki, pki.client(DENIED_ID)))
        assert raised.value.args[0] == 1045
        assert DENIED_ID in raised.value.args[1] and SERVICE in raised.value.args[1]
        code, _, err = await run(*cli(b, pki, pki.client(DENIED_ID)), "-e", "SELECT 1")
        assert code != 0 and "ERROR 1045 (28000)" in err and DENIED_ID in err, err
    assert [e["spiffe_id"] for e in events(audit, "deny")] == [DENIED_ID] * 2


async def test_client_without_tls_is_told_how_to_connect(world: World) -> None:
    async with world.broker() as b:
        host, port = host_port(b)
        code, _, err = await run(
            "mariadb", "--no-defaults", "-h", host, "-P", str(port), "-u", "x", "--skip-ssl",
            "-e", "SELECT 1",
        )  # fmt: skip
        assert code != 0
        assert "requires TLS with a client certificate" in err, err
        assert "--ssl-cert" in err


async def test_databases_outside_the_service_are_refused(world: World) -> None:
    pki = world.pki
    async with world.broker() as b:
        with pytest.raises(pymysql.err.OperationalError) as raised:
            await in_thread(lambda: connect(b, pki, pki.client(), database="otherdb"))
        assert raised.value.args[0] == 1044
        assert "'otherdb' is not available through service orders-mysql" in raised.value.args[1]
        conn = await in_thread(lambda: connect(b, pki, pki.client()))
        try:
            for sql in (
                "USE otherdb",
                "use `mysql`",
                "/*!40101 USE otherdb */",
                "-- x\n USE mysql",
            ):
                with pytest.raises(pymysql.err.OperationalError) as raised:
                    await in_thread(lambda sql=sql: query(conn, sql))
                assert raised.value.args[0] == 1044, sql
            with pytest.raises(pymysql.err.OperationalError):
                await in_thread(lambda: conn.select_db("otherdb"))  # COM_INIT_DB
            await in_thread(lambda: conn.select_db("appdb"))
            assert not await in_thread(lambda: query(conn, "USE appdb"))
            # The session goes on: the refused commands never reached the server.
            assert await in_thread(lambda: query(conn, "SELECT DATABASE()")) == (("appdb",),)
        finally:
            conn.close()
        code, _, err = await run(*cli(b, pki, pki.client()), "-e", "USE otherdb")
        assert code != 0 and "not available through service" in err


async def test_change_user_is_refused_and_reset_connection_passes(world: World) -> None:
    pki, db = world.pki, world.db
    async with world.broker() as b:
        conn = await in_thread(lambda: connect(b, pki, pki.client()))
        try:
            user = (await in_thread(lambda: query(conn, "SELECT CURRENT_USER()")))[0][0]
            await in_thread(lambda: query(conn, "SET @marker = 42"))
            with pytest.raises(pymysql.err.OperationalError) as raised:
                await in_thread(
                    lambda: (
                        conn.change_user("native_user", db.passwords["native_user"], "appdb")
                        if hasattr(conn, "change_user")
                        else _change_user(conn, "native_user")
                    )
                )
            assert "COM_CHANGE_USER is refused" in str(raised.value)
        finally:
            conn.close()
        # COM_RESET_CONNECTION (0x1f) passes: the session variable is gone, the user kept.
        conn = await in_thread(lambda: connect(b, pki, pki.client()))
        try:
            await in_thread(lambda: query(conn, "SET @marker = 42"))
            await in_thread(lambda: _reset_connection(conn))
            assert await in_thread(lambda: query(conn, "SELECT @marker, CURRENT_USER()")) == (
                (None, user),
            )
        finally:
            conn.close()


def _change_user(conn: Any, user: str) -> None:
    """COM_CHANGE_USER by hand (PyMySQL has no API for it): 0x11, user, empty auth."""
    conn._execute_command(0x11, user.encode() + b"\0\0appdb\0")
    conn._read_ok_packet()


def _reset_connection(conn: Any) -> None:
    conn._execute_command(0x1F, b"")
    conn._read_ok_packet()


# --------------------------------------------------------------------------- leases


async def test_lease_revoked_after_idle_and_at_shutdown(world: World) -> None:
    pki, db, engine = world.pki, world.db, world.engine
    idle = world.service(
        credentials={"from": "vault-database", "mount": engine.mount, "role": engine.role,
                     "idle_timeout": 1},
    )  # fmt: skip
    async with world.broker(idle) as b:
        code, out, err = await run(*cli(b, pki, pki.client()), "-e", "SELECT CURRENT_USER()")
        assert code == 0, err
        idle_user = out.strip().split("@")[0]

        async def gone() -> bool:
            return idle_user not in await asyncio.to_thread(db.users)

        await wait_for(gone, f"idle lease of {idle_user} to be revoked")

    async with world.broker() as b:
        code, out, err = await run(*cli(b, pki, pki.client()), "-e", "SELECT CURRENT_USER()")
        assert code == 0, err
        kept = out.strip().split("@")[0]
        assert kept in db.users()
    assert kept not in db.users(), "shutdown revokes every lease"


# --------------------------------------------------------------------------- upstream


@pytest.mark.parametrize("mode", ["verify-full", "verify-ca", "require", "disable"])
async def test_upstream_tls_modes(mode: str, world: World) -> None:
    tls: dict[str, Any] = {"mode": mode}
    if mode.startswith("verify"):
        tls["ca"] = str(world.db.ca_path)
    async with world.broker(world.service(tls=tls)) as b:
        conn = await in_thread(lambda: connect(b, world.pki, world.pki.client()))
        try:
            rows = await in_thread(lambda: query(conn, "SHOW STATUS LIKE 'Ssl_version'"))
            assert bool(rows[0][1]) is (mode != "disable")
        finally:
            conn.close()


@pytest.mark.parametrize("mode", ["disable", "verify-full"])
@pytest.mark.parametrize("user", ["native_user", "ed25519_user"])
async def test_static_credentials_native_and_ed25519(user: str, mode: str, world: World) -> None:
    db = world.db
    creds = world.kv(f"mysql/{user}-{mode}", user, db.passwords[user])
    tls = {"mode": mode, "ca": str(db.ca_path)} if mode != "disable" else {"mode": "disable"}
    async with world.broker(world.service(credentials=creds, tls=tls)) as b:
        code, out, err = await run(*cli(b, world.pki, world.pki.client()), "-e", "SELECT USER()")
        assert code == 0, err
        assert out.strip().startswith(f"{user}@")


async def test_upstream_refusal_reaches_the_client(world: World) -> None:
    creds = world.kv("mysql/wrong", "native_user", "not-the-password")
    async with world.broker(world.service(credentials=creds)) as b:
        with pytest.raises(pymysql.err.OperationalError) as raised:
            await in_thread(lambda: connect(b, world.pki, world.pki.client()))
        assert raised.value.args[0] == 1045
        assert "Access denied for user 'native_user'" in raised.value.args[1]
        assert "not-the-password" not in raised.value.args[1]


async def test_upstream_down_and_credential_unavailable(world: World) -> None:
    from tests.servers import free_port

    pki = world.pki
    for svc, words in (
        (world.service(port=free_port()), "cannot reach the database of service orders-mysql"),
        (
            world.service(credentials={"from": "vault-database", "mount": world.engine.mount,
                                       "role": "no-such-role"}),
            "no credential for service orders-mysql",
        ),
    ):  # fmt: skip
        async with world.broker(svc) as b:
            with pytest.raises(pymysql.err.OperationalError) as raised:
                await in_thread(lambda: connect(b, pki, pki.client()))
            assert words in raised.value.args[1]


# --------------------------------------------------------------------------- secrecy


async def test_password_never_reaches_client_logs_or_audit(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    from broker.identity import local_identity
    from tests.test_postgres_adapter import Capture

    caplog.set_level(logging.DEBUG)
    audit = world.tmp_path / "audit.jsonl"
    # Plaintext both ways (client_auth local, upstream tls disable), so the capture can read
    # what the broker sends the client.
    svc = world.service(client_auth="local", tls={"mode": "disable"})
    async with world.broker(svc, audit) as b:
        source = b.services[SERVICE].context.credentials
        async with source.use(local_identity(LOCAL_ID)) as credential:
            password = credential.fields["password"]
        capture = Capture(host_port(b))
        async with capture as (host, port):
            conn = await in_thread(
                lambda: pymysql.connect(host=host, port=port, user="u", password="p",
                                        database="appdb", connect_timeout=CLIENT_TIMEOUT)
            )  # fmt: skip
            try:
                rows = await in_thread(lambda: query(conn, "SELECT CURRENT_USER()"))
                assert rows[0][0].startswith(credential.fields["username"])
            finally:
                conn.close()
    sent = bytes(capture.to_client)
    assert len(sent) > 100
    assert password.encode() not in sent
    assert password not in caplog.text
    assert password not in audit.read_text()
    assert "session_start" in audit.read_text()


# --------------------------------------------------------------------------- tools


async def test_mysqlslap_through_the_broker(world: World) -> None:
    pki = world.pki
    issued = pki.client()
    async with world.broker() as b:
        host, port = host_port(b)
        code, out, err = await run(
            "mysqlslap", "--no-defaults", "-h", host, "-P", str(port), "-u", "ignored",
            f"--ssl-ca={pki.bundle}", f"--ssl-cert={issued.cert}", f"--ssl-key={issued.key}",
            "--ssl-verify-server-cert", "--create-schema=appdb", "--concurrency=4",
            "--iterations=2", "--number-of-queries=200",
            "--query=SELECT name FROM items WHERE id = 1",
        )  # fmt: skip
        assert code == 0, err
        assert "Average number of seconds to run all queries" in out, out


async def test_hostile_handshake_bytes_and_service_goes_on(world: World) -> None:
    pki = world.pki
    async with world.broker() as b:
        host, port = host_port(b)
        for garbage in (
            b"\xff\xff\xff\x01" + b"\0" * 64,
            b"\x05\0\0\x07hello",
            b"\x20\0\0\x01" + b"\0" * 32,
        ):
            reader, writer = await asyncio.open_connection(host, port)
            greeting = await asyncio.wait_for(reader.read(4096), CLIENT_TIMEOUT)
            assert greeting[4] == 10, "the broker's HandshakeV10"
            writer.write(garbage)
            await writer.drain()
            answer = await asyncio.wait_for(reader.read(), CLIENT_TIMEOUT)
            assert answer == b"" or answer[4] == 0xFF, answer
            writer.close()
        conn = await in_thread(lambda: connect(b, pki, pki.client()))
        try:
            assert await in_thread(lambda: query(conn, "SELECT 1")) == ((1,),)
        finally:
            conn.close()


async def test_connections_over_max_connections_are_told_so(world: World) -> None:
    pki = world.pki
    async with world.broker(world.service(max_connections=1)) as b:
        holder = await in_thread(lambda: connect(b, pki, pki.client()))
        try:
            with pytest.raises(pymysql.err.OperationalError) as raised:
                await in_thread(lambda: connect(b, pki, pki.client()))
            assert raised.value.args[0] == 1040
            assert "service orders-mysql allows 1" in raised.value.args[1]
        finally:
            holder.close()
