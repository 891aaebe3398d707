"""A caller without a client certificate, or with one the broker does not trust, as real
clients see it (issue 21.1): the TLS handshake finishes without a certificate and the
protocol itself says what is missing and how to present it (PostgreSQL ErrorResponse 28000,
HTTP 401 with a body); an untrusted certificate ends the handshake. Neither is ever served.
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from broker.config import ListenAddress
from broker.errors import ClientError
from broker.identity.tls import server_context
from broker.session import net
from tests.clients import run_client
from tests.loops import Run, eventually
from tests.pki import DEFAULT_CLIENT_ID, IssuedFiles, Pki, client_ssl_context
from tests.servers import OpenBao, VaultDatabase
from tests.servers_mysql_redis import MariaDB, VaultEngine
from tests.test_http_adapter import Env, Upstream, call, curl, curl_tls, new_secret
from tests.test_mysql_adapter import World as MysqlWorld
from tests.test_mysql_adapter import cli as mariadb_cli
from tests.test_postgres_adapter import World, host_port, psql, service

NO_CERT_PG = "no client certificate"


@pytest.fixture
def world(
    tmp_path: Path, pki: Pki, vault_database: VaultDatabase, monkeypatch: pytest.MonkeyPatch
) -> World:
    return World(tmp_path, pki, vault_database, monkeypatch)


@pytest.fixture
def mysql_world(
    tmp_path: Path,
    pki: Pki,
    mariadb: MariaDB,
    vault_mysql: VaultEngine,
    monkeypatch: pytest.MonkeyPatch,
) -> MysqlWorld:
    return MysqlWorld(tmp_path, pki, mariadb, vault_mysql, monkeypatch)


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


def test_untrusted_certificate_is_refused_and_never_served(run: Run, world: World) -> None:
    """psql against the broker on either loop (uvloop is the default)."""
    pki, pg = world.pki, world.vdb.postgres

    async def main() -> None:
        async with world.broker(service(pg)) as b:
            host, port = host_port(b)
            other = pki.other_ca_client()
            code, out, err = await psql(
                f"host={host} port={port} dbname=appdb user=x sslmode=require "
                f"sslcert={other.cert} sslkey={other.key}",
                "SELECT 1",
            )
            assert code != 0 and out == "", (out, err)
            # The TLS alert reaches the client: not an unexplained EOF.
            assert "alert unknown ca" in err, err
            # A trusted certificate on the same listener gets its session.
            code, out, err = await psql(
                f"host={host} port={port} dbname=appdb user=x sslmode=verify-full "
                f"sslrootcert={pki.bundle} sslcert={pki.client().cert} "
                f"sslkey={pki.client().key}",
                "SELECT 1",
            )
            assert code == 0 and out.strip() == "1", (code, out, err)

    run(main())


def test_mariadb_with_an_untrusted_certificate_reads_the_alert(
    run: Run, mysql_world: MysqlWorld
) -> None:
    """The mariadb client sends its ClientHello right behind its SSLRequest, without an
    answer (Conduit.start_tls early_tls); either loop."""
    pki = mysql_world.pki

    async def main() -> None:
        async with mysql_world.broker() as b:
            code, out, err = await run_client(
                [*mariadb_cli(b, pki, pki.other_ca_client()), "-e", "SELECT 1"]
            )
            assert code != 0 and out == "", (out, err)
            assert "unknown ca" in err, err

    run(main())


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


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("early", [False, True], ids=["answered", "early"])
def test_a_failed_handshake_gets_its_alert_out(run: Run, pki: Pki, early: bool) -> None:
    """asyncio and uvloop both close a failed TLS handshake's socket without sending the
    alert OpenSSL wrote; the broker's in-protocol upgrade sends it (AlertingSSLObject), so
    the client learns why (TLS 1.3: on its first read after the handshake). A trusted client
    on the same listener handshakes as before, and no descriptor is left behind. `early`: the
    client sends its ClientHello without waiting for the answer, as MySQL clients do."""

    async def main() -> None:
        serving = server_context(pki.server.cert, pki.server.key, pki.bundle)
        refused: list[ClientError] = []
        peers: list[str] = []

        async def handler(conduit: net.Conduit) -> None:
            try:
                # In-protocol, as PostgreSQL's SSLRequest: a byte asks, a byte answers.
                received = await conduit.receive(5)
                while early and len(received) < 6:  # the request and a TLS record header
                    received += await conduit.receive(5)
                assert received[:1] == b"?"
                conduit.unread(received[1:])
                if not early:
                    conduit.write(b"S")
                await conduit.start_tls(serving, server_side=True, timeout=5, early_tls=early)
                assert conduit.ssl_object is not None
                peers.append(str(conduit.ssl_object.getpeercert()["subjectAltName"]))
                conduit.write(b"ok")
            except ClientError as exc:
                refused.append(exc)

        async def handshake(files: IssuedFiles) -> tuple[asyncio.StreamReader, Any]:
            reader, writer = await asyncio.open_connection(address.host, address.port)
            writer.write(b"?")
            if not early:
                assert await reader.readexactly(1) == b"S"
            await writer.start_tls(client_ssl_context(pki, files), server_hostname="localhost")
            return reader, writer

        listener = await net.serve(ListenAddress("127.0.0.1", 0), handler, max_connections=4)
        before = open_fds()  # the listener's included (and libuv's spare /dev/null)
        try:
            address = listener.address
            reader, writer = await handshake(pki.client())
            assert await asyncio.wait_for(reader.readexactly(2), 10) == b"ok"
            writer.close()
            reader, writer = await handshake(pki.other_ca_client())
            with pytest.raises(ssl.SSLError, match="UNKNOWN_CA"):
                await asyncio.wait_for(reader.read(1), 10)
            writer.close()
            await eventually(lambda: open_fds() <= before)
        finally:
            await listener.close(1.0)
        assert len(peers) == 1 and DEFAULT_CLIENT_ID in peers[0], peers
        assert len(refused) == 1 and "CERTIFICATE_VERIFY_FAILED" in str(refused[0])

    run(main())
