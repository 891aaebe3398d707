"""A caller without a client certificate, or with one the broker does not trust, as real
clients see it (issue 21.1): the TLS handshake finishes without a certificate and the
protocol itself says what is missing and how to present it (PostgreSQL ErrorResponse 28000,
HTTP 401 with a body); an untrusted certificate ends the handshake. Neither is ever served.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
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
from tests.servers_mysql_redis import MariaDB, RedisServer, VaultEngine
from tests.test_http_adapter import SERVICE, Env, Upstream, call, curl, curl_tls, new_secret
from tests.test_mysql_adapter import World as MysqlWorld
from tests.test_mysql_adapter import cli as mariadb_cli
from tests.test_postgres_adapter import World, host_port, psql, service
from tests.test_redis_adapter import World as RedisWorld
from tests.test_redis_adapter import cli_tls as redis_cli_tls
from tests.test_redis_adapter import host_port as redis_host_port

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


def test_lingering_alert_sockets_are_bounded(
    run: Run, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After its alert a failed handshake's socket lingers until the client closes (see
    broker.session.net._send_alert), outside max_connections: a flood of refused handshakes
    from clients that never close must not pile up descriptors. Past ALERT_LINGER_MAX, a
    socket is closed right after its alert."""
    monkeypatch.setattr(net, "ALERT_LINGER_MAX", 1)
    monkeypatch.setattr(net, "ALERT_LINGER_TIMEOUT", 60.0)  # only the bound can free them
    refused = 3

    async def main() -> None:
        serving = server_context(pki.server.cert, pki.server.key, pki.bundle)

        async def handler(conduit: net.Conduit) -> None:
            with contextlib.suppress(ClientError):
                assert await conduit.receive(5) == b"?"
                conduit.write(b"S")
                await conduit.start_tls(serving, server_side=True, timeout=5)

        listener = await net.serve(ListenAddress("127.0.0.1", 0), handler, max_connections=8)
        address = listener.address
        ctx = client_ssl_context(pki, pki.other_ca_client())

        def refused_client() -> ssl.SSLSocket:
            """A TLS 1.3 client is done with its handshake before the server checks its
            certificate; this one then neither reads the alert nor closes."""
            sock = socket.create_connection((address.host, address.port), timeout=10)
            sock.sendall(b"?")
            assert sock.recv(1) == b"S"
            return ctx.wrap_socket(sock, server_hostname="localhost")

        before = open_fds()
        clients = []
        try:
            for _ in range(refused):
                clients.append(await asyncio.to_thread(refused_client))
            # The clients' own sockets, and one lingering server socket.
            await eventually(lambda: open_fds() <= before + refused + 1)
        finally:
            for client in clients:
                client.close()
            await listener.close(1.0)

    run(main())


@pytest.fixture
def redis_world(
    tmp_path: Path,
    pki: Pki,
    redis_server: RedisServer,
    vault_redis: VaultEngine,
    monkeypatch: pytest.MonkeyPatch,
) -> RedisWorld:
    return RedisWorld(tmp_path, pki, redis_server, vault_redis, monkeypatch)


async def _alert_from_python_ssl(host: str, port: int, ctx: ssl.SSLContext) -> str:
    """What a Python TLS client refused by the server reads: the alert's SSLError (TLS 1.3,
    on its first read after its own handshake finished; TLS 1.2, from the handshake)."""
    try:
        reader, writer = await asyncio.open_connection(
            host, port, ssl=ctx, server_hostname="localhost"
        )
        try:
            await asyncio.wait_for(reader.read(1), 10)
        finally:
            writer.close()
    except ssl.SSLError as exc:
        return str(exc)
    return "no TLS error"


def _untrusted_context(pki: Pki, version: ssl.TLSVersion) -> ssl.SSLContext:
    ctx = client_ssl_context(pki, pki.other_ca_client())
    ctx.maximum_version = version
    return ctx


