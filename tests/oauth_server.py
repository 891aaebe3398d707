"""A real OAuth 2.0 authorization server and a resource server that checks its tokens.

The authorization server is Node's `oidc-provider` (OpenID Certified), installed once by
``scripts/install-oidc-provider.sh`` into ``~/.cache/sidekey/oidc-provider-<version>/`` and run
with ``tests/oauth/provider.mjs``: client credentials enabled, JWT access tokens (RFC 9068)
for one resource server, clients proving themselves with a secret (client_secret_basic,
client_secret_post) or a private_key_jwt assertion. Everything is made per start: the signing
key, the client secrets, the client's key pair.

`ResourceServer` is the API behind the broker: an aiohttp server that verifies the bearer
token it is sent exactly as a real API would (signature against the provider's JWKS, iss,
aud, exp, scope), refuses with 401 and a ``WWW-Authenticate`` challenge otherwise, and keeps
what it saw (token ids, refusals) for the tests to assert on. `revoke(jti)` makes it refuse a
token that is still valid, as an API does after a revocation or a key rotation.

    async def test_x(oauth_provider):
        provider = oauth_provider(token_ttl=60)
        rs = ResourceServer(provider); await rs.start()
"""

from __future__ import annotations

import json
import os
import secrets
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import pytest
import trustme
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from tests.servers import POLL_SECONDS, _stop_pid, free_port

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "install-oidc-provider.sh"
PROVIDER_JS = REPO / "tests" / "oauth" / "provider.mjs"
OIDC_PROVIDER_VERSION = "9.13.3"
CACHE = Path(os.environ.get("SIDEKEY_CACHE", Path.home() / ".cache" / "sidekey"))
PREFIX = CACHE / f"oidc-provider-{OIDC_PROVIDER_VERSION}"
# Node starts oidc-provider in about half a second; 30 s covers a loaded 2-core CI box.
START_SECONDS = 30.0
# npm install of oidc-provider on a cold cache; a stuck registry fails the run instead of
# hanging it (the ws install, tests/test_http_websocket.py, has 300 s).
INSTALL_SECONDS = 600.0
AUDIENCE = "https://orders.test"
SCOPES = ("orders.read", "orders.write")
SECRET_CLIENT = "sidekey-secret"
POST_CLIENT = "sidekey-post"
JWT_CLIENT = "sidekey-jwt"


@dataclass
class OAuthProvider:
    """A running oidc-provider. The client secrets and the private_key_jwt client's PEM key
    are what the tests put into OpenBao KV."""

    issuer: str
    workdir: Path
    proc: subprocess.Popen[bytes] = field(repr=False)
    secrets: dict[str, str] = field(repr=False)
    client_key_pem: str = field(repr=False)
    token_ttl: int = 60
    # Trusts the provider's certificate when it serves HTTPS; None over HTTP.
    ssl_context: ssl.SSLContext | None = field(default=None, repr=False)

    @property
    def token_url(self) -> str:
        return f"{self.issuer}/token"

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        return (self.workdir / "provider.log").read_text(errors="replace")

    def issued(self) -> list[str]:
        """The jti of every access token issued so far, oldest first."""
        return [
            line.split("jti=", 1)[1].strip()
            for line in self.log().splitlines()
            if line.startswith("issued ")
        ]

    def stop(self) -> None:
        _stop_pid(self.proc)


def install() -> Path:
    """The installed oidc-provider (run the install script when missing)."""
    if not (PREFIX / "node_modules" / "oidc-provider" / "package.json").is_file():
        done = subprocess.run(
            [str(SCRIPT)], capture_output=True, text=True, check=False, timeout=INSTALL_SECONDS
        )
        if done.returncode != 0:
            pytest.fail(f"{SCRIPT.name} failed:\n{done.stdout}\n{done.stderr}")
    return PREFIX


