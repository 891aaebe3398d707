"""Issuers' keys fetched and kept fresh (broker/identity/jwks.py): a real HTTP server on
loopback serves the JWKS and discovery documents, and counts how often it is asked."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from broker.config import Section
from broker.config.jwt import parse_jwt
from broker.identity import jwks as jwksmod
from broker.identity.jwks import JwtAuthority
from broker.identity.jwt import TokenError
from broker.observe.metrics import Metrics
from tests.tokens import ORDERS_ID, SigningIssuer

AUD = "orders-api"
TEMPLATE = "spiffe://example.org/ns/{ns}/sa/{sa}"


class KeyServer:
    """An aiohttp server with /jwks, /.well-known/openid-configuration and knobs to break them."""

    def __init__(self, issuer: SigningIssuer) -> None:
        self.issuer = issuer
        self.hits: dict[str, int] = {}
        self.discovery_issuer: str | None = None  # None: the server's own base URL
        self.oversize = False
        self.redirect = False
        self.delay = 0.0
        self.base = ""

    async def jwks(self, request: web.Request) -> web.StreamResponse:
        self.hits["jwks"] = self.hits.get("jwks", 0) + 1
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.redirect:
            raise web.HTTPFound("/elsewhere")
        if self.oversize:
            return web.Response(body=b" " * (jwksmod.MAX_JWKS_BYTES + 10))
        return web.json_response(self.issuer.jwks())

    async def discovery(self, request: web.Request) -> web.Response:
        self.hits["discovery"] = self.hits.get("discovery", 0) + 1
        issuer = self.discovery_issuer or self.base
        return web.json_response({"issuer": issuer, "jwks_uri": f"{self.base}/jwks"})


@pytest.fixture
async def key_server(signing_issuers: Any) -> AsyncIterator[KeyServer]:
    server = KeyServer(signing_issuers("served", issuer="pending"))
    app = web.Application()
    app.router.add_get("/jwks", server.jwks)
    app.router.add_get("/.well-known/openid-configuration", server.discovery)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    server.base = f"http://127.0.0.1:{port}"
    server.issuer.issuer = server.base
    try:
        yield server
    finally:
        await runner.cleanup()


def authority(tmp_path: Path, issuers: list[dict[str, Any]]) -> tuple[JwtAuthority, Metrics]:
    metrics = Metrics()
    config = parse_jwt(Section({"issuers": issuers}, "identity.jwt"), tmp_path, "example.org")
    return JwtAuthority(config, metrics), metrics


async def wait_ready(auth: JwtAuthority) -> None:
    async with asyncio.timeout(30):
        while not auth.ready:
            await asyncio.sleep(0.02)


def count(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return value or 0.0


async def test_jwks_url_refreshed_on_unknown_kid_at_most_once_per_interval(
    tmp_path: Path, key_server: KeyServer
) -> None:
    svid = key_server.issuer
    auth, metrics = authority(tmp_path, [{"name": "mesh", "jwks": f"{key_server.base}/jwks"}])
    await auth.start()
    try:
        await wait_ready(auth)
        assert key_server.hits == {"jwks": 1}
        assert (await auth.verify(svid.mint(sub=ORDERS_ID, aud=AUD), AUD)).spiffe_id == ORDERS_ID
        # A new key the broker has not seen: one fetch, then it verifies.
        svid.add_key("es-2", "ES256")
        identity = await auth.verify(svid.mint(kid="es-2", sub=ORDERS_ID, aud=AUD), AUD)
        assert identity.spiffe_id == ORDERS_ID
        assert key_server.hits["jwks"] == 2
        # Made-up kids do not turn into a fetch each.
        for i in range(5):
            made_up = svid.mint(sub=ORDERS_ID, aud=AUD, headers={"kid": f"made-up-{i}"})
            with pytest.raises(TokenError) as info:
                await auth.verify(made_up, AUD)
            assert info.value.outcome == "unknown_key"
        assert key_server.hits["jwks"] == 2
        assert count(metrics, "sidekey_jwks_refreshes_total", issuer="mesh", outcome="ok") == 2
        assert count(metrics, "sidekey_jwt_verifications_total", issuer="mesh", outcome="ok") == 2
        assert count(metrics, "sidekey_jwks_keys", issuer="mesh") == 3
        inventory = auth.describe()[0]
        assert inventory["keys_from"] == f"url:{key_server.base}/jwks"
        assert inventory["key_ids"] == {"example.org": ["es-1", "es-2", "rs-1"]}
    finally:
        await auth.stop()


async def test_unknown_kids_share_one_fetch(tmp_path: Path, key_server: KeyServer) -> None:
    svid = key_server.issuer
    auth, _ = authority(tmp_path, [{"name": "mesh", "jwks": f"{key_server.base}/jwks"}])
    await auth.start()
    try:
        await wait_ready(auth)
        svid.add_key("es-2", "ES256")
        key_server.delay = 0.3
        tokens = [svid.mint(kid="es-2", sub=ORDERS_ID, aud=AUD, jti=str(i)) for i in range(10)]
        results = await asyncio.gather(*(auth.verify(t, AUD) for t in tokens))
        assert {r.spiffe_id for r in results} == {ORDERS_ID}
        assert key_server.hits["jwks"] == 2
    finally:
        await auth.stop()


async def test_a_withdrawn_key_stops_verifying_after_the_next_fetch(
    tmp_path: Path, key_server: KeyServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    svid = key_server.issuer
    monkeypatch.setattr(jwksmod, "UNKNOWN_KID_REFRESH_SECONDS", 0.0)
    auth, _ = authority(tmp_path, [{"name": "mesh", "jwks": f"{key_server.base}/jwks"}])
    await auth.start()
    try:
        await wait_ready(auth)
        token = svid.mint(kid="rs-1", sub=ORDERS_ID, aud=AUD)
        assert await auth.verify(token, AUD)
        svid.remove_key("rs-1")
        assert await auth.refresh("mesh")
        with pytest.raises(TokenError) as info:
            await auth.verify(token, AUD)  # cached a moment ago: the cache checks the key
        assert info.value.outcome == "unknown_key"
    finally:
        await auth.stop()


@pytest.mark.parametrize("fault", ["oversize", "redirect"])
async def test_a_bad_answer_keeps_the_last_good_keys(
    tmp_path: Path, key_server: KeyServer, fault: str
) -> None:
    svid = key_server.issuer
    auth, metrics = authority(tmp_path, [{"name": "mesh", "jwks": f"{key_server.base}/jwks"}])
    await auth.start()
    try:
        await wait_ready(auth)
        setattr(key_server, fault, True)
        assert not await auth.refresh("mesh")
        (described,) = auth.describe()
        assert described["error"] and described["key_ids"]["example.org"] == ["es-1", "rs-1"]
        assert count(metrics, "sidekey_jwks_refreshes_total", issuer="mesh", outcome="error") == 1
        assert await auth.verify(svid.mint(sub=ORDERS_ID, aud=AUD), AUD)
    finally:
        await auth.stop()


async def test_first_fetch_failing_means_not_ready(tmp_path: Path) -> None:
    auth, _ = authority(tmp_path, [{"name": "down", "jwks": "http://127.0.0.1:9/jwks"}])
    await auth.start()
    try:
        async with asyncio.timeout(30):
            while not auth.not_ready().get("down", "").startswith("http"):
                await asyncio.sleep(0.02)
        assert not auth.ready
    finally:
        await auth.stop()


async def test_oidc_discovery(tmp_path: Path, key_server: KeyServer) -> None:
    oidc = key_server.issuer
    auth, metrics = authority(
        tmp_path, [{"name": "idp", "issuer": key_server.base, "spiffe_id": TEMPLATE}]
    )
    await auth.start()
    try:
        await wait_ready(auth)
        assert key_server.hits == {"discovery": 1, "jwks": 1}
        identity = await auth.verify(oidc.mint(sub="u-1", ns="prod", sa="orders", aud=AUD), AUD)
        assert (identity.spiffe_id, identity.method) == (ORDERS_ID, "oidc")
        assert auth.describe()[0]["jwks_uri"] == f"{key_server.base}/jwks"
        # Wrong audience, counted by outcome.
        with pytest.raises(TokenError):
            await auth.verify(oidc.mint(sub="u-1", ns="prod", sa="orders", aud="other"), AUD)
        assert count(
            metrics, "sidekey_jwt_verifications_total", issuer="idp", outcome="bad_audience"
        )
    finally:
        await auth.stop()


async def test_discovery_must_name_the_issuer_asked_for(
    tmp_path: Path, key_server: KeyServer
) -> None:
    key_server.discovery_issuer = "https://evil.example"
    auth, _ = authority(
        tmp_path, [{"name": "idp", "issuer": key_server.base, "spiffe_id": TEMPLATE}]
    )
    await auth.start()
    try:
        assert not await auth.refresh("idp")
        assert "names issuer 'https://evil.example'" in auth.not_ready()["idp"]
        assert "jwks" not in key_server.hits
    finally:
        await auth.stop()


async def test_file_keys_are_read_again_on_an_unknown_kid(
    tmp_path: Path, signing_issuer: SigningIssuer
) -> None:
    auth, _ = authority(tmp_path, [{"name": "spire", "jwks": str(signing_issuer.jwks_path)}])
    assert auth.ready  # read at construction: `sidekey check` sees a bad file
    await auth.start()
    try:
        signing_issuer.add_key("es-2", "ES256")
        token = signing_issuer.mint(kid="es-2", sub=ORDERS_ID, aud=AUD)
        assert (await auth.verify(token, AUD)).spiffe_id == ORDERS_ID
    finally:
        await auth.stop()


async def test_workload_api_bundles(tmp_path: Path, signing_issuer: SigningIssuer) -> None:
    auth, _ = authority(tmp_path, [{"name": "spire", "jwks": "workload_api"}])
    assert not auth.ready
    keys = {kid: key.public_key() for kid, (key, _) in signing_issuer.keys.items()}
    auth.set_workload_bundles({"example.org": keys})
    assert auth.ready
    await auth.start()
    try:
        token = signing_issuer.mint(sub=ORDERS_ID, aud=AUD)
        assert (await auth.verify(token, AUD)).spiffe_id == ORDERS_ID
        other = signing_issuer.mint(sub="spiffe://partner.org/x", aud=AUD)
        with pytest.raises(TokenError, match=r"no JWT bundle for trust domain partner\.org"):
            await auth.verify(other, AUD)
        auth.set_workload_bundles({"example.org": {}})
        with pytest.raises(TokenError):
            await auth.verify(token, AUD)
    finally:
        await auth.stop()


def test_file_jwks_is_json(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"keys": []}))
    auth, _ = authority(tmp_path, [{"name": "f", "jwks": str(path)}])
    assert auth.describe()[0]["key_ids"] == {"example.org": []}
