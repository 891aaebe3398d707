"""A MariaDB or Redis upstream that breaks (issue 19, "Faults"), through the fault-injecting
relay of tests/faults.py between the broker and the real server, as
tests/test_faults_upstream.py does for PostgreSQL:

- one that accepts and never answers (a blackhole);
- one that resets mid-TLS (at the server's first TLS record), mid-login (MariaDB: at its
  greeting; Redis: at the AUTH the broker sends) and mid-query (at the query's text; without
  TLS, so the relay can see it).

Each time the affected client gets an error naming the service (mid-query: its connection
drops), the same service serves again once the relay behaves, and no dynamic user is left
after shutdown (mysql.user, ACL USERS).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pymysql
import pytest
import redis.exceptions
from redis.backoff import NoBackoff
from redis.retry import Retry

from adapters.mysql import MysqlAdapter
from adapters.redis import RedisAdapter
from broker.runtime import Broker
from tests.brokers import base_config, running_broker
from tests.faults import FaultyRelay
from tests.pki import Pki
from tests.servers_mysql_redis import MariaDB, RedisServer, VaultEngine
from tests.test_mysql_adapter import SERVICE as MYSQL_SERVICE
from tests.test_mysql_adapter import connect as mysql_connect
from tests.test_mysql_adapter import query as mysql_query
from tests.test_mysql_adapter import service as mysql_service
from tests.test_redis_adapter import SERVICE as REDIS_SERVICE
from tests.test_redis_adapter import client as redis_client
from tests.test_redis_adapter import service as redis_service

LOGIN_TIMEOUT = 3.0
CONNECT_TIMEOUT = 2.0
MARKER = "sidekey-fault-marker"
TLS_RECORD = b"\x16\x03"

# fault -> (upstream TLS, relay action, marker, towards)
FAULTS: dict[str, tuple[bool, str, bytes, str]] = {
    "silent": (True, "blackhole", b"", ""),
    "reset_mid_tls": (True, "reset", TLS_RECORD, "client"),
    "reset_mid_login": (False, "reset", b"", ""),  # the marker is per protocol, below
    "reset_mid_query": (False, "reset_query", MARKER.encode(), "upstream"),
}
LOGIN_MARKER = {"mysql": (b"mysql_native_password", "client"), "redis": (b"AUTH", "upstream")}


class Protocol:
    name: str
    service: str
    errors: tuple[type[BaseException], ...]

    def config(self, port: int, tls: bool) -> dict[str, Any]:
        raise NotImplementedError

    async def session(self, b: Broker, pki: Pki, query: str = "SELECT 1") -> None:
        raise NotImplementedError

    def users(self) -> set[str]:
        raise NotImplementedError


class Mysql(Protocol):
    name, service, errors = "mysql", MYSQL_SERVICE, (pymysql.MySQLError, OSError)

    def __init__(self, db: MariaDB, engine: VaultEngine) -> None:
        self.db, self.engine = db, engine
        self.target = (db.host, db.port)

    def config(self, port: int, tls: bool) -> dict[str, Any]:
        mode = {"mode": "verify-full", "ca": str(self.db.ca_path)} if tls else {"mode": "disable"}
        return mysql_service(self.db, self.engine, port=port, tls=mode)

    async def session(self, b: Broker, pki: Pki, query: str = "SELECT 1") -> None:
        def run() -> None:
            conn = mysql_connect(b, pki, pki.client())
            try:
                mysql_query(conn, query)
            finally:
                conn.close()

        await asyncio.wait_for(asyncio.to_thread(run), 30)

    def users(self) -> set[str]:
        return self.db.users()


class Redis(Protocol):
    name, service = "redis", REDIS_SERVICE
    errors = (redis.exceptions.RedisError, OSError)

    def __init__(self, server: RedisServer, engine: VaultEngine) -> None:
        self.server, self.engine = server, engine

    def config(self, port: int, tls: bool) -> dict[str, Any]:
        mode = (
            {"mode": "verify-full", "ca": str(self.server.ca_path)} if tls else {"mode": "disable"}
        )
        return redis_service(self.server, self.engine, port=port, tls=mode)

    def upstream_port(self, tls: bool) -> int:
        return self.server.tls_port if tls else self.server.port

    async def session(self, b: Broker, pki: Pki, query: str = "PING") -> None:
        # No retries: redis-py would hide the fault behind a second connection.
        r = redis_client(b, pki, pki.client(), retry=Retry(NoBackoff(), 0))
        try:
            await r.execute_command(*query.split())
        finally:
            await r.aclose()

    def users(self) -> set[str]:
        return self.server.users()


@pytest.fixture(params=["mysql", "redis"])
def protocol(request: pytest.FixtureRequest) -> Protocol:
    if request.param == "mysql":
        return Mysql(request.getfixturevalue("mariadb"), request.getfixturevalue("vault_mysql"))
    return Redis(request.getfixturevalue("redis_server"), request.getfixturevalue("vault_redis"))


def _target(protocol: Protocol, tls: bool) -> tuple[str, int]:
    if isinstance(protocol, Redis):
        return protocol.server.host, protocol.upstream_port(tls)
    assert isinstance(protocol, Mysql)
    return protocol.target


@pytest.mark.timeout(90)
@pytest.mark.parametrize("fault", list(FAULTS))
async def test_broken_upstream_fails_clearly_and_recovers(  # noqa: PLR0917
    fault: str,
    protocol: Protocol,
    tmp_path: Path,
    pki: Pki,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    tls, action, marker, towards = FAULTS[fault]
    if fault == "reset_mid_login":
        marker, towards = LOGIN_MARKER[protocol.name]
    for adapter in (MysqlAdapter, RedisAdapter):
        monkeypatch.setattr(adapter, "login_timeout", LOGIN_TIMEOUT)
    engine: VaultEngine = protocol.engine  # type: ignore[attr-defined]
    bao = engine.openbao
    audit = tmp_path / "audit.jsonl"
    users_before = protocol.users()
    query = f"SELECT '{MARKER}'" if protocol.name == "mysql" else f"ECHO {MARKER}"
    async with FaultyRelay(*_target(protocol, tls)) as relay:
        svc = protocol.config(relay.address[1], tls)
        svc["upstream"]["connect_timeout"] = CONNECT_TIMEOUT
        config = base_config(pki, services=[svc], vault=bao, audit=audit, admin=False)
        async with running_broker(tmp_path, config, monkeypatch, bao) as b:
            await protocol.session(b, pki)
            told: str
            if action == "reset_query":
                run: Callable[[], Awaitable[None]] = lambda: protocol.session(b, pki, query)  # noqa: E731
                relay.reset_on(marker, towards="upstream")
            else:
                run = lambda: protocol.session(b, pki)  # noqa: E731
                if action == "blackhole":
                    relay.trigger_connectivity_loss()
                else:
                    relay.reset_on(marker, towards=towards)  # type: ignore[arg-type]
            with pytest.raises(protocol.errors) as raised:
                await run()
            told = str(raised.value)
            if action != "reset_query":
                assert protocol.service in told, told
            if action != "blackhole":
                assert relay.tripped.is_set()
            relay.restore()
            await protocol.session(b, pki)
    events = [json.loads(line) for line in audit.read_text().splitlines()]
    faulted = [e for e in events if e["event"] == "session_end" and e["outcome"] != "ok"]
    assert len(faulted) == 1 and faulted[0].get("error"), faulted
    assert protocol.users() == users_before
    for secret in (bao.token,):
        assert secret not in caplog.text and secret not in told
    assert "Traceback" not in caplog.text
