"""Policy `claims:` conditions on a real JWT caller, end to end (HTTP, client_auth: jwt)."""

from __future__ import annotations

from tests.test_http_jwt import (  # the fixtures (upstream, world) with them
    SERVICE,
    World,
    curl,
    file_issuer,
    upstream,  # noqa: F401
    url,
    world,  # noqa: F401
)
from tests.tokens import ORDERS_ID, SigningIssuer


async def test_claims_conditions_see_the_tokens_claims(
    world: World,  # noqa: F811
    signing_issuer: SigningIssuer,
) -> None:
    rule = {"id": ORDERS_ID, "claims": {"ref": "refs/heads/main"}}
    async with world.broker(file_issuer(signing_issuer), allow=[rule]) as b:
        main = signing_issuer.mint(sub=ORDERS_ID, aud=SERVICE, ref="refs/heads/main")
        status, _, body = await curl(world.pki, url(b), "-H", f"Authorization: Bearer {main}")
        assert status == 200, body
        branch = signing_issuer.mint(sub=ORDERS_ID, aud=SERVICE, ref="refs/heads/evil")
        status, _, body = await curl(world.pki, url(b), "-H", f"Authorization: Bearer {branch}")
        assert status == 403 and "only when claim ref is refs/heads/main" in body
    assert len(world.upstream.seen) == 1
