"""HTTP callers with a token (client_auth: jwt and mtls+jwt), end to end: curl and aiohttp
clients over server-authenticated TLS, a real upstream that records what reaches it, tokens
from OpenBao's OIDC provider (tests/oidc.py) and from the tests' own signing issuer
(tests/tokens.py) for the negative cases."""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import jwt as pyjwt
import pytest
from aiohttp import web
from multidict import CIMultiDictProxy

from broker.runtime import Broker
from tests.brokers import base_config, running_broker
from tests.oidc import SPIFFE_ID as BAO_SPIFFE_ID
from tests.oidc import SPIFFE_TEMPLATE, BaoOidc
from tests.pki import DEFAULT_CLIENT_ID, Pki, client_ssl_context
from tests.tokens import ORDERS_ID, SigningIssuer

SERVICE = "orders-api"
UPSTREAM_TOKEN = "upstream-secret-0123456789"
TOKEN_ENV = "SIDEKEY_JWT_TEST_UPSTREAM_TOKEN"
DEADLINE_SECONDS = 30.0


@dataclass
class Upstream:
    """Records the headers of every request that reaches it; answers 200."""

    seen: list[CIMultiDictProxy[str]] = field(default_factory=list)
    url: str = ""

    async def handle(self, request: web.BaseRequest) -> web.Response:
        self.seen.append(request.headers)
        return web.json_response({"path": request.path})


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    up = Upstream()
    runner = web.ServerRunner(web.Server(up.handle, access_log=None))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    up.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        yield up
    finally:
        await runner.cleanup()


@dataclass
class World:
    pki: Pki
    tmp: Path
    upstream: Upstream
    monkeypatch: pytest.MonkeyPatch
    audit: Path = field(init=False)

    def __post_init__(self) -> None:
        self.audit = self.tmp / "audit.jsonl"
        self.monkeypatch.setenv(TOKEN_ENV, UPSTREAM_TOKEN)

    def config(
        self, issuers: list[dict[str, Any]], client_auth: str = "jwt", **service: Any
    ) -> dict[str, Any]:
        svc: dict[str, Any] = {
            "name": SERVICE,
            "adapter": "http",
            "listen": "127.0.0.1:0",
            "client_auth": client_auth,
            "upstream": {"url": self.upstream.url},
            "credentials": {"from": "env", "fields": {"token": TOKEN_ENV}},
            "inject": {"headers": {"Authorization": "Bearer {token}"}},
            "allow": [ORDERS_ID],
        }
        svc.update(service)
        config = base_config(self.pki, services=[svc], audit=self.audit)
        config["identity"]["jwt"] = {"issuers": issuers}
        return config

    @asynccontextmanager
    async def broker(self, issuers: list[dict[str, Any]], **kw: Any) -> AsyncIterator[Broker]:
        async with running_broker(self.tmp, self.config(issuers, **kw)) as b:
            await wait_ready(b)
            yield b

    def events(self) -> list[dict[str, Any]]:
        if not self.audit.exists():
            return []
        return [json.loads(line) for line in self.audit.read_text().splitlines()]


@pytest.fixture
def world(pki: Pki, tmp_path: Path, upstream: Upstream, monkeypatch: pytest.MonkeyPatch) -> World:
    return World(pki, tmp_path, upstream, monkeypatch)


async def wait_ready(broker: Broker) -> None:
    deadline = time.monotonic() + DEADLINE_SECONDS
    while not broker.ready:
        assert time.monotonic() < deadline, f"broker not ready: {broker.readiness()[1]}"
        await asyncio.sleep(0.05)


def file_issuer(issuer: SigningIssuer, name: str = "spire") -> list[dict[str, Any]]:
    return [{"name": name, "jwks": str(issuer.jwks_path)}]


def url(broker: Broker, path: str = "/orders") -> str:
    return f"https://{broker.address(SERVICE)}{path}"


async def curl(pki: Pki, target: str, *args: str) -> tuple[int, str, str]:
    """curl over TLS with no client certificate; (status, headers, body)."""
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sS", "--cacert", str(pki.bundle), "-D", "-", "-o", "-", *args, target,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), DEADLINE_SECONDS)
    assert proc.returncode == 0, err.decode()
    text = out.decode()
    head, _, body = text.partition("\r\n\r\n")
    status = int(head.split(" ", 2)[1])
    return status, head, body


