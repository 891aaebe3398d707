"""End-to-end tests of the PostgreSQL adapter: real PostgreSQL, real OpenBao, real clients.

Every test runs a broker in-process (tests/brokers.py) and talks to it with psql, pgbench or
asyncpg exactly as an application would: the client's certificate is its only credential.
"""

from __future__ import annotations

import asyncio
import json
import logging
import struct
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import yaml

from broker.codecs.postgres import (
    BackendParser,
    ErrorResponse,
)
from broker.identity.ca import IssuedFiles
from broker.runtime import Broker
from tests import clients
from tests.brokers import base_config, running_broker
from tests.clients import CLIENT_TIMEOUT, run_client
from tests.pki import DEFAULT_CLIENT_ID, Pki, client_ssl_context
from tests.servers import Postgres, VaultDatabase

# How long a revocation (idle or shutdown) may take to show in pg_roles.
REVOKE_DEADLINE = 20.0
POLL_SECONDS = 0.1

SERVICE = "orders-db"
OTHER_ID = "spiffe://example.org/ns/prod/sa/billing"
DENIED_ID = "spiffe://example.org/ns/prod/sa/intruder"
LOCAL_ID = "spiffe://example.org/ns/dev/sa/local-app"


def service(
    postgres: Postgres,
    *,
    credentials: dict[str, Any] | None = None,
    tls: dict[str, Any] | None = None,
    client_auth: str = "mtls",
    listen: str = "127.0.0.1:0",
    database: Any = "appdb",
    port: int | None = None,
    **extra: Any,
) -> dict[str, Any]:
    upstream: dict[str, Any] = {
        "address": f"127.0.0.1:{port or postgres.port}",
        "database": database,
        "tls": tls or {"mode": "verify-full", "ca": str(postgres.ca_path)},
    }
    svc: dict[str, Any] = {
        "name": SERVICE,
        "adapter": "postgres",
        "listen": listen,
        "client_auth": client_auth,
        "upstream": upstream,
        "credentials": credentials or {"from": "vault-database", "role": "app-rw"},
        "allow": [DEFAULT_CLIENT_ID, OTHER_ID],
    }
    if client_auth == "local":
        svc["local_identity"] = LOCAL_ID
        svc["allow"] = [LOCAL_ID]
    svc.update(extra)
    return svc


@asynccontextmanager
async def broker_for(
    tmp_path: Path,
    pki: Pki,
    openbao: Any,
    monkeypatch: pytest.MonkeyPatch,
    svc: dict[str, Any],
    *,
    audit: Path | None = None,
) -> AsyncIterator[Broker]:
    config = base_config(pki, services=[svc], vault=openbao, audit=audit, admin=False)
    async with running_broker(tmp_path, config, monkeypatch, openbao) as broker:
        yield broker


@dataclass
class World:
    """The fixtures most tests need, in one argument."""

    tmp_path: Path
    pki: Pki
    vdb: VaultDatabase
    monkeypatch: pytest.MonkeyPatch

    def broker(self, svc: dict[str, Any], audit: Path | None = None) -> Any:
        return broker_for(
            self.tmp_path, self.pki, self.vdb.openbao, self.monkeypatch, svc, audit=audit
        )


@pytest.fixture
def world(
    tmp_path: Path, pki: Pki, vault_database: VaultDatabase, monkeypatch: pytest.MonkeyPatch
) -> World:
    return World(tmp_path, pki, vault_database, monkeypatch)


def host_port(broker: Broker) -> tuple[str, int]:
    return clients.host_port(broker, SERVICE)


def mtls_dsn(broker: Broker, pki: Pki, issued: IssuedFiles, dbname: str = "appdb") -> str:
    host, port = host_port(broker)
    return (
        f"host={host} port={port} dbname={dbname} user=ignored sslmode=verify-full "
        f"sslrootcert={pki.bundle} sslcert={issued.cert} sslkey={issued.key}"
    )


