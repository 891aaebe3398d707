"""A caller without a client certificate, or with one the broker does not trust, as real
clients see it (issue 21.1): the TLS handshake finishes without a certificate and the
protocol itself says what is missing and how to present it (PostgreSQL ErrorResponse 28000,
HTTP 401 with a body); an untrusted certificate ends the handshake. Neither is ever served.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from tests.pki import Pki, client_ssl_context
from tests.servers import OpenBao, VaultDatabase
from tests.test_http_adapter import Env, Upstream, call, curl, curl_tls, new_secret
from tests.test_postgres_adapter import World, host_port, psql, service

NO_CERT_PG = "no client certificate"


@pytest.fixture
def world(
    tmp_path: Path, pki: Pki, vault_database: VaultDatabase, monkeypatch: pytest.MonkeyPatch
) -> World:
    return World(tmp_path, pki, vault_database, monkeypatch)


@pytest.fixture
async def env(
    tmp_path: Path, pki: Pki, openbao: OpenBao, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Env]:
    upstream = Upstream()
    await upstream.start()
    try:
        yield Env(tmp_path, pki, openbao, monkeypatch, upstream, new_secret(openbao, upstream))
    finally:
        await upstream.stop()


async def test_psql_without_a_certificate_is_told_how_to_present_one(world: World) -> None:
    pki, pg = world.pki, world.vdb.postgres
    audit = world.tmp_path / "audit.jsonl"
    async with world.broker(service(pg), audit) as b:
        host, port = host_port(b)
        for sslmode in ("require", f"verify-full sslrootcert={pki.bundle}"):
            code, _, err = await psql(
                f"host={host} port={port} dbname=appdb user=x sslmode={sslmode}", "SELECT 1"
            )
            assert code != 0
            assert "server closed the connection unexpectedly" not in err, err
            assert NO_CERT_PG in err and "sslcert" in err and "sslkey" in err, err
        with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError) as raised:
            await asyncpg.connect(
                host=host, port=port, user="x", database="appdb",
                ssl=client_ssl_context(pki, None), timeout=30,
            )  # fmt: skip
        assert raised.value.sqlstate == "28000" and NO_CERT_PG in str(raised.value)
    events = [e for x in audit.read_text().splitlines() if (e := json.loads(x))["event"] == "deny"]
    assert len(events) == 3
    assert all(NO_CERT_PG in e["reason"] and "spiffe_id" not in e for e in events)


async def test_untrusted_certificate_is_refused_and_never_served(world: World) -> None:
    pki, pg = world.pki, world.vdb.postgres
    async with world.broker(service(pg)) as b:
        host, port = host_port(b)
        other = pki.other_ca_client()
        code, out, err = await psql(
            f"host={host} port={port} dbname=appdb user=x sslmode=require "
            f"sslcert={other.cert} sslkey={other.key}",
            "SELECT 1",
        )
        assert code != 0 and out == "", (out, err)


async def test_http_without_a_certificate_gets_401_saying_how(env: Env) -> None:
    pki = env.pki
    async with env.proxy() as p:
        reply = await call(client_ssl_context(pki, None), f"{p.url}/x")
        assert reply.status == 401, reply
        body = reply.body.decode()
        assert "no client certificate" in body and "--cert" in body, body
        rc, out, err = await curl(*curl_tls(pki, None), "-w", "\n%{http_code}", f"{p.url}/x")
        assert rc == 0 and out.endswith("\n401"), (rc, out, err)
        assert "no client certificate" in out
    assert env.upstream.seen == []
    denials: list[dict[str, Any]] = p.events("deny")
    assert len(denials) == 2 and all("no client certificate" in e["reason"] for e in denials)
