"""PostgreSQL callers with a token as their password (client_auth: jwt and mtls+jwt): psql
and asyncpg over server-authenticated TLS, real PostgreSQL and OpenBao, tokens from OpenBao's
OIDC provider and from the tests' own signing issuer.

The broker answers the StartupMessage with AuthenticationCleartextPassword, takes the token
from the PasswordMessage, and logs in upstream with the dynamic credential; a session that
runs queries afterwards shows the password message never reached the server (it would be a
protocol violation there).
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from broker.runtime import Broker
from tests.brokers import base_config, running_broker
from tests.oidc import SPIFFE_ID as BAO_SPIFFE_ID
from tests.oidc import SPIFFE_TEMPLATE, BaoOidc
from tests.pki import Pki
from tests.servers import VaultDatabase
from tests.test_postgres_adapter import (
    CLIENT_TIMEOUT,
    SERVICE,
    World,
    host_port,
    mtls_dsn,
    psql,
    run,
    service,
)
from tests.tokens import ORDERS_ID, SigningIssuer

AUD = SERVICE


def token_dsn(broker: Broker, pki: Pki, sslmode: str = "verify-full") -> str:
    host, port = host_port(broker)
    # A client certificate path that does not exist: libpq sends none.
    return (
        f"host={host} port={port} dbname=appdb user=ignored sslmode={sslmode} "
        f"sslrootcert={pki.bundle} sslcert=/nonexistent/client.crt sslkey=/nonexistent/client.key"
    )


def jwt_service(world: World, **extra: Any) -> dict[str, Any]:
    return service(world.vdb.postgres, client_auth=extra.pop("client_auth", "jwt"), **extra)


async def psql_token(dsn: str, token: str, sql: str) -> tuple[int, str, str]:
    return await run(
        "psql", "-X", "-w", "-At", "-v", "ON_ERROR_STOP=1", dsn, "-c", sql,
        env={"PGPASSWORD": token},
    )  # fmt: skip


@dataclass
class Brokers:
    """`brokers(svc, issuers)`: a ready broker for one service, with identity.jwt."""

    world: World
    audit: Path

    @asynccontextmanager
    async def __call__(
        self, svc: dict[str, Any], issuers: list[dict[str, Any]]
    ) -> AsyncIterator[Broker]:
        w = self.world
        config = base_config(
            w.pki, services=[svc], vault=w.vdb.openbao, audit=self.audit, admin=False
        )
        config["identity"]["jwt"] = {"issuers": issuers}
        async with running_broker(w.tmp_path, config, w.monkeypatch, w.vdb.openbao) as broker:
            deadline = time.monotonic() + CLIENT_TIMEOUT
            while not broker.ready:
                assert time.monotonic() < deadline, broker.readiness()[1]
                await asyncio.sleep(0.05)
            yield broker

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.audit.read_text().splitlines()]


@pytest.fixture
def brokers(
    tmp_path: Path, pki: Pki, vault_database: VaultDatabase, monkeypatch: pytest.MonkeyPatch
) -> Brokers:
    return Brokers(World(tmp_path, pki, vault_database, monkeypatch), tmp_path / "audit.jsonl")


def file_issuer(issuer: SigningIssuer) -> list[dict[str, Any]]:
    return [{"name": "spire", "jwks": str(issuer.jwks_path)}]


def server_only(pki: Pki) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(pki.bundle))


async def test_psql_with_a_token_as_its_password(
    brokers: Brokers,
    signing_issuer: SigningIssuer,
) -> None:
    world = brokers.world
    token = signing_issuer.mint(sub=ORDERS_ID, aud=AUD)
    async with brokers(jwt_service(world), file_issuer(signing_issuer)) as b:
        code, out, err = await psql_token(token_dsn(b, world.pki), token, "SELECT current_user")
        assert code == 0, err
        assert out.strip().startswith("v-")
        # sslmode=require (no server verification by the client) is enough for the broker.
        code, _, err = await psql_token(token_dsn(b, world.pki, "require"), token, "SELECT 1")
        assert code == 0, err
    events = brokers.events()
    starts = [e for e in events if e["event"] == "session_start"]
    assert len(starts) == 2
    assert {(e["auth_method"], e["issuer"], e["spiffe_id"]) for e in starts} == {
        ("jwt-svid", "spire", ORDERS_ID)
    }
    assert starts[0]["claims"] == {"sub": ORDERS_ID}
    assert token not in brokers.audit.read_text()


async def test_asyncpg_with_a_token(
    brokers: Brokers,
    signing_issuer: SigningIssuer,
) -> None:
    world = brokers.world
    token = signing_issuer.mint(sub=ORDERS_ID, aud=AUD)
    async with brokers(jwt_service(world), file_issuer(signing_issuer)) as b:
        host, port = host_port(b)
        conn = await asyncpg.connect(
            host=host, port=port, user="ignored", database="appdb", password=token,
            ssl=server_only(world.pki), timeout=CLIENT_TIMEOUT,
        )  # fmt: skip
        try:
            assert await conn.fetchval("SELECT 40 + 2") == 42
            assert (await conn.fetchval("SELECT current_user")).startswith("v-")
            # A cancel from a token session (over TLS without a certificate) still works.
            with pytest.raises(TimeoutError):
                await conn.fetchval("SELECT pg_sleep(30)", timeout=1.0)
            started = time.monotonic()
            assert await conn.fetchval("SELECT 1", timeout=10) == 1
            assert time.monotonic() - started < 10
        finally:
            await conn.close()


@pytest.mark.parametrize("case", ["expired", "audience", "garbage"])
async def test_a_bad_token_gets_28000(
    brokers: Brokers,
    signing_issuer: SigningIssuer,
    case: str,
) -> None:
    world = brokers.world
    now = int(time.time())
    token = {
        "expired": signing_issuer.mint(sub=ORDERS_ID, aud=AUD, exp=now - 120),
        "audience": signing_issuer.mint(sub=ORDERS_ID, aud="payments"),
        "garbage": "hunter2",
    }[case]
    async with brokers(jwt_service(world), file_issuer(signing_issuer)) as b:
        code, _, err = await psql_token(token_dsn(b, world.pki), token, "SELECT 1")
    assert code != 0
    assert {"expired": "token has expired", "audience": "not addressed to this service",
            "garbage": "not a JWT"}[case] in err  # fmt: skip
    assert token not in err
    (deny,) = [e for e in brokers.events() if e["event"] == "deny"]
    assert token not in json.dumps(deny)


async def test_no_tls_and_no_password(
    brokers: Brokers,
    signing_issuer: SigningIssuer,
) -> None:
    world = brokers.world
    token = signing_issuer.mint(sub=ORDERS_ID, aud=AUD)
    async with brokers(jwt_service(world), file_issuer(signing_issuer)) as b:
        # Over plaintext the token is never asked for.
        code, _, err = await psql_token(token_dsn(b, world.pki, "disable"), token, "SELECT 1")
        assert code != 0 and "requires TLS" in err and "PGPASSWORD" in err
        # psql without a password hangs up when asked for one (-w: never prompt).
        code, _, err = await psql(token_dsn(b, world.pki), "SELECT 1")
        assert code != 0 and "no password supplied" in err
    denies = [e for e in brokers.events() if e["event"] == "deny"]
    assert [d["reason"] for d in denies] == ["connection is not TLS (no SSLRequest)"]


async def test_mtls_and_jwt_on_one_postgres_listener(
    brokers: Brokers,
    signing_issuer: SigningIssuer,
) -> None:
    world = brokers.world
    token = signing_issuer.mint(sub=ORDERS_ID, aud=AUD)
    svc = jwt_service(world, client_auth="mtls+jwt")
    async with brokers(svc, file_issuer(signing_issuer)) as b:
        code, _, err = await psql(mtls_dsn(b, world.pki, world.pki.client()), "SELECT 1")
        assert code == 0, err
        code, _, err = await psql_token(token_dsn(b, world.pki), token, "SELECT 1")
        assert code == 0, err
    methods = [e["auth_method"] for e in brokers.events() if e["event"] == "session_start"]
    assert methods == ["x509-svid", "jwt-svid"]


async def test_psql_with_an_openbao_oidc_token(
    brokers: Brokers,
    bao_oidc: BaoOidc,
) -> None:
    world = brokers.world
    token = await asyncio.to_thread(bao_oidc.id_token)
    svc = jwt_service(world, jwt={"audience": bao_oidc.client_id}, allow=[BAO_SPIFFE_ID])
    issuers = [{"name": "bao", "issuer": bao_oidc.issuer, "spiffe_id": SPIFFE_TEMPLATE}]
    async with brokers(svc, issuers) as b:
        code, out, err = await psql_token(token_dsn(b, world.pki), token, "SELECT current_user")
        assert code == 0, err
        assert out.strip().startswith("v-")
    (start,) = [e for e in brokers.events() if e["event"] == "session_start"]
    assert (start["spiffe_id"], start["auth_method"], start["issuer"]) == (
        BAO_SPIFFE_ID, "oidc", "bao",
    )  # fmt: skip
    assert start["claims"] == {"ns": "prod", "sa": "orders"}