def test_http_with_an_untrusted_certificate_reads_the_alert(
    run: Run, tmp_path: Path, pki: Pki, openbao: OpenBao, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HTTPS is TLS from the first byte: run through Conduit.start_tls (net.TlsFirst), curl and
    Python read the unknown_ca alert, not an empty reply; HTTP/1.1 and HTTP/2, TLS 1.2 and 1.3,
    either loop. Each refusal is audited as a deny naming the peer; a connection that sends
    nothing (a port probe) is not. A trusted client on the same listener is served as before."""

    async def main() -> None:
        upstream = Upstream()
        await upstream.start()
        try:
            env = Env(tmp_path, pki, openbao, monkeypatch, upstream, new_secret(openbao, upstream))
            async with env.proxy() as p:
                host, _, port = p.url.removeprefix("https://").rpartition(":")
                _, probe = await asyncio.open_connection(host, int(port))
                probe.close()
                await probe.wait_closed()
                other = curl_tls(pki, pki.other_ca_client())
                for version in ("--http1.1", "--http2"):
                    for tls in ("--tlsv1.2 --tls-max 1.2", "--tlsv1.3"):
                        rc, out, err = await curl(*other, version, *tls.split(), f"{p.url}/x")
                        assert rc != 0 and out == "", (version, tls, rc, out, err)
                        assert "alert unknown ca" in err, (version, tls, err)
                for max_version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
                    ctx = _untrusted_context(pki, max_version)
                    error = await _alert_from_python_ssl(host, int(port), ctx)
                    assert "UNKNOWN_CA" in error, (max_version, error)
                trusted = curl_tls(pki, pki.client())
                for version, status_line in (("--http1.1", "HTTP/1.1 "), ("--http2", "HTTP/2 ")):
                    rc, out, err = await curl(*trusted, version, "-i", f"{p.url}/orders")
                    assert rc == 0 and out.startswith(status_line), (version, rc, out, err)
                    assert out.split()[1] != "401", out
                denials = p.events("deny")
            assert len(upstream.seen) == 2, upstream.seen
            assert len(denials) == 6, denials  # 4 curl handshakes, 2 Python ones
            for e in denials:
                assert "CERTIFICATE_VERIFY_FAILED" in e["reason"], e
                assert e["peer"].startswith(host + ":") and e["service"] == SERVICE, e
        finally:
            await upstream.stop()

    run(main())


def test_redis_cli_with_an_untrusted_certificate_reads_the_alert(
    run: Run, redis_world: RedisWorld
) -> None:
    """Redis over TLS from the first byte, as HTTPS: redis-cli and Python read the alert;
    a trusted redis-cli on the same listener gets PONG; either loop.

    redis-cli is held to TLS 1.2 (it has no option for it; OpenSSL's configuration does it):
    under TLS 1.3 the alert comes on its first read, and hiredis reports any SSL_read that
    returns 0 as "Server closed the connection", whatever OpenSSL read. Python's client
    shows the alert under both versions."""
    pki = redis_world.pki
    audit = redis_world.tmp_path / "audit.jsonl"
    tls12 = redis_world.tmp_path / "tls12.cnf"
    tls12.write_text(
        "openssl_conf = init\n[init]\nssl_conf = ssl\n[ssl]\nsystem_default = tls\n"
        "[tls]\nMaxProtocol = TLSv1.2\n"
    )

    async def main() -> None:
        async with redis_world.broker(audit=audit) as b:
            code, out, err = await run_client(
                [*redis_cli_tls(b, pki, pki.other_ca_client()), "PING"],
                env={"OPENSSL_CONF": str(tls12)},
            )
            assert "PONG" not in out, (code, out, err)
            assert "alert unknown ca" in (out + err), (code, out, err)
            host, port = redis_host_port(b)
            for max_version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
                error = await _alert_from_python_ssl(
                    host, port, _untrusted_context(pki, max_version)
                )
                assert "UNKNOWN_CA" in error, (max_version, error)
            code, out, err = await run_client([*redis_cli_tls(b, pki, pki.client()), "PING"])
            assert code == 0 and out.strip() == "PONG", (code, out, err)
        # Each refused handshake is in the trail as a deny: Python's two, and redis-cli's
        # (which tries twice).
        denials = [
            e for e in map(json.loads, audit.read_text().splitlines()) if e["event"] == "deny"
        ]
        assert len(denials) == 4, [(e["peer"], e["reason"]) for e in denials]
        assert all("CERTIFICATE_VERIFY_FAILED" in e["reason"] for e in denials), denials

    run(main())
