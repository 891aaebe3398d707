"""`forward_identity` (issue 17 section 6): the upstream learns which workload called from
the broker, never from the client. Real callers (httpx with an X.509-SVID, curl with a JWT-SVID,
an OpenBao OIDC ID token mapped by a template) against the recording aiohttp upstream of
test_http_jwt.py; every caller also forges the headers, which must not survive."""

from __future__ import annotations

import asyncio
import json

import httpx

from tests.oidc import SPIFFE_ID as BAO_SPIFFE_ID
from tests.oidc import BaoOidc
from tests.pki import DEFAULT_CLIENT_ID, client_ssl_context
from tests.test_http_jwt import (  # the fixtures (upstream, world) with them
    SERVICE,
    World,
    bao_issuer,
    curl,
    file_issuer,
    upstream,  # noqa: F401
    url,
    world,  # noqa: F401
)
from tests.tokens import ORDERS_ID, SigningIssuer

FORGED = {
    "X-Spiffe-Id": "spiffe://example.org/ns/prod/sa/admin",
    "X-Sidekey-Claims": '{"sub":"spiffe://example.org/ns/prod/sa/admin"}',
}
FORWARD = {"header": "X-Spiffe-Id", "claims": True}


async def test_an_svid_callers_id_is_forwarded_and_forged_copies_dropped(
    world: World,  # noqa: F811
    signing_issuer: SigningIssuer,
) -> None:
    async with world.broker(
        file_issuer(signing_issuer), client_auth="mtls+jwt", allow=[DEFAULT_CLIENT_ID],
        forward_identity=FORWARD,
    ) as b:  # fmt: skip
        ctx = client_ssl_context(world.pki, world.pki.client())
        async with httpx.AsyncClient(verify=ctx) as client:
            # The forged headers in two spellings, twice each.
            forged = [*FORGED.items(), *((k.lower(), v) for k, v in FORGED.items())]
            reply = await client.get(url(b), headers=forged)
        assert reply.status_code == 200, reply.text
    (seen,) = world.upstream.seen
    assert seen.getall("X-Spiffe-Id") == [DEFAULT_CLIENT_ID]
    # A certificate has no claims to map: no claims header at all, not the forged one.
    assert "X-Sidekey-Claims" not in seen


async def test_a_jwt_svid_callers_id_and_claims_are_forwarded(
    world: World,  # noqa: F811
    signing_issuer: SigningIssuer,
) -> None:
    token = signing_issuer.mint(sub=ORDERS_ID, aud=SERVICE, ref="refs/heads/main")
    async with world.broker(file_issuer(signing_issuer), forward_identity=FORWARD) as b:
        forged = [a for k, v in FORGED.items() for a in ("-H", f"{k}: {v}")]
        status, _, body = await curl(
            world.pki, url(b), "-H", f"Authorization: Bearer {token}", *forged
        )
        assert status == 200, body
    (seen,) = world.upstream.seen
    assert seen.getall("X-Spiffe-Id") == [ORDERS_ID]
    # The mapped claims (what the ID was made of), not every claim of the token.
    assert [json.loads(v) for v in seen.getall("X-Sidekey-Claims")] == [{"sub": ORDERS_ID}]
    assert token not in str(dict(seen))


async def test_an_oidc_callers_template_claims_are_forwarded(
    world: World,  # noqa: F811
    bao_oidc: BaoOidc,
) -> None:
    token = await asyncio.to_thread(bao_oidc.id_token)
    async with world.broker(
        bao_issuer(bao_oidc), jwt={"audience": bao_oidc.client_id}, allow=[BAO_SPIFFE_ID],
        forward_identity=FORWARD,
    ) as b:  # fmt: skip
        status, _, body = await curl(world.pki, url(b), "-H", f"Authorization: Bearer {token}")
        assert status == 200, body
    (seen,) = world.upstream.seen
    assert seen.getall("X-Spiffe-Id") == [BAO_SPIFFE_ID]
    assert json.loads(seen["X-Sidekey-Claims"]) == {"ns": "prod", "sa": "orders"}


async def test_without_claims_true_only_the_id_is_forwarded(
    world: World,  # noqa: F811
    signing_issuer: SigningIssuer,
) -> None:
    token = signing_issuer.mint(sub=ORDERS_ID, aud=SERVICE)
    async with world.broker(
        file_issuer(signing_issuer), forward_identity={"header": "X-Caller"}
    ) as b:
        forged = [a for k, v in FORGED.items() for a in ("-H", f"{k}: {v}")]
        status, _, body = await curl(
            world.pki, url(b), "-H", f"Authorization: Bearer {token}", "-H", "X-Caller: me",
            *forged,
        )  # fmt: skip
        assert status == 200, body
    (seen,) = world.upstream.seen
    assert seen.getall("X-Caller") == [ORDERS_ID]
    # The claims header is the broker's even when it does not set it.
    assert "X-Sidekey-Claims" not in seen
    # A header forward_identity does not name is the client's business.
    assert seen.getall("X-Spiffe-Id") == [FORGED["X-Spiffe-Id"]]