def server_only_tls(pki: Pki) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(pki.bundle))


def assert_token_nowhere(world: World, token: str) -> None:
    for headers in world.upstream.seen:
        for name, value in headers.items():
            assert token not in value, f"the token reached the upstream in {name}"
    assert token not in world.audit.read_text()


# --------------------------------------------------------------------------- jwt


async def test_curl_with_a_jwt_svid(world: World, signing_issuer: SigningIssuer) -> None:
    token = signing_issuer.mint(sub=ORDERS_ID, aud=SERVICE)
    async with world.broker(file_issuer(signing_issuer)) as b:
        status, _, body = await curl(world.pki, url(b), "-H", f"Authorization: Bearer {token}")
        assert status == 200, body
    (seen,) = world.upstream.seen
    # The injected credential is the only one the upstream sees.
    assert seen.getall("Authorization") == [f"Bearer {UPSTREAM_TOKEN}"]
    assert_token_nowhere(world, token)
    (request,) = [e for e in world.events() if e["event"] == "request"]
    assert request["spiffe_id"] == ORDERS_ID and request["auth_method"] == "jwt-svid"
    assert request["issuer"] == "spire" and request["claims"] == {"sub": ORDERS_ID}
    assert request["status"] == 200


async def test_a_token_in_its_own_header(world: World, signing_issuer: SigningIssuer) -> None:
    token = signing_issuer.mint(sub=ORDERS_ID, aud="api://orders")
    async with world.broker(
        file_issuer(signing_issuer), jwt={"audience": "api://orders", "header": "X-Workload-Token"}
    ) as b:
        status, _, body = await curl(
            world.pki, url(b), "-H", f"X-Workload-Token: {token}",
            "-H", "Authorization: Basic dXNlcjpwYXNz",
        )  # fmt: skip
        assert status == 200, body
        status, _, _ = await curl(world.pki, url(b), "-H", f"X-Workload-Token: Bearer {token}")
        assert status == 200
    for seen in world.upstream.seen:
        assert "X-Workload-Token" not in seen
        assert seen.getall("Authorization") == [f"Bearer {UPSTREAM_TOKEN}"]


@pytest.mark.parametrize(
    ("case", "outcome"),
    [
        ("expired", "expired"),
        ("audience", "bad_audience"),
        ("kid", "unknown_key"),
        ("none", "bad_algorithm"),
        ("hs256", "bad_algorithm"),
        ("tampered", "bad_signature"),
        ("domain", "unknown_issuer"),
        ("garbage", "malformed"),
    ],
)
async def test_bad_tokens_get_401_and_never_reach_the_upstream(
    world: World, signing_issuer: SigningIssuer, case: str, outcome: str
) -> None:
    now = int(time.time())
    good = signing_issuer.mint(sub=ORDERS_ID, aud=SERVICE)
    token = {
        "expired": lambda: signing_issuer.mint(sub=ORDERS_ID, aud=SERVICE, exp=now - 120),
        "audience": lambda: signing_issuer.mint(sub=ORDERS_ID, aud="payments"),
        "kid": lambda: signing_issuer.mint(sub=ORDERS_ID, aud=SERVICE, headers={"kid": "x"}),
        "none": lambda: signing_issuer.unsigned(sub=ORDERS_ID, aud=SERVICE),
        "hs256": lambda: signing_issuer.hmac_with_public_key(sub=ORDERS_ID, aud=SERVICE),
        "tampered": lambda: signing_issuer.tampered(good, sub="spiffe://example.org/admin"),
        "domain": lambda: signing_issuer.mint(
            sub="spiffe://evil.org/ns/prod/sa/orders", aud=SERVICE
        ),
        "garbage": lambda: "not-a-jwt",
    }[case]()
    async with world.broker(file_issuer(signing_issuer)) as b:
        status, head, body = await curl(world.pki, url(b), "-H", f"Authorization: Bearer {token}")
        metrics = b.metrics_text().decode()
    assert status == 401, body
    assert 'www-authenticate: bearer realm="sidekey", error="invalid_token"' in head.lower()
    assert world.upstream.seen == []
    assert token not in body
    (deny,) = [e for e in world.events() if e["event"] == "deny"]
    assert "spiffe_id" not in deny and token not in json.dumps(deny)
    label = "spire" if case not in ("domain", "garbage", "none", "hs256") else "unknown"
    assert f'sidekey_jwt_verifications_total{{issuer="{label}",outcome="{outcome}"}} 1.0' in metrics


