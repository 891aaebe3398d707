"""JWT-SVIDs minted by a real SPIRE agent (`spire-agent api fetch jwt -audience ...`, the
`spire` fixture of tests/spire.py), verified by the broker against the trust domain's JWT
authorities: as SPIRE publishes them in a file (`spire-server bundle show -format spiffe`, a
SPIFFE bundle with `use: jwt-svid` keys), over HTTP (curl) and PostgreSQL (psql, token as
password); and as the broker's own Workload API watch delivers them (`jwks: workload_api`),
following a new JWT authority."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import jwt as pyjwt
import pytest
from aiohttp import web

from tests.brokers import running_broker
from tests.spire import CLIENT_ID, Spire
from tests.test_http_jwt import SERVICE, World, curl, url
from tests.test_http_jwt import upstream as upstream  # noqa: PLC0414  (a fixture)
from tests.test_http_jwt import world as world  # noqa: PLC0414  (a fixture)
from tests.test_postgres_adapter import service
from tests.test_postgres_jwt import Brokers, psql_token, token_dsn
from tests.test_postgres_jwt import brokers as brokers  # noqa: PLC0414  (a fixture)
from tests.test_workload_api import poll, port_of, spire_config


def spire_bundle(spire: Spire, directory: Path) -> Path:
    """The trust domain's SPIFFE bundle (X.509 and JWT authorities), as a file."""
    path = directory / "spire-bundle.json"
    path.write_text(spire.server("bundle", "show", "-format", "spiffe"))
    return path


async def test_spire_jwt_svid_over_http(world: World, spire: Spire) -> None:
    bundle = await asyncio.to_thread(spire_bundle, spire, world.tmp)
    token = await asyncio.to_thread(spire.fetch_jwt, SERVICE)
    claims = pyjwt.decode(token, options={"verify_signature": False})
    assert claims["sub"] == CLIENT_ID and "kid" in pyjwt.get_unverified_header(token)
    async with world.broker([{"name": "spire", "jwks": str(bundle)}]) as b:
        status, _, body = await curl(world.pki, url(b), "-H", f"Authorization: Bearer {token}")
        assert status == 200, body
        # SPIRE's token for another audience is not for this service.
        other = await asyncio.to_thread(spire.fetch_jwt, "payments-api")
        status, _, body = await curl(world.pki, url(b), "-H", f"Authorization: Bearer {other}")
        assert status == 401 and "not addressed to this service" in body
        (issuer,) = b.inventory()["jwt_issuers"]
    (request,) = [e for e in world.events() if e["event"] == "request"]
    assert (request["spiffe_id"], request["auth_method"], request["issuer"]) == (
        CLIENT_ID,
        "jwt-svid",
        "spire",
    )
    assert token not in world.audit.read_text()
    # Only the JWT authorities of the bundle verify tokens.
    jwt_keys = [k for k in json.loads(bundle.read_text())["keys"] if k["use"] == "jwt-svid"]
    assert sorted(issuer["key_ids"]["example.org"]) == sorted(k["kid"] for k in jwt_keys)


async def test_spire_jwt_svid_as_a_postgres_password(brokers: Brokers, spire: Spire) -> None:
    world = brokers.world
    bundle = await asyncio.to_thread(spire_bundle, spire, world.tmp_path)
    token = await asyncio.to_thread(spire.fetch_jwt, "orders-db")
    svc = service(world.vdb.postgres, client_auth="jwt")
    async with brokers(svc, [{"name": "spire", "jwks": str(bundle)}]) as b:
        code, out, err = await psql_token(token_dsn(b, world.pki), token, "SELECT current_user")
        assert code == 0, err
        assert out.strip().startswith("v-")
    (start,) = [e for e in brokers.events() if e["event"] == "session_start"]
    assert (start["spiffe_id"], start["auth_method"]) == (CLIENT_ID, "jwt-svid")


@pytest.fixture
async def workload_upstream() -> AsyncIterator[str]:
    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    runner = web.AppRunner(web.Application())
    runner.app.router.add_get("/", ok)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def test_jwt_svids_verified_by_the_workload_apis_jwt_bundles(
    spire: Spire, tmp_path: Path, workload_upstream: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`jwks: workload_api`: the keys are the JWT bundles the broker's own Workload API watch
    delivers (broker.identity.material), and follow SPIRE's JWT authority rotation."""
    monkeypatch.setenv("SIDEKEY_TEST_API_TOKEN", "t0ken")
    config = spire_config(spire, workload_upstream)
    config["identity"]["jwt"] = {"issuers": [{"name": "spire", "jwks": "workload_api"}]}
    config["services"][0]["client_auth"] = "jwt"
    config["audit"] = {"file": str(tmp_path / "audit.jsonl")}
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(await asyncio.to_thread(spire.bundle_pem))
    async with running_broker(tmp_path, config) as broker:
        await poll(lambda: broker.ready)
        port = port_of(broker)
        token = await asyncio.to_thread(spire.fetch_jwt, "orders-api")
        target = f"https://localhost:{port}/"
        proc = await asyncio.create_subprocess_exec(
            "curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--cacert", str(bundle),
            "--resolve", f"localhost:{port}:127.0.0.1", "-H", f"Authorization: Bearer {token}",
            target, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await proc.communicate()
        assert out == b"200", err
        (issuer,) = broker.inventory()["jwt_issuers"]
        before = set(issuer["key_ids"]["example.org"])
        assert pyjwt.get_unverified_header(token)["kid"] in before
        # A new JWT authority joins the bundle: the agent pushes it, the verifier has it.
        await asyncio.to_thread(spire.prepare_jwt_authority)

        def grown() -> bool:
            keys = broker.inventory()["jwt_issuers"][0]["key_ids"]["example.org"]
            return len(set(keys) - before) > 0

        await poll(grown)
    events = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    (request,) = [e for e in events if e["event"] == "request"]
    assert (request["spiffe_id"], request["auth_method"], request["issuer"]) == (
        CLIENT_ID,
        "jwt-svid",
        "spire",
    )