async def run(*argv: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Run a client program without blocking the event loop the broker runs on."""
    return await run_client(argv, env={"PGCONNECT_TIMEOUT": "10", **(env or {})})


async def psql(dsn: str, sql: str) -> tuple[int, str, str]:
    return await run("psql", "-X", "-w", "-At", "-v", "ON_ERROR_STOP=1", dsn, "-c", sql)


async def asyncpg_connect(
    broker: Broker, pki: Pki, issued: IssuedFiles, **kwargs: Any
) -> asyncpg.Connection:
    host, port = host_port(broker)
    return await asyncpg.connect(
        host=host,
        port=port,
        user="ignored",
        database=kwargs.pop("database", "appdb"),
        ssl=client_ssl_context(pki, issued),
        timeout=CLIENT_TIMEOUT,
        **kwargs,
    )


async def wait_for(predicate: Any, what: str, deadline: float = REVOKE_DEADLINE) -> None:
    """Poll an async predicate until it holds (or fail after `deadline` seconds)."""
    end = time.monotonic() + deadline
    while not await predicate():
        if time.monotonic() > end:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(POLL_SECONDS)


# --------------------------------------------------------------------------- mTLS clients


async def test_psql_gets_a_dynamic_user(
    tmp_path: Path, pki: Pki, vault_database: VaultDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    pg = vault_database.postgres
    async with broker_for(tmp_path, pki, vault_database.openbao, monkeypatch, service(pg)) as b:
        code, out, err = await psql(mtls_dsn(b, pki, pki.client()), "SELECT current_user")
        assert code == 0, err
        user = out.strip()
        assert user.startswith("v-"), user
        assert user in await pg.aroles()


async def test_asyncpg_identities_get_their_own_reused_users(
    tmp_path: Path, pki: Pki, vault_database: VaultDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    pg = vault_database.postgres
    audit = tmp_path / "audit.jsonl"
    svc = service(pg)
    async with broker_for(
        tmp_path, pki, vault_database.openbao, monkeypatch, svc, audit=audit
    ) as b:
        first = await asyncpg_connect(b, pki, pki.client())
        second = await asyncpg_connect(b, pki, pki.client())
        other = await asyncpg_connect(b, pki, pki.client(OTHER_ID))
        try:
            users = [await c.fetchval("SELECT current_user") for c in (first, second, other)]
            assert users[0].startswith("v-") and users[2].startswith("v-")
            assert users[0] == users[1], "the same identity reuses its lease"
            assert users[0] != users[2], "another identity gets its own user"
            # The upstream session is TLS (verify-full against the cluster's CA).
            assert await first.fetchval("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            # The client sees the server's own pid (with the broker's cancel secret:
            # tests/test_postgres_pid.py).
            assert first.get_server_pid() == await first.fetchval("SELECT pg_backend_pid()")
            assert (
                b.metrics.registry.get_sample_value("sidekey_sessions_active", {"service": SERVICE})
                == 3
            )
        finally:
            for conn in (first, second, other):
                await conn.close()
    events = [json.loads(line) for line in audit.read_text().splitlines()]
    starts = [e for e in events if e["event"] == "session_start"]
    ends = [e for e in events if e["event"] == "session_end"]
    assert len(starts) == 3 and len(ends) == 3
    assert {e["upstream_user"] for e in starts} == set(users)
    assert all(e["lease_id"].startswith("database/creds/app-rw/") for e in starts)
    assert all(e["spiffe_id"] in (DEFAULT_CLIENT_ID, OTHER_ID) for e in starts)
    for end in ends:
        # The client sends Terminate and hangs up; the server hangs up on the Terminate: which
        # close the broker sees first is a race.
        assert end["outcome"] == "ok" and end["ended_by"] in ("client", "upstream")
        assert end["bytes_client_to_upstream"] > 0 and end["bytes_upstream_to_client"] > 0
        assert end["duration_ms"] >= 0
    assert (
        b.metrics.registry.get_sample_value(
            "sidekey_sessions_total", {"service": SERVICE, "outcome": "ok"}
        )
        == 3
    )


async def test_denied_identity_gets_28000(
    tmp_path: Path, pki: Pki, vault_database: VaultDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    pg = vault_database.postgres
    audit = tmp_path / "audit.jsonl"
    svc = service(pg)
    async with broker_for(
        tmp_path, pki, vault_database.openbao, monkeypatch, svc, audit=audit
    ) as b:
        with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError) as raised:
            await asyncpg_connect(b, pki, pki.client(DENIED_ID))
        assert raised.value.sqlstate == "28000"
        assert DENIED_ID in str(raised.value) and SERVICE in str(raised.value)
        code, _, err = await psql(mtls_dsn(b, pki, pki.client(DENIED_ID)), "SELECT 1")
        assert code != 0 and "is not allowed to use service orders-db" in err
    denials = [json.loads(x) for x in audit.read_text().splitlines()]
    assert [e["spiffe_id"] for e in denials if e["event"] == "deny"] == [DENIED_ID] * 2


async def test_client_without_tls_is_told_how_to_connect(world: World) -> None:
    pki, pg = world.pki, world.vdb.postgres
    audit = world.tmp_path / "audit.jsonl"
    async with world.broker(service(pg), audit) as b:
        host, port = host_port(b)
        code, _, err = await psql(
            f"host={host} port={port} dbname=appdb user=x sslmode=disable", "SELECT 1"
        )
        assert code != 0
        assert "this service requires TLS with a client certificate" in err
        assert "sslmode=verify-full with sslcert/sslkey" in err
        with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError):
            await asyncpg.connect(host=host, port=port, user="x", database="appdb", ssl=False)
        # TLS without a client certificate: refused in the protocol (tests/test_client_certs.py).
        code, _, err = await psql(
            f"host={host} port={port} dbname=appdb user=x sslmode=verify-full "
            f"sslrootcert={pki.bundle}",
            "SELECT 1",
        )
        assert code != 0
        # Every refusal counts as a denied session, whichever step refused it.
        denied = b.metrics.registry.get_sample_value(
            "sidekey_sessions_total", {"service": SERVICE, "outcome": "denied"}
        )
        assert denied == 3
    denials = [json.loads(x) for x in audit.read_text().splitlines()]
    reasons = [e["reason"] for e in denials if e["event"] == "deny"]
    assert len(reasons) == 3 and all("spiffe_id" not in e for e in denials)
    assert reasons[0] == reasons[1] == "connection is not TLS (no SSLRequest)"
    assert "no client certificate" in reasons[2]


async def test_foreign_trust_domain_certificate_is_refused(
    tmp_path: Path, pki: Pki, vault_database: VaultDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    pg = vault_database.postgres
    async with broker_for(tmp_path, pki, vault_database.openbao, monkeypatch, service(pg)) as b:
        with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError) as raised:
            await asyncpg_connect(b, pki, pki.foreign_domain_client())
        assert "outside the trust domain" in str(raised.value)


async def test_database_outside_the_service_is_refused(
    tmp_path: Path, pki: Pki, vault_database: VaultDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    pg = vault_database.postgres
    svc = service(pg, database=["appdb"])
    async with broker_for(tmp_path, pki, vault_database.openbao, monkeypatch, svc) as b:
        with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError) as raised:
            await asyncpg_connect(b, pki, pki.client(), database="postgres")
        assert 'database "postgres" is not available through service orders-db' in str(raised.value)
        code, _, err = await psql(mtls_dsn(b, pki, pki.client(), dbname="template1"), "SELECT 1")
        assert code != 0 and "not available" in err


async def test_startup_parameters_pass_through(
    tmp_path: Path, pki: Pki, vault_database: VaultDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    pg = vault_database.postgres
    async with broker_for(tmp_path, pki, vault_database.openbao, monkeypatch, service(pg)) as b:
        dsn = (
            mtls_dsn(b, pki, pki.client())
            + " application_name=orders-worker options='-c work_mem=7MB'"
        )
        code, out, err = await psql(
            dsn, "SELECT current_setting('application_name'), current_setting('work_mem')"
        )
        assert code == 0, err
        assert out.strip() == "orders-worker|7MB"


# --------------------------------------------------------------------------- client_auth local


async def test_local_client_auth_over_tcp_and_unix_socket(
    tmp_path: Path, pki: Pki, vault_database: VaultDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    pg = vault_database.postgres
    # libpq finds a unix socket as <dir>/.s.PGSQL.<port>; sun_path is short, so not tmp_path.
    sock_dir = Path(tempfile.mkdtemp(prefix="sk-"))
    try:
        tcp = service(pg, client_auth="local")
        unix = service(pg, client_auth="local", listen=f"unix:{sock_dir}/.s.PGSQL.5432")
        unix["name"] = "orders-db-unix"
        config = base_config(pki, services=[tcp, unix], vault=vault_database.openbao, admin=False)
        async with running_broker(tmp_path, config, monkeypatch, vault_database.openbao) as b:
            host, port = host_port(b)
            # sslmode=prefer: libpq asks for TLS, is told no, and carries on in plaintext.
            code, out, err = await psql(
                f"host={host} port={port} dbname=appdb user=x sslmode=prefer",
                "SELECT current_user",
            )
            assert code == 0, err
            assert out.strip().startswith("v-")
            code, out2, err = await psql(
                f"host={sock_dir} port=5432 dbname=appdb user=x", "SELECT current_user"
            )
            assert code == 0, err
            # Each service has its own lease manager, hence its own lease for the identity.
            assert out2.strip().startswith("v-")
            conn = await asyncpg.connect(
                host=str(sock_dir), port=5432, user="x", database="appdb", timeout=CLIENT_TIMEOUT
            )
            try:
                assert await conn.fetchval("SELECT 40 + 2") == 42
            finally:
                await conn.close()
    finally:
        for child in sock_dir.iterdir():
            child.unlink()
        sock_dir.rmdir()


# --------------------------------------------------------------------------- cancel


async def test_cancel_reaches_the_right_session(
    tmp_path: Path, pki: Pki, vault_database: VaultDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    pg = vault_database.postgres
    async with broker_for(tmp_path, pki, vault_database.openbao, monkeypatch, service(pg)) as b:
        conn = await asyncpg_connect(b, pki, pki.client())
        bystander = await asyncpg_connect(b, pki, pki.client())
        try:
            # asyncpg sends a CancelRequest (over mTLS) when the timeout passes.
            started = time.monotonic()
            with pytest.raises(TimeoutError):
                await conn.fetchval("SELECT pg_sleep(30)", timeout=1.0)
            # Had the cancel not reached the server, this would wait for pg_sleep to end.
            assert await conn.fetchval("SELECT 1", timeout=10) == 1
            assert time.monotonic() - started < 10

            # A wrong secret for a live broker pid, and an unknown pid: both ignored.
            host, port = host_port(b)
            query = asyncio.create_task(bystander.fetchval("SELECT pg_sleep(1.5)"))
            await wait_for(
                lambda: _sleeping(pg), "the bystander query to start", deadline=CLIENT_TIMEOUT
            )
            for pid, secret in ((bystander.get_server_pid(), b"\0\0\0\1"), (12345, b"abcd")):
                reader, writer = await asyncio.open_connection(host, port)
                writer.write(struct.pack("!iiI", 16, 80877102, pid) + secret)
                assert await reader.read() == b"", "no answer to a cancel, as PostgreSQL does"
                writer.close()
                await writer.wait_closed()
            assert await query is None, "the bystander's query was not cancelled"
        finally:
            await conn.close()
            await bystander.close()


async def test_a_cancel_reaches_a_session_whose_service_a_reload_rebuilt(
    tmp_path: Path, pki: Pki, vault_database: VaultDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reload that changes a service beyond its policy rebuilds it: the open sessions drain
    on the old adapter while a new one takes the listener. Their clients' cancels come to the
    new one, which must know their keys (it used to start with an empty table)."""
    pg = vault_database.postgres
    async with broker_for(tmp_path, pki, vault_database.openbao, monkeypatch, service(pg)) as b:
        conn = await asyncpg_connect(b, pki, pki.client())
        try:
            host, port = host_port(b)
            assert b.config.path is not None
            config = yaml.safe_load(b.config.path.read_text())
            config["services"][0].update(listen=f"{host}:{port}", max_connections=77)
            b.config.path.write_text(yaml.safe_dump(config))
            assert (await b.reload())["rebuilt"] == [SERVICE]
            started = time.monotonic()
            with pytest.raises(TimeoutError):
                await conn.fetchval("SELECT pg_sleep(30)", timeout=1.0)
            # Had the cancel not reached the server, this would wait for pg_sleep to end.
            assert await conn.fetchval("SELECT 1", timeout=10) == 1
            assert time.monotonic() - started < 10
            # Sessions of the rebuilt service are cancelled as before.
            fresh = await asyncpg_connect(b, pki, pki.client())
            with pytest.raises(TimeoutError):
                await fresh.fetchval("SELECT pg_sleep(30)", timeout=1.0)
            assert await fresh.fetchval("SELECT 2", timeout=10) == 2
            await fresh.close()
        finally:
            await conn.close()


async def _sleeping(pg: Postgres) -> bool:
    rows = await pg.admin_fetch(
        "SELECT count(*) AS n FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep(1.5)%'"
    )
    return bool(rows[0]["n"])


async def test_psql_cancel_with_sigint(
    tmp_path: Path, pki: Pki, vault_database: VaultDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    """psql 15 sends its CancelRequest in plaintext (PQcancel), even for a TLS session."""
    import signal

    pg = vault_database.postgres
    async with broker_for(tmp_path, pki, vault_database.openbao, monkeypatch, service(pg)) as b:
        proc = await asyncio.create_subprocess_exec(
            "psql", "-X", "-w", mtls_dsn(b, pki, pki.client()), "-c", "SELECT pg_sleep(30)",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            await wait_for(
                lambda: _running(pg, "SELECT pg_sleep(30)"), "psql's query", CLIENT_TIMEOUT
            )
            started = time.monotonic()
            proc.send_signal(signal.SIGINT)
            _, err = await asyncio.wait_for(proc.communicate(), CLIENT_TIMEOUT)
            assert time.monotonic() - started < 10
            assert b"canceling statement due to user request" in err
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


async def _running(pg: Postgres, query: str) -> bool:
    rows = await pg.admin_fetch(
        "SELECT count(*) AS n FROM pg_stat_activity WHERE query = $1 AND state = 'active'", query
    )
    return bool(rows[0]["n"])


# --------------------------------------------------------------------------- leases


async def test_lease_revoked_after_idle_and_at_shutdown(
    tmp_path: Path, pki: Pki, vault_database: VaultDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    pg = vault_database.postgres
    idle = service(pg, credentials={"from": "vault-database", "role": "app-rw", "idle_timeout": 1})
    async with broker_for(tmp_path, pki, vault_database.openbao, monkeypatch, idle) as b:
        code, out, err = await psql(mtls_dsn(b, pki, pki.client()), "SELECT current_user")
        assert code == 0, err
        idle_user = out.strip()

        async def gone() -> bool:
            return idle_user not in await pg.aroles()

        await wait_for(gone, f"idle lease of {idle_user} to be revoked")

    async with broker_for(tmp_path, pki, vault_database.openbao, monkeypatch, service(pg)) as b:
        code, out, err = await psql(mtls_dsn(b, pki, pki.client()), "SELECT current_user")
        assert code == 0, err
        kept_user = out.strip()
        assert kept_user in await pg.aroles()
    assert kept_user not in await pg.aroles(), "shutdown revokes every lease"


async def test_shutdown_ends_open_sessions(
    tmp_path: Path, pki: Pki, vault_database: VaultDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    pg = vault_database.postgres
    audit = tmp_path / "audit.jsonl"
    svc = service(pg)
    async with broker_for(
        tmp_path, pki, vault_database.openbao, monkeypatch, svc, audit=audit
    ) as b:
        conn = await asyncpg_connect(b, pki, pki.client())
        assert await conn.fetchval("SELECT 1") == 1
    # running_broker drained for 2 s, then cut the session.
    with pytest.raises((asyncpg.ConnectionDoesNotExistError, asyncpg.InterfaceError, OSError)):
        await conn.fetchval("SELECT 1")
    await conn.close()
    ends = [json.loads(x) for x in audit.read_text().splitlines()]
    ends = [e for e in ends if e["event"] == "session_end"]
    assert ends and ends[-1]["outcome"] == "cancelled" and ends[-1]["ended_by"] == "cancelled"


# --------------------------------------------------------------------------- upstream TLS/auth


@pytest.mark.parametrize("mode", ["verify-full", "verify-ca", "require", "disable"])
async def test_upstream_tls_modes(
    mode: str,
    tmp_path: Path,
    pki: Pki,
    vault_database: VaultDatabase,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pg = vault_database.postgres
    tls: dict[str, Any] = {"mode": mode}
    if mode.startswith("verify"):
        tls["ca"] = str(pg.ca_path)
    svc = service(pg, tls=tls)
    async with broker_for(tmp_path, pki, vault_database.openbao, monkeypatch, svc) as b:
        conn = await asyncpg_connect(b, pki, pki.client())
        try:
            upstream_tls = await conn.fetchval(
                "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
            )
            assert upstream_tls is (mode != "disable")
        finally:
            await conn.close()


async def test_upstream_certificate_from_another_ca_is_refused(
    tmp_path: Path, pki: Pki, vault_database: VaultDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    pg = vault_database.postgres
    svc = service(pg, tls={"mode": "verify-full", "ca": str(pki.bundle)})
    async with broker_for(tmp_path, pki, vault_database.openbao, monkeypatch, svc) as b:
        with pytest.raises(asyncpg.PostgresError) as raised:
            await asyncpg_connect(b, pki, pki.client())
        assert raised.value.sqlstate == "08001"
        assert "certificate verify failed" in str(raised.value).lower() or "TLS" in str(
            raised.value
        )


def _kv(vault_database: VaultDatabase, path: str, user: str, password: str) -> dict[str, Any]:
    vault_database.client().secrets.kv.v2.create_or_update_secret(
        path=path, secret={"username": user, "password": password}
    )
    return {"from": "vault-kv", "path": path}


@pytest.mark.parametrize(
    ("user", "mode"),
    [("md5_user", "disable"), ("md5_user", "verify-full"), ("plain_user", "verify-full")],
)
async def test_static_credentials_md5_and_cleartext(user: str, mode: str, world: World) -> None:
    pki, vault_database = world.pki, world.vdb
    pg = vault_database.postgres
    creds = _kv(vault_database, f"pg/{user}-{mode}", user, pg.passwords[user])
    tls = {"mode": mode, "ca": str(pg.ca_path)} if mode != "disable" else {"mode": "disable"}
    svc = service(pg, credentials=creds, tls=tls)
    async with world.broker(svc) as b:
        code, out, err = await psql(mtls_dsn(b, pki, pki.client()), "SELECT current_user")
        assert code == 0, err
        assert out.strip() == user


async def test_upstream_auth_failure_reaches_the_client(
    tmp_path: Path, pki: Pki, vault_database: VaultDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    pg = vault_database.postgres
    creds = _kv(vault_database, "pg/wrong", "md5_user", "not-the-password")
    svc = service(pg, credentials=creds)
    async with broker_for(tmp_path, pki, vault_database.openbao, monkeypatch, svc) as b:
        with pytest.raises(asyncpg.InvalidPasswordError) as raised:
            await asyncpg_connect(b, pki, pki.client())
        assert raised.value.sqlstate == "28P01"
        assert 'password authentication failed for user "md5_user"' in str(raised.value)
        assert "not-the-password" not in str(raised.value)


async def test_upstream_down_fails_fast_with_08001(
    tmp_path: Path, pki: Pki, vault_database: VaultDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.servers import free_port

    pg = vault_database.postgres
    svc = service(pg, port=free_port())
    async with broker_for(tmp_path, pki, vault_database.openbao, monkeypatch, svc) as b:
        started = time.monotonic()
        with pytest.raises(asyncpg.PostgresError) as raised:
            await asyncpg_connect(b, pki, pki.client())
        assert raised.value.sqlstate == "08001"
        assert "cannot reach the database of service orders-db" in str(raised.value)
        assert time.monotonic() - started < 5


async def test_credential_unavailable_is_08006(
    tmp_path: Path, pki: Pki, vault_database: VaultDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    pg = vault_database.postgres
    svc = service(pg, credentials={"from": "vault-database", "role": "no-such-role"})
    async with broker_for(tmp_path, pki, vault_database.openbao, monkeypatch, svc) as b:
        with pytest.raises(asyncpg.PostgresError) as raised:
            await asyncpg_connect(b, pki, pki.client())
        assert raised.value.sqlstate == "08006"
        assert "no credential for service orders-db" in str(raised.value)


# --------------------------------------------------------------------------- pgbench


async def test_pgbench_through_the_broker(
    tmp_path: Path, pki: Pki, vault_database: VaultDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    pg = vault_database.postgres
    async with broker_for(tmp_path, pki, vault_database.openbao, monkeypatch, service(pg)) as b:
        host, port = host_port(b)
        issued = pki.client("spiffe://example.org/ns/prod/sa/orders")
        env = {
            "PGHOST": host, "PGPORT": str(port), "PGDATABASE": "appdb", "PGUSER": "ignored",
            "PGSSLMODE": "verify-full", "PGSSLROOTCERT": str(pki.bundle),
            "PGSSLCERT": str(issued.cert), "PGSSLKEY": str(issued.key),
        }  # fmt: skip
        code, _, err = await run("pgbench", "-i", "-s", "1", "-q", env=env)
        assert code == 0, err
        code, out, err = await run("pgbench", "-T", "3", "-c", "4", "-j", "2", "-n", env=env)
        assert code == 0, err
        assert "number of failed transactions: 0" in out
        assert "number of transactions actually processed" in out


# --------------------------------------------------------------------------- secrecy


class Capture:
    """A TCP relay between a client and the broker that keeps what the broker sent."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.to_client = bytearray()
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> tuple[str, int]:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        host, port = self.server.sockets[0].getsockname()[:2]
        return host, port

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.server.wait_closed()

    async def _relay(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        u_reader, u_writer = await asyncio.open_connection(*self.target)

        async def pump(r: asyncio.StreamReader, w: asyncio.StreamWriter, keep: bool) -> None:
            try:
                while data := await r.read(65536):
                    if keep:
                        self.to_client += data
                    w.write(data)
                    await w.drain()
            finally:
                w.close()

        for args in ((c_reader, u_writer, False), (u_reader, c_writer, True)):
            task = asyncio.create_task(pump(*args))
            self.tasks.add(task)


@pytest.mark.parametrize("kind", ["dynamic", "cleartext", "md5"])
async def test_password_never_reaches_client_logs_or_audit(
    kind: str, world: World, caplog: pytest.LogCaptureFixture
) -> None:
    from broker.identity import local_identity

    tmp_path, vault_database = world.tmp_path, world.vdb
    caplog.set_level(logging.DEBUG)
    pg = vault_database.postgres
    audit = tmp_path / "audit.jsonl"
    creds: dict[str, Any] | None = None
    if kind == "cleartext":
        creds = _kv(vault_database, "pg/leak-plain", "plain_user", pg.passwords["plain_user"])
    elif kind == "md5":
        creds = _kv(vault_database, "pg/leak-md5", "md5_user", pg.passwords["md5_user"])
    # Plaintext between client and broker (client_auth: local), so the capture can read it.
    svc = service(pg, client_auth="local", credentials=creds)
    async with world.broker(svc, audit) as b:
        source = b.services[SERVICE].context.credentials
        async with source.use(local_identity(LOCAL_ID)) as credential:
            password = credential.fields["password"]
        capture = Capture(host_port(b))
        async with capture as (host, port):
            conn = await asyncpg.connect(
                host=host, port=port, user="x", database="appdb", ssl=False,
                timeout=CLIENT_TIMEOUT,
            )  # fmt: skip
            try:
                assert await conn.fetchval("SELECT current_user") == credential.fields["username"]
            finally:
                await conn.close()
            code, _, err = await psql(
                f"host={host} port={port} dbname=appdb user=x sslmode=disable", "SELECT 1"
            )
            assert code == 0, err
    sent = bytes(capture.to_client)
    assert b"ReadyForQuery" not in sent and len(sent) > 100
    assert password.encode() not in sent
    assert password not in caplog.text
    audit_text = audit.read_text()
    assert "session_start" in audit_text
    assert password not in audit_text


# --------------------------------------------------------------------------- hostile bytes


def _startup_packet(version: int, params: bytes) -> bytes:
    return struct.pack("!II", 8 + len(params), version) + params


GARBAGE = {
    "random": b"\xde\xad\xbe\xef" * 4,
    "short-length": struct.pack("!I", 3) + b"\0" * 8,
    "oversized": struct.pack("!II", 10_000_000, 196608) + b"\0" * 64,
    "protocol-2": _startup_packet(0x20000, b"user\0x\0\0"),
    "no-terminator": _startup_packet(196608, b"user\0x"),
    "no-user": _startup_packet(196608, b"database\0appdb\0\0"),
    "bad-utf8": _startup_packet(196608, b"user\0\xff\xfe\0\0"),
    "unknown-request": struct.pack("!II", 8, (1234 << 16) | 9999),
    "ssl-then-plaintext": struct.pack("!II", 8, 80877103) + _startup_packet(196608, b"user\0x\0\0"),
    "truncated": struct.pack("!II", 100, 196608) + b"user\0",
    "tls-without-sslrequest": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\0" * 32,
}


@pytest.mark.parametrize("name", sorted(GARBAGE))
async def test_hostile_startup_bytes_are_refused_and_service_goes_on(
    name: str,
    tmp_path: Path,
    pki: Pki,
    vault_database: VaultDatabase,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pg = vault_database.postgres
    async with broker_for(tmp_path, pki, vault_database.openbao, monkeypatch, service(pg)) as b:
        host, port = host_port(b)
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(GARBAGE[name])
        await writer.drain()
        writer.write_eof()
        answer = await asyncio.wait_for(reader.read(), CLIENT_TIMEOUT)
        writer.close()
        await writer.wait_closed()
        if name == "ssl-then-plaintext":
            # 'S' was never sent: the pipelined plaintext is refused before TLS starts.
            assert answer[:1] in (b"", b"E")
        elif answer:
            parser = BackendParser()
            parser.feed(answer)
            message = parser.next_message()
            assert isinstance(message, ErrorResponse), answer
            assert message.sqlstate == "08P01"
        # The broker still serves the next client.
        conn = await asyncpg_connect(b, pki, pki.client())
        try:
            assert await conn.fetchval("SELECT 1") == 1
        finally:
            await conn.close()


async def test_cancel_over_mtls_must_come_from_the_session_owner(
    tmp_path: Path, pki: Pki, vault_database: VaultDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    pg = vault_database.postgres
    async with broker_for(tmp_path, pki, vault_database.openbao, monkeypatch, service(pg)) as b:
        conn = await asyncpg_connect(b, pki, pki.client())
        try:
            # The right key, sent over mTLS by another (allowed) identity: ignored.
            pid, secret = conn.get_server_pid(), conn._protocol.backend_secret
            query = asyncio.create_task(conn.fetchval("SELECT pg_sleep(1.5)"))
            await wait_for(lambda: _sleeping(pg), "the query to start", deadline=CLIENT_TIMEOUT)
            host, port = host_port(b)
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(struct.pack("!II", 8, 80877103))
            assert await reader.readexactly(1) == b"S"
            await writer.start_tls(client_ssl_context(pki, pki.client(OTHER_ID)))
            writer.write(struct.pack("!iiii", 16, 80877102, pid, secret))
            assert await reader.read() == b""
            writer.close()
            await writer.wait_closed()
            assert await query is None, "another identity cannot cancel this session"
        finally:
            await conn.close()


async def test_silent_client_is_dropped_after_the_startup_timeout(
    tmp_path: Path, pki: Pki, vault_database: VaultDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    from adapters.postgres import PostgresAdapter

    monkeypatch.setattr(PostgresAdapter, "hello_timeout", 0.5)
    pg = vault_database.postgres
    async with broker_for(tmp_path, pki, vault_database.openbao, monkeypatch, service(pg)) as b:
        host, port = host_port(b)
        reader, writer = await asyncio.open_connection(host, port)
        started = time.monotonic()
        assert await asyncio.wait_for(reader.read(), CLIENT_TIMEOUT) == b""
        assert time.monotonic() - started < 5
        writer.close()
        await writer.wait_closed()
        # A second silent client is still mid-handshake when the broker stops: stop cuts it.
        _, lingering = await asyncio.open_connection(host, port)
        stop_started = time.monotonic()
    assert time.monotonic() - stop_started < 5
    lingering.close()


@pytest.mark.slow
async def test_session_ends_when_its_lease_reaches_max_ttl(world: World) -> None:
    """app-short: 6 s TTL, 20 s max TTL. The lease cannot outlive its max TTL; OpenBao then
    revokes it, and the revocation statements end the role's sessions. A new connection of
    the same identity gets a fresh lease."""
    pki, vdb = world.pki, world.vdb
    pg = vdb.postgres
    svc = service(pg, credentials={"from": "vault-database", "role": vdb.short_role})
    async with world.broker(svc) as b:
        conn = await asyncpg_connect(b, pki, pki.client())
        first_user = await conn.fetchval("SELECT current_user")
        started = time.monotonic()
        try:

            async def cut() -> bool:
                try:
                    await conn.fetchval("SELECT 1", timeout=5)
                except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
                    return True
                return False

            # 20 s max TTL plus OpenBao's expiry sweep and the revocation itself.
            await wait_for(cut, "the session to end at the lease's max TTL", deadline=45)
            assert time.monotonic() - started < 45
        finally:
            await conn.close()
        again = await asyncpg_connect(b, pki, pki.client())
        try:
            assert await again.fetchval("SELECT current_user") != first_user
        finally:
            await again.close()


async def test_connections_over_max_connections_are_refused_and_counted(world: World) -> None:
    pg = world.vdb.postgres
    async with world.broker(service(pg, max_connections=1)) as b:
        host, port = host_port(b)
        # A silent client holds the only slot (it is still in its startup phase).
        _, holder = await asyncio.open_connection(host, port)
        adapter = b.services[SERVICE].adapter

        async def slot_taken() -> bool:
            return bool(adapter._listener.active == 1)

        await wait_for(slot_taken, "the first connection to take the slot")
        # Over the limit, a client is told so with the server's own SQLSTATE, after its TLS
        # handshake and StartupMessage as PostgreSQL does (issue 19.8; it was a bare close).
        with pytest.raises(asyncpg.TooManyConnectionsError) as raised:
            await asyncpg_connect(b, world.pki, world.pki.client())
        assert "max_connections limit (1)" in str(raised.value)
        code, _, err = await psql(mtls_dsn(b, world.pki, world.pki.client()), "SELECT 1")
        assert code != 0 and "too many clients already" in err and SERVICE in err, err
        metrics = b.metrics.render().decode()
        assert f'sidekey_connections_rejected_total{{service="{SERVICE}"}} 2.0' in metrics
        holder.close()