async def test_no_token(world: World, signing_issuer: SigningIssuer) -> None:
    async with world.broker(file_issuer(signing_issuer)) as b:
        status, head, body = await curl(world.pki, url(b))
        assert status == 401
        assert 'www-authenticate: bearer realm="sidekey"' in head.lower()
        assert "present a token" in body
        status, _, _ = await curl(world.pki, url(b), "-H", "Authorization: Basic dXNlcjpwYXNz")
        assert status == 401
    assert world.upstream.seen == []


async def test_a_401_keeps_the_connection_and_the_next_token_works(
    world: World, signing_issuer: SigningIssuer
) -> None:
    good = signing_issuer.mint(sub=ORDERS_ID, aud=SERVICE)
    bad = signing_issuer.mint(sub=ORDERS_ID, aud="payments")
    async with world.broker(file_issuer(signing_issuer)) as b:
        connector = aiohttp.TCPConnector(ssl=server_only_tls(world.pki), limit=1)
        async with aiohttp.ClientSession(connector=connector) as http:
            for token, expected in ((bad, 401), (good, 200), (good, 200), (None, 401), (good, 200)):
                headers = {"Authorization": f"Bearer {token}"} if token else {}
                async with http.get(url(b), headers=headers) as resp:
                    await resp.read()
                    assert resp.status == expected
        metrics = b.metrics_text().decode()
    assert len(world.upstream.seen) == 3
    # One signature check for the good token, then the cache.
    assert 'sidekey_jwt_verifications_total{issuer="spire",outcome="ok"} 1.0' in metrics
    assert 'sidekey_jwt_verifications_total{issuer="spire",outcome="cached"} 2.0' in metrics


async def test_an_identity_the_policy_does_not_allow_gets_403(
    world: World, signing_issuer: SigningIssuer
) -> None:
    token = signing_issuer.mint(sub="spiffe://example.org/ns/prod/sa/billing", aud=SERVICE)
    async with world.broker(file_issuer(signing_issuer)) as b:
        status, _, body = await curl(world.pki, url(b), "-H", f"Authorization: Bearer {token}")
    assert status == 403 and "not allowed" in body
    assert world.upstream.seen == []
    (deny,) = [e for e in world.events() if e["event"] == "deny"]
    assert deny["auth_method"] == "jwt-svid" and deny["issuer"] == "spire"


async def test_a_token_sent_twice_is_refused(world: World, signing_issuer: SigningIssuer) -> None:
    token = signing_issuer.mint(sub=ORDERS_ID, aud=SERVICE)
    async with world.broker(file_issuer(signing_issuer)) as b:
        status, _, body = await curl(
            world.pki, url(b), "-H", f"Authorization: Bearer {token}",
            "-H", f"Authorization: Bearer {token}",
        )  # fmt: skip
    assert status == 401 and "send one token" in body


# --------------------------------------------------------------------------- mtls+jwt


