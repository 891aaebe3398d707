"""End-to-end tests of the Redis adapter: real redis-server, real OpenBao (its
redis-database-plugin), real clients (redis-cli, redis-py, redis-benchmark).

Every test runs a broker in-process and talks to it as an application would: the client's
certificate is its only credential, and whatever it sends as AUTH is ignored.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aredis
import redis.exceptions

from broker.identity.ca import IssuedFiles
from broker.runtime import Broker
from tests import clients
from tests.brokers import base_config, running_broker
from tests.clients import CLIENT_TIMEOUT, run_client
from tests.pki import DEFAULT_CLIENT_ID, Pki
from tests.servers_mysql_redis import RedisServer, VaultEngine

REVOKE_DEADLINE = 20.0
POLL_SECONDS = 0.1

SERVICE = "orders-cache"
OTHER_ID = "spiffe://example.org/ns/prod/sa/billing"
DENIED_ID = "spiffe://example.org/ns/prod/sa/intruder"
LOCAL_ID = "spiffe://example.org/ns/dev/sa/local-app"


def service(
    server: RedisServer,
    engine: VaultEngine,
    *,
    credentials: dict[str, Any] | None = None,
    tls: dict[str, Any] | None = None,
    client_auth: str = "mtls",
    port: int | None = None,
    **extra: Any,
) -> dict[str, Any]:
    svc: dict[str, Any] = {
        "name": SERVICE,
        "adapter": "redis",
        "listen": "127.0.0.1:0",
        "client_auth": client_auth,
        "upstream": {
            "address": f"127.0.0.1:{port or server.tls_port}",
            "tls": tls or {"mode": "verify-full", "ca": str(server.ca_path)},
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
    server: RedisServer
    engine: VaultEngine
    monkeypatch: pytest.MonkeyPatch

    def service(self, **kwargs: Any) -> dict[str, Any]:
        return service(self.server, self.engine, **kwargs)

    @asynccontextmanager
    async def broker(
        self, svc: dict[str, Any] | None = None, audit: Path | None = None
    ) -> AsyncIterator[Broker]:
        config = base_config(
            self.pki,
            services=[svc or self.service()],
            vault=self.engine.openbao,
            audit=audit,
            admin=False,
        )
        async with running_broker(
            self.tmp_path, config, self.monkeypatch, self.engine.openbao
        ) as broker:
            yield broker


@pytest.fixture
def world(
    tmp_path: Path,
    pki: Pki,
    redis_server: RedisServer,
    vault_redis: VaultEngine,
    monkeypatch: pytest.MonkeyPatch,
) -> World:
    return World(tmp_path, pki, redis_server, vault_redis, monkeypatch)


def host_port(broker: Broker) -> tuple[str, int]:
    return clients.host_port(broker, SERVICE)


def client(broker: Broker, pki: Pki, issued: IssuedFiles | None, **kwargs: Any) -> aredis.Redis:
    host, port = host_port(broker)
    tls: dict[str, Any] = {}
    if issued is not None:
        tls = {
            "ssl": True,
            "ssl_certfile": str(issued.cert),
            "ssl_keyfile": str(issued.key),
            "ssl_ca_certs": str(pki.bundle),
            "ssl_check_hostname": True,
        }
    return aredis.Redis(
        host=host, port=port, socket_timeout=CLIENT_TIMEOUT, decode_responses=True, **tls, **kwargs
    )


async def run(*argv: str) -> tuple[int, str, str]:
    return await run_client(argv)


def cli_tls(broker: Broker, pki: Pki, issued: IssuedFiles) -> list[str]:
    host, port = host_port(broker)
    return [
        "redis-cli", "-h", host, "-p", str(port), "--tls", "--cert", str(issued.cert),
        "--key", str(issued.key), "--cacert", str(pki.bundle),
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


async def test_redis_cli_gets_a_dynamic_user(world: World) -> None:
    async with world.broker() as b:
        code, out, err = await run(*cli_tls(b, world.pki, world.pki.client()), "ACL", "WHOAMI")
        assert code == 0, err
        user = out.strip()
        assert user.startswith("V_"), user
        assert user in world.server.users()
        # The client's own password is ignored: the session stays the broker's user.
        code, out, err = await run(
            *cli_tls(b, world.pki, world.pki.client()), "--user", "default", "--pass", "guess",
            "--no-auth-warning", "ACL", "WHOAMI",
        )  # fmt: skip
        assert code == 0, err
        assert out.strip() == user


async def test_redis_py_identities_get_their_own_reused_users(world: World) -> None:
    audit = world.tmp_path / "audit.jsonl"
    pki = world.pki
    async with world.broker(audit=audit) as b:
        first = client(b, pki, pki.client())
        second = client(b, pki, pki.client())
        other = client(b, pki, pki.client(OTHER_ID))
        try:
            users = [await c.acl_whoami() for c in (first, second, other)]
            assert users[0] == users[1], "the same identity reuses its lease"
            assert users[0] != users[2], "another identity gets its own user"
            assert all(u.startswith("V_") for u in users)
            await first.set("k", "v")
            assert await second.get("k") == "v"
        finally:
            for c in (first, second, other):
                await c.aclose()
    starts, ends = events(audit, "session_start"), events(audit, "session_end")
    assert len(starts) == 3 and len(ends) == 3
    assert {e["upstream_user"] for e in starts} == set(users)
    assert all(e["lease_id"].startswith("redis-db/creds/cache-rw/") for e in starts)
    assert all(e["outcome"] == "ok" for e in ends), ends
    assert (
        b.metrics.registry.get_sample_value(
            "sidekey_sessions_total", {"service": SERVICE, "outcome": "ok"}
        )
        == 3
    )


async def test_denied_identity_gets_an_error_naming_identity_and_service(world: World) -> None:
    audit = world.tmp_path / "audit.jsonl"
    pki = world.pki
    async with world.broker(audit=audit) as b:
        denied = client(b, pki, pki.client(DENIED_ID))
        try:
            with pytest.raises(redis.exceptions.ResponseError) as raised:
                await denied.get("k")
        finally:
            await denied.aclose()
        assert DENIED_ID in str(raised.value) and SERVICE in str(raised.value)
        _code, out, err = await run(*cli_tls(b, pki, pki.client(DENIED_ID)), "GET", "k")
        assert "NOPERM" in out + err and DENIED_ID in out + err, (out, err)
    assert [e["spiffe_id"] for e in events(audit, "deny")] == [DENIED_ID] * 2
    assert (
        b.metrics.registry.get_sample_value(
            "sidekey_sessions_total", {"service": SERVICE, "outcome": "denied"}
        )
        == 2
    )


async def test_client_auth_and_hello_are_answered_with_the_brokers_user(world: World) -> None:
    pki = world.pki
    async with world.broker() as b:
        # redis-py sends AUTH (or HELLO 3 AUTH with protocol=3) itself on connect.
        plain = client(b, pki, pki.client(), username="default", password="not-this")
        resp3 = client(b, pki, pki.client(), username="admin", password="nor-this", protocol=3)
        try:
            user = await plain.acl_whoami()
            assert user.startswith("V_")
            assert await resp3.acl_whoami() == user
            assert (await resp3.execute_command("HELLO"))["proto"] == 3
            # Pipelined, the rewritten AUTH keeps its place among the replies.
            pipe = plain.pipeline(transaction=False)
            pipe.set("p", "1").execute_command("AUTH", "x", "y").get("p").acl_whoami()
            assert await pipe.execute() == [True, True, "1", user]
            # HELLO without AUTH is the client's: it switches the protocol.
            hello = await plain.execute_command("HELLO", "2")
            assert hello[hello.index("proto") + 1] == 2
            with pytest.raises(redis.exceptions.ResponseError) as raised:
                await plain.execute_command("RESET")
            assert "RESET is refused by the Sidekey broker" in str(raised.value)
            assert await plain.acl_whoami() == user
        finally:
            await plain.aclose()
            await resp3.aclose()


async def test_lease_revoked_after_idle_and_at_shutdown(world: World) -> None:
    pki, server, engine = world.pki, world.server, world.engine
    idle = world.service(
        credentials={"from": "vault-database", "mount": engine.mount, "role": engine.role,
                     "idle_timeout": 1},
    )  # fmt: skip
    async with world.broker(idle) as b:
        code, out, err = await run(*cli_tls(b, pki, pki.client()), "ACL", "WHOAMI")
        assert code == 0, err
        idle_user = out.strip()

        async def gone() -> bool:
            return idle_user not in await asyncio.to_thread(server.users)

        await wait_for(gone, f"idle lease of {idle_user} to be revoked")

    async with world.broker() as b:
        code, out, err = await run(*cli_tls(b, pki, pki.client()), "ACL", "WHOAMI")
        assert code == 0, err
        kept = out.strip()
        assert kept in server.users()
    assert kept not in server.users(), "shutdown revokes every lease"


@pytest.mark.parametrize("mode", ["verify-full", "verify-ca", "require", "disable"])
async def test_upstream_tls_modes(mode: str, world: World) -> None:
    server = world.server
    tls: dict[str, Any] = {"mode": mode}
    if mode.startswith("verify"):
        tls["ca"] = str(server.ca_path)
    port = server.port if mode == "disable" else server.tls_port
    async with world.broker(world.service(tls=tls, port=port)) as b:
        c = client(b, world.pki, world.pki.client())
        try:
            assert (await c.acl_whoami()).startswith("V_")
            info = await c.client_info()
            # Redis 7.0 names no TLS flag in CLIENT INFO; the port the broker reached says it.
            assert int(info["laddr"].rsplit(":", 1)[1]) == port
        finally:
            await c.aclose()


async def test_static_credentials_and_upstream_refusal(world: World) -> None:
    server, pki = world.server, world.pki
    kv = world.engine.client().secrets.kv.v2
    kv.create_or_update_secret(
        path="redis/static", secret={"username": "static_user",
                                     "password": server.passwords["static_user"]},
    )  # fmt: skip
    kv.create_or_update_secret(
        path="redis/wrong", secret={"username": "static_user", "password": "wrong"}
    )
    kv.create_or_update_secret(
        path="redis/requirepass", secret={"password": server.passwords["default"]}
    )
    for path, expected in (("redis/static", "static_user"), ("redis/requirepass", "default")):
        async with world.broker(world.service(credentials={"from": "vault-kv", "path": path})) as b:
            c = client(b, pki, pki.client())
            try:
                assert await c.acl_whoami() == expected
            finally:
                await c.aclose()
    async with world.broker(
        world.service(credentials={"from": "vault-kv", "path": "redis/wrong"})
    ) as b:
        c = client(b, pki, pki.client())
        try:
            # The server's own WRONGPASS reply, relayed (redis-py names it by its text).
            with pytest.raises(redis.exceptions.AuthenticationError) as raised:
                await c.get("k")
            assert "invalid username-password pair" in str(raised.value)
        finally:
            await c.aclose()


async def test_upstream_down_and_credential_unavailable(world: World) -> None:
    from tests.servers import free_port

    pki = world.pki
    for svc, words in (
        (world.service(port=free_port()), "cannot reach the server of service orders-cache"),
        (
            world.service(credentials={"from": "vault-database", "mount": world.engine.mount,
                                       "role": "no-such-role"}),
            "no credential for service orders-cache",
        ),
    ):  # fmt: skip
        async with world.broker(svc) as b:
            c = client(b, pki, pki.client())
            try:
                with pytest.raises(redis.exceptions.ResponseError) as raised:
                    await c.get("k")
                assert words in str(raised.value)
            finally:
                await c.aclose()


# --------------------------------------------------------------------------- secrecy


async def test_password_never_reaches_client_logs_or_audit(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    from broker.identity import local_identity
    from tests.test_postgres_adapter import Capture

    caplog.set_level(logging.DEBUG)
    audit = world.tmp_path / "audit.jsonl"
    async with world.broker(world.service(client_auth="local"), audit) as b:
        source = b.services[SERVICE].context.credentials
        async with source.use(local_identity(LOCAL_ID)) as credential:
            password = credential.fields["password"]
        capture = Capture(host_port(b))
        async with capture as (host, port):
            c = aredis.Redis(host=host, port=port, decode_responses=True, protocol=3,
                             username="u", password="p")  # fmt: skip
            try:
                assert await c.acl_whoami() == credential.fields["username"]
                await c.execute_command("AUTH", "x", "y")
                await c.execute_command("HELLO", "3", "AUTH", "a", "b", "SETNAME", "n")
                await c.set("k", "v")
            finally:
                await c.aclose()
    sent = bytes(capture.to_client)
    assert len(sent) > 100
    assert password.encode() not in sent
    assert password not in caplog.text
    assert password not in audit.read_text()
    assert "session_start" in audit.read_text()


# --------------------------------------------------------------------------- tools


async def test_redis_benchmark_through_the_broker(world: World) -> None:
    pki = world.pki
    issued = pki.client()
    async with world.broker() as b:
        host, port = host_port(b)
        code, out, err = await run(
            "redis-benchmark", "-h", host, "-p", str(port), "--tls", "--cert", str(issued.cert),
            "--key", str(issued.key), "--cacert", str(pki.bundle), "-t", "get,set", "-n", "2000",
            "-c", "4", "-q",
        )  # fmt: skip
        assert code == 0, err
        assert "SET:" in out and "GET:" in out, out


async def test_hostile_bytes_end_the_session_and_service_goes_on(world: World) -> None:
    pki = world.pki
    async with world.broker() as b:
        host, port = host_port(b)
        from tests.pki import client_ssl_context

        reader, writer = await asyncio.open_connection(
            host, port, ssl=client_ssl_context(pki, pki.client()), server_hostname="localhost"
        )
        writer.write(b"*1\r\n$-5\r\n")
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), CLIENT_TIMEOUT) == b""
        writer.close()
        c = client(b, pki, pki.client())
        try:
            assert await c.ping()
        finally:
            await c.aclose()


async def test_connections_over_max_connections_are_told_so(world: World) -> None:
    pki = world.pki
    async with world.broker(world.service(max_connections=1)) as b:
        holder = client(b, pki, pki.client())
        try:
            assert await holder.ping()  # holds the only slot
            over = client(b, pki, pki.client())
            try:
                with pytest.raises(redis.exceptions.RedisError) as raised:
                    await over.get("k")
                assert "max number of clients reached" in str(raised.value)
                assert "allows 1" in str(raised.value)
            finally:
                await over.aclose()
        finally:
            await holder.aclose()
