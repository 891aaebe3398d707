"""A stand-in for the Kubernetes TokenReview API, for testing the kubernetes auth method.

STAND-IN, NOT KUBERNETES: a real API server cannot run here. OpenBao's kubernetes auth
method checks a service-account JWT by POSTing a TokenReview to
`<kubernetes_host>/apis/authentication.k8s.io/v1/tokenreviews`; this small HTTPS server
answers that one request the way the API server does (authenticated, with the service
account's `system:serviceaccount:<namespace>:<name>` user and uid) for the tokens it minted,
and "not authenticated" for anything else. What is tested for real is the broker's side:
that it reads the token file at every login and sends it to OpenBao's login endpoint, and
OpenBao's side (its claim parsing, role binding and token issue). The JWT signature is not
checked by OpenBao here (no `pem_keys`), as in a cluster where the TokenReview is the check.

    reviewer = TokenReviewer(); await reviewer.start()
    jwt = reviewer.mint("prod", "sidekey")              # a projected-token-shaped JWT
    # configure auth/<mount>/config with kubernetes_host=reviewer.url,
    # kubernetes_ca_cert=reviewer.ca_pem, disable_local_ca_jwt=true
"""

from __future__ import annotations

import json
import ssl
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import jwt as pyjwt
import trustme
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec

REVIEW_PATH = "/apis/authentication.k8s.io/v1/tokenreviews"
ISSUER = "https://kubernetes.default.svc.cluster.local"
# A projected service-account token's default lifetime.
TOKEN_SECONDS = 3600


@dataclass
class TokenReviewer:
    """An HTTPS TokenReview endpoint on 127.0.0.1 that knows the tokens it minted."""

    url: str = ""
    ca_pem: str = ""
    reviews: list[str] = field(default_factory=list, repr=False)  # tokens it was asked about
    _known: dict[str, tuple[str, str, str]] = field(default_factory=dict, repr=False)
    _runner: web.AppRunner | None = None

    def __post_init__(self) -> None:
        self._key = ec.generate_private_key(ec.SECP256R1())

    async def start(self) -> None:
        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1", "localhost")
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert.configure_cert(ctx)
        self.ca_pem = ca.cert_pem.bytes().decode()
        app = web.Application()
        app.router.add_post(REVIEW_PATH, self._review)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=ctx)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"https://127.0.0.1:{port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def mint(self, namespace: str, name: str) -> str:
        """A JWT shaped like a projected service-account token for `namespace`/`name`."""
        uid = str(uuid.uuid4())
        now = int(time.time())
        claims: dict[str, Any] = {
            "aud": [ISSUER],
            "iss": ISSUER,
            "iat": now,
            "nbf": now,
            "exp": now + TOKEN_SECONDS,
            "sub": f"system:serviceaccount:{namespace}:{name}",
            "kubernetes.io": {
                "namespace": namespace,
                "serviceaccount": {"name": name, "uid": uid},
            },
        }
        token = pyjwt.encode(claims, self._key, algorithm="ES256", headers={"kid": "sa-key"})
        self._known[token] = (namespace, name, uid)
        return token

    async def _review(self, request: web.Request) -> web.Response:
        body = await request.json()
        token = str(body.get("spec", {}).get("token", ""))
        self.reviews.append(token)
        status: dict[str, Any] = {"authenticated": False}
        known = self._known.get(token)
        if known is not None:
            namespace, name, uid = known
            status = {
                "authenticated": True,
                "user": {
                    "username": f"system:serviceaccount:{namespace}:{name}",
                    "uid": uid,
                    "groups": ["system:serviceaccounts", f"system:serviceaccounts:{namespace}"],
                },
                "audiences": body.get("spec", {}).get("audiences") or [ISSUER],
            }
        review = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "metadata": {"creationTimestamp": None},
            "spec": body.get("spec", {}),
            "status": status,
        }
        return web.Response(text=json.dumps(review), status=201, content_type="application/json")
