"""MySQL and Redis callers with a token as their password (client_auth: jwt): PyMySQL and the
mariadb CLI (the token through mysql_clear_password, over TLS), redis-py and redis-cli (AUTH
with the token, over TLS); real MariaDB, redis-server and OpenBao; tokens from the tests'
signing issuer (tests/tokens.py). No client certificate anywhere."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pymysql
import pytest
import redis.asyncio as aredis
import redis.exceptions

from broker.runtime import Broker
from tests import test_mysql_adapter as my
from tests import test_redis_adapter as rd
from tests.brokers import base_config, running_broker
from tests.tokens import ORDERS_ID, SigningIssuer

CLIENT_TIMEOUT = 30.0


@pytest.fixture
def mysql_world(
    tmp_path: Path, pki: Any, mariadb: Any, vault_mysql: Any, monkeypatch: pytest.MonkeyPatch
) -> my.World:
    return my.World(tmp_path, pki, mariadb, vault_mysql, monkeypatch)


@pytest.fixture
def redis_world(
    tmp_path: Path, pki: Any, redis_server: Any, vault_redis: Any, monkeypatch: pytest.MonkeyPatch
) -> rd.World:
    return rd.World(tmp_path, pki, redis_server, vault_redis, monkeypatch)


@asynccontextmanager
async def token_broker(
    world: Any, svc: dict[str, Any], issuer: SigningIssuer, audit: Path
) -> AsyncIterator[Broker]:
    config = base_config(
        world.pki, services=[svc], vault=world.engine.openbao, audit=audit, admin=False
    )
    config["identity"]["jwt"] = {"issuers": [{"name": "spire", "jwks": str(issuer.jwks_path)}]}
    async with running_broker(
        world.tmp_path, config, world.monkeypatch, world.engine.openbao
    ) as broker:
        deadline = time.monotonic() + CLIENT_TIMEOUT
        while not broker.ready:
            assert time.monotonic() < deadline, broker.readiness()[1]
            await asyncio.sleep(0.05)
        yield broker


def _secret_free(audit: Path, caplog: pytest.LogCaptureFixture, *secrets: str) -> None:
    text = audit.read_text()
    for secret in secrets:
        assert secret not in text and secret not in caplog.text


# --------------------------------------------------------------------------- MySQL


async def test_mysql_token_as_password(
    mysql_world: my.World, signing_issuer: SigningIssuer, caplog: pytest.LogCaptureFixture
) -> None:
    world = mysql_world
    caplog.set_level(logging.DEBUG)
    audit = world.tmp_path / "audit.jsonl"
    token = signing_issuer.mint(sub=ORDERS_ID, aud=my.SERVICE)
    other_token = signing_issuer.mint(sub=my.OTHER_ID, aud=my.SERVICE)
    denied = signing_issuer.mint(sub=my.DENIED_ID, aud=my.SERVICE)
    bad = signing_issuer.mint(sub=ORDERS_ID, aud="another-service")
    pki = world.pki
    async with token_broker(world, world.service(client_auth="jwt"), signing_issuer, audit) as b:
        host, port = my.host_port(b)

        def connect(password: str) -> Any:
            return pymysql.connect(
                host=host, port=port, user="ignored", password=password, database="appdb",
                ssl_ca=str(pki.bundle), ssl_verify_identity=True,
                connect_timeout=CLIENT_TIMEOUT,
            )  # fmt: skip

        conn = await my.in_thread(lambda: connect(token))
        try:
            user = (await my.in_thread(lambda: my.query(conn, "SELECT CURRENT_USER()")))[0][0]
            assert user.startswith("v-token-orders-rw-"), user
        finally:
            conn.close()
        code, out, err = await my.run(
            "mariadb", "--no-defaults", "-h", host, "-P", str(port), "-u", "x", f"-p{token}",
            f"--ssl-ca={pki.bundle}", "--ssl-verify-server-cert", "-N", "-B", "-D", "appdb",
            "-e", "SELECT CURRENT_USER()",
        )  # fmt: skip
        assert code == 0, err
        assert out.strip() == user
        # A client that answers the greeting with the cleartext method is not asked again.
        code, out, err = await my.run(
            "mariadb", "--no-defaults", "-h", host, "-P", str(port), "-u", "x", f"-p{token}",
            "--default-auth=mysql_clear_password", f"--ssl-ca={pki.bundle}",
            "--ssl-verify-server-cert", "-N", "-B", "-D", "appdb", "-e", "SELECT CURRENT_USER()",
        )  # fmt: skip
        assert code == 0, err
        assert out.strip() == user
        other = await my.in_thread(lambda: connect(other_token))
        try:
            other_user = await my.in_thread(lambda: my.query(other, "SELECT CURRENT_USER()"))
            assert other_user[0][0] != user, "another identity gets its own user"
        finally:
            other.close()
        with pytest.raises(pymysql.err.OperationalError) as raised:
            await my.in_thread(lambda: connect(bad))
        assert raised.value.args[0] == 1045
        message = raised.value.args[1]
        assert "not addressed to this service" in message and bad not in message
        with pytest.raises(pymysql.err.OperationalError) as raised:
            await my.in_thread(lambda: connect(denied))
        assert raised.value.args[0] == 1045
        assert my.DENIED_ID in raised.value.args[1] and my.SERVICE in raised.value.args[1]
        # Without TLS no token is asked for: the client is told how to connect.
        plain = {"user": "x", "password": token, "database": "appdb", "ssl_disabled": True}
        with pytest.raises(pymysql.err.OperationalError) as raised:
            await my.in_thread(lambda: pymysql.connect(host=host, port=port, **plain))
        assert "requires TLS: use --ssl" in raised.value.args[1], raised.value.args
    _secret_free(audit, caplog, token, bad, denied, other_token)
    events = [json.loads(line) for line in audit.read_text().splitlines()]
    starts = [e for e in events if e["event"] == "session_start"]
    assert len(starts) == 4 and {e["auth_method"] for e in starts} == {"jwt-svid"}
    assert {e["spiffe_id"] for e in starts} == {ORDERS_ID, my.OTHER_ID}
    denies = [e for e in events if e["event"] == "deny"]
    assert my.DENIED_ID in {e.get("spiffe_id") for e in denies}


async def test_mysql_certificate_or_token(
    mysql_world: my.World, signing_issuer: SigningIssuer
) -> None:
    """mtls+jwt: a certificate proves the caller without a token being asked for; a caller
    without one is asked for its token."""
    world, pki = mysql_world, mysql_world.pki
    audit = world.tmp_path / "audit.jsonl"
    token = signing_issuer.mint(sub=my.OTHER_ID, aud=my.SERVICE)
    svc = world.service(client_auth="mtls+jwt")
    async with token_broker(world, svc, signing_issuer, audit) as b:
        code, out, err = await my.run(*my.cli(b, pki, pki.client()), "-e", "SELECT CURRENT_USER()")
        assert code == 0, err
        cert_user = out.strip()
        host, port = my.host_port(b)
        code, out, err = await my.run(
            "mariadb", "--no-defaults", "-h", host, "-P", str(port), "-u", "x", f"-p{token}",
            f"--ssl-ca={pki.bundle}", "--ssl-verify-server-cert", "-N", "-B", "-D", "appdb",
            "-e", "SELECT CURRENT_USER()",
        )  # fmt: skip
        assert code == 0, err
        assert out.strip() != cert_user
    starts = my.events(audit, "session_start")
    assert [e["auth_method"] for e in starts] == ["x509-svid", "jwt-svid"]


# --------------------------------------------------------------------------- Redis


async def test_redis_token_as_password(
    redis_world: rd.World, signing_issuer: SigningIssuer, caplog: pytest.LogCaptureFixture
) -> None:
    world = redis_world
    caplog.set_level(logging.DEBUG)
    audit = world.tmp_path / "audit.jsonl"
    token = signing_issuer.mint(sub=ORDERS_ID, aud=rd.SERVICE)
    other_token = signing_issuer.mint(sub=rd.OTHER_ID, aud=rd.SERVICE)
    denied = signing_issuer.mint(sub=rd.DENIED_ID, aud=rd.SERVICE)
    bad = signing_issuer.mint(sub=ORDERS_ID, aud="another-service")
    pki = world.pki
    async with token_broker(world, world.service(client_auth="jwt"), signing_issuer, audit) as b:
        host, port = rd.host_port(b)

        def connect(**kwargs: Any) -> aredis.Redis:
            return aredis.Redis(
                host=host, port=port, ssl=True, ssl_ca_certs=str(pki.bundle),
                socket_timeout=CLIENT_TIMEOUT, decode_responses=True, **kwargs,
            )  # fmt: skip

        for kwargs in ({"password": token}, {"username": "x", "password": token, "protocol": 3}):
            c = connect(**kwargs)
            try:
                user = await c.acl_whoami()
                assert user.startswith("V_"), user
                await c.set("jwt", "ok")
                assert await c.get("jwt") == "ok"
            finally:
                await c.aclose()
        code, out, err = await rd.run(
            "redis-cli", "-h", host, "-p", str(port), "--tls", "--cacert", str(pki.bundle),
            "-a", token, "--no-auth-warning", "ACL", "WHOAMI",
        )  # fmt: skip
        assert code == 0, err
        assert out.strip() == user
        c = connect(password=other_token)
        try:
            assert await c.acl_whoami() != user, "another identity gets its own user"
        finally:
            await c.aclose()
        for kwargs, words in (
            ({"password": bad}, ("not addressed to this service",)),
            ({"password": denied}, (rd.DENIED_ID, rd.SERVICE)),
            ({}, ("send AUTH <token>",)),
        ):
            c = connect(**kwargs)
            try:
                with pytest.raises(redis.exceptions.RedisError) as raised:
                    await c.get("k")
                assert all(w in str(raised.value) for w in words), raised.value
                assert bad not in str(raised.value)
            finally:
                await c.aclose()
    _secret_free(audit, caplog, token, bad, denied, other_token)
    starts = rd.events(audit, "session_start")
    assert len(starts) == 4 and {e["auth_method"] for e in starts} == {"jwt-svid"}


async def test_redis_certificate_or_token(
    redis_world: rd.World, signing_issuer: SigningIssuer
) -> None:
    """mtls+jwt on a TLS-first protocol: the listener takes a certificate if one is sent; a
    caller without one proves itself with AUTH <token>."""
    world, pki = redis_world, redis_world.pki
    audit = world.tmp_path / "audit.jsonl"
    token = signing_issuer.mint(sub=rd.OTHER_ID, aud=rd.SERVICE)
    svc = world.service(client_auth="mtls+jwt")
    async with token_broker(world, svc, signing_issuer, audit) as b:
        code, out, err = await rd.run(*rd.cli_tls(b, pki, pki.client()), "ACL", "WHOAMI")
        assert code == 0, err
        cert_user = out.strip()
        host, port = rd.host_port(b)
        code, out, err = await rd.run(
            "redis-cli", "-h", host, "-p", str(port), "--tls", "--cacert", str(pki.bundle),
            "-a", token, "--no-auth-warning", "ACL", "WHOAMI",
        )  # fmt: skip
        assert code == 0, err
        assert out.strip().startswith("V_") and out.strip() != cert_user
    starts = rd.events(audit, "session_start")
    assert [e["auth_method"] for e in starts] == ["x509-svid", "jwt-svid"]