async def test_mtls_and_jwt_on_one_listener(world: World, signing_issuer: SigningIssuer) -> None:
    token = signing_issuer.mint(sub=ORDERS_ID, aud=SERVICE)
    client = world.pki.client()
    async with world.broker(file_issuer(signing_issuer), client_auth="mtls+jwt") as b:
        # A certificate first: it proves the caller, and the token header still never
        # goes upstream.
        status, _, _ = await curl(
            world.pki, url(b), "--cert", str(client.cert), "--key", str(client.key),
            "-H", f"Authorization: Bearer {token}",
        )  # fmt: skip
        assert status == 200
        status, _, _ = await curl(
            world.pki, url(b), "--cert", str(client.cert), "--key", str(client.key)
        )
        assert status == 200
        # No certificate: the token.
        status, _, _ = await curl(world.pki, url(b), "-H", f"Authorization: Bearer {token}")
        assert status == 200
        status, _, body = await curl(world.pki, url(b))
        assert status == 401 and "a client certificate or a token" in body
        # A certificate that does not chain to the bundle fails the handshake.
        other = world.pki.other_ca_client()
        proc = await asyncio.create_subprocess_exec(
            "curl", "-sS", "--cacert", str(world.pki.bundle), "--cert", str(other.cert),
            "--key", str(other.key), url(b),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        await proc.communicate()
        assert proc.returncode != 0
    methods = [e["auth_method"] for e in world.events() if e["event"] == "request"]
    assert methods == ["x509-svid", "x509-svid", "jwt-svid"]
    assert DEFAULT_CLIENT_ID == ORDERS_ID
    for seen in world.upstream.seen:
        assert seen.getall("Authorization") == [f"Bearer {UPSTREAM_TOKEN}"]


async def test_jwt_only_does_not_ask_for_a_certificate(
    world: World, signing_issuer: SigningIssuer
) -> None:
    """Under client_auth: jwt a certificate proves nothing: the broker does not request one."""
    async with world.broker(file_issuer(signing_issuer)) as b:
        host, port = b.address(SERVICE).rsplit(":", 1)
        ctx = client_ssl_context(world.pki)  # would send a certificate if asked
        _, writer = await asyncio.open_connection(host, int(port), ssl=ctx)
        try:
            ssl_object = writer.get_extra_info("ssl_object")
            assert ssl_object is not None
        finally:
            writer.close()
        status, _, _ = await curl(
            world.pki, url(b), "--cert", str(world.pki.client().cert),
            "--key", str(world.pki.client().key),
        )  # fmt: skip
        assert status == 401


# --------------------------------------------------------------------------- OpenBao OIDC


def bao_issuer(oidc: BaoOidc) -> list[dict[str, Any]]:
    return [{"name": "bao", "issuer": oidc.issuer, "spiffe_id": SPIFFE_TEMPLATE}]


async def test_openbao_oidc_id_token(world: World, bao_oidc: BaoOidc) -> None:
    token = await asyncio.to_thread(bao_oidc.id_token)
    async with world.broker(
        bao_issuer(bao_oidc), jwt={"audience": bao_oidc.client_id}, allow=[BAO_SPIFFE_ID]
    ) as b:
        status, _, body = await curl(world.pki, url(b), "-H", f"Authorization: Bearer {token}")
        assert status == 200, body
        # Its signature broken: refused.
        status, _, _ = await curl(world.pki, url(b), "-H", f"Authorization: Bearer {token}x")
        assert status == 401
        inventory = b.inventory()
    (request,) = [e for e in world.events() if e["event"] == "request"]
    assert request["spiffe_id"] == BAO_SPIFFE_ID and request["auth_method"] == "oidc"
    assert request["issuer"] == "bao" and request["claims"] == {"ns": "prod", "sa": "orders"}
    assert_token_nowhere(world, token)
    (issuer,) = inventory["jwt_issuers"]
    assert issuer["keys_from"] == f"discovery:{bao_oidc.issuer}/.well-known/openid-configuration"
    assert issuer["jwks_uri"] == f"{bao_oidc.issuer}/.well-known/keys"
    assert issuer["key_ids"]["*"] and issuer["auth_method"] == "oidc"
    assert inventory["services"][0]["jwt"] == {
        "audience": bao_oidc.client_id,
        "header": "Authorization",
    }


async def test_openbao_key_rotation_is_picked_up_on_the_unknown_kid(
    world: World, bao_oidc: BaoOidc
) -> None:
    async with world.broker(
        bao_issuer(bao_oidc), jwt={"audience": bao_oidc.client_id}, allow=[BAO_SPIFFE_ID]
    ) as b:
        before = set(b.inventory()["jwt_issuers"][0]["key_ids"]["*"])
        # OpenBao publishes its next key ahead of time: after two rotations it signs with a
        # key the broker has not seen yet.
        await asyncio.to_thread(bao_oidc.rotate_key)
        await asyncio.to_thread(bao_oidc.rotate_key)
        token = await asyncio.to_thread(bao_oidc.id_token)
        kid = pyjwt.get_unverified_header(token)["kid"]
        assert kid not in before
        status, _, body = await curl(world.pki, url(b), "-H", f"Authorization: Bearer {token}")
        assert status == 200, body
        after = set(b.inventory()["jwt_issuers"][0]["key_ids"]["*"])
        metrics = b.metrics_text().decode()
    assert kid in after
    assert 'sidekey_jwks_refreshes_total{issuer="bao",outcome="ok"} 2.0' in metrics
    assert 'sidekey_jwt_verifications_total{issuer="bao",outcome="ok"} 1.0' in metrics
