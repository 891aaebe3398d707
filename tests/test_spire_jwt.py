"""JWT-SVIDs minted by a real SPIRE agent (`spire-agent api fetch jwt -audience ...`, the
`spire` fixture of tests/spire.py), verified by the broker against the trust domain's JWT
authorities as SPIRE publishes them (`spire-server bundle show -format spiffe`, a SPIFFE
bundle with `use: jwt-svid` keys), over HTTP (curl) and PostgreSQL (psql, token as password).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import jwt as pyjwt

from tests.spire import CLIENT_ID, Spire
from tests.test_http_jwt import SERVICE, World, curl, url
from tests.test_http_jwt import upstream as upstream  # noqa: PLC0414  (a fixture)
from tests.test_http_jwt import world as world  # noqa: PLC0414  (a fixture)
from tests.test_postgres_adapter import service
from tests.test_postgres_jwt import Brokers, psql_token, token_dsn
from tests.test_postgres_jwt import brokers as brokers  # noqa: PLC0414  (a fixture)


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