def start_provider(
    workdir: Path, *, token_ttl: int = 60, port: int | None = None, tls: trustme.CA | None = None
) -> OAuthProvider:
    """Start oidc-provider; over HTTPS with a certificate for localhost from `tls` if given."""
    prefix = install()
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    issuer = f"{'https://localhost' if tls else 'http://127.0.0.1'}:{port}"
    signing = json.loads(ECAlgorithm.to_jwk(ec.generate_private_key(ec.SECP256R1())))
    signing.update(kid="signing-1", use="sig", alg="ES256")
    client_key = ec.generate_private_key(ec.SECP256R1())
    client_jwk = json.loads(ECAlgorithm.to_jwk(client_key.public_key()))
    client_jwk.update(kid="client-1", use="sig", alg="ES256")
    client_secrets = {
        SECRET_CLIENT: secrets.token_urlsafe(32),
        POST_CLIENT: secrets.token_urlsafe(32),
    }
    config: dict[str, Any] = {
        "issuer": issuer,
        "port": port,
        "jwks": {"keys": [signing]},
        "audience": AUDIENCE,
        "scopes": list(SCOPES),
        "token_ttl": token_ttl,
        "clients": [
            {
                "client_id": SECRET_CLIENT,
                "client_secret": client_secrets[SECRET_CLIENT],
                "token_endpoint_auth_method": "client_secret_basic",
            },
            {
                "client_id": POST_CLIENT,
                "client_secret": client_secrets[POST_CLIENT],
                "token_endpoint_auth_method": "client_secret_post",
            },
            {
                "client_id": JWT_CLIENT,
                "token_endpoint_auth_method": "private_key_jwt",
                "token_endpoint_auth_signing_alg": "ES256",
                "jwks": {"keys": [client_jwk]},
            },
        ],
    }
    context: ssl.SSLContext | None = None
    if tls is not None:
        issued = tls.issue_cert("localhost")
        issued.cert_chain_pems[0].write_to_path(workdir / "cert.pem")
        for blob in issued.cert_chain_pems[1:]:
            blob.write_to_path(workdir / "cert.pem", append=True)
        issued.private_key_pem.write_to_path(workdir / "key.pem")
        config["tls"] = {"cert": str(workdir / "cert.pem"), "key": str(workdir / "key.pem")}
        context = ssl.create_default_context()
        tls.configure_trust(context)
    config_file = workdir / "provider.json"
    config_file.write_text(json.dumps(config))
    log = (workdir / "provider.log").open("wb")
    proc = subprocess.Popen(
        ["node", str(PROVIDER_JS), str(config_file)],
        cwd=workdir,
        env={
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "OIDC_PROVIDER_HOME": str(prefix),
            "NODE_ENV": "production",
        },
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    pem = client_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    provider = OAuthProvider(issuer, workdir, proc, client_secrets, pem, token_ttl, context)
    deadline = time.monotonic() + START_SECONDS
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"oidc-provider exited with {proc.returncode}:\n{provider.log()}")
        try:
            with urllib.request.urlopen(
                f"{issuer}/.well-known/openid-configuration", timeout=1, context=context
            ) as resp:
                if json.load(resp).get("issuer") == issuer:
                    return provider
        except (urllib.error.URLError, OSError, ValueError):
            pass
        if time.monotonic() > deadline:
            provider.stop()
            raise RuntimeError(f"oidc-provider not up after {START_SECONDS}s:\n{provider.log()}")
        time.sleep(POLL_SECONDS)


@pytest.fixture
def oauth_provider(tmp_path: Path) -> Iterator[Callable[..., OAuthProvider]]:
    """Start oidc-provider servers (`token_ttl` seconds per access token); stopped at the end."""
    started: list[OAuthProvider] = []

    def start(**kwargs: Any) -> OAuthProvider:
        provider = start_provider(tmp_path / f"oidc-provider-{len(started)}", **kwargs)
        started.append(provider)
        return provider

    try:
        yield start
    finally:
        for provider in started:
            provider.stop()


@dataclass
class Seen:
    method: str
    path: str
    jti: str | None
    status: int


class ResourceServer:
    """An API that takes only valid access tokens from `provider` (see the module docstring)."""

    def __init__(self, provider: OAuthProvider, scope: str = "orders.read") -> None:
        self.provider = provider
        self.scope = scope
        self.seen: list[Seen] = []
        # Every bearer token presented, as sent (for "never in the log" checks: a JWT's jti
        # shows only base64-encoded inside it).
        self.tokens: list[str] = []
        self.revoked: set[str] = set()
        self.url = ""
        self._runner: web.AppRunner | None = None
        self._jwks = jwt.PyJWKClient(
            f"{provider.issuer}/jwks", cache_keys=True, ssl_context=provider.ssl_context
        )

    async def start(self) -> str:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def refusals(self) -> list[Seen]:
        return [s for s in self.seen if s.status == 401]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        auth = request.headers.getall("Authorization", [])
        claims: dict[str, Any] | None = None
        error = "no bearer token"
        if len(auth) == 1 and auth[0].startswith("Bearer "):
            token = auth[0][len("Bearer ") :]
            self.tokens.append(token)
            try:
                key = self._jwks.get_signing_key_from_jwt(token)
                claims = jwt.decode(
                    token,
                    key.key,
                    algorithms=["ES256"],
                    audience=AUDIENCE,
                    issuer=self.provider.issuer,
                    options={"require": ["exp", "iat", "jti"]},
                )
                error = ""
            except jwt.PyJWTError as exc:
                claims, error = None, f"invalid token: {exc}"
        jti = claims.get("jti") if claims else None
        if claims is not None and jti in self.revoked:
            claims, error = None, "token revoked"
        if claims is not None and self.scope not in str(claims.get("scope", "")).split():
            claims, error = None, f"token lacks scope {self.scope}"
        if claims is None:
            self.seen.append(Seen(request.method, request.path, jti, 401))
            return web.Response(
                status=401,
                text=f"resource server: {error}",
                headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
            )
        self.seen.append(Seen(request.method, request.path, jti, 200))
        return web.json_response(
            {"client_id": claims.get("client_id"), "jti": jti, "body": body.decode()}
        )
