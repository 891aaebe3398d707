"""OpenBao's identity OIDC provider as a real, generic OIDC issuer for the token tests.

The session's dev-mode OpenBao (tests/servers.py) gets a userpass user whose entity carries
metadata (ns=prod, sa=orders), a signing key, a scope that puts that metadata into the ID
token, a confidential client and a provider. OpenBao itself serves the discovery document
(``{issuer}/.well-known/openid-configuration``) and the JWKS; `BaoOidc.id_token()` walks the
authorization-code flow (authorize with the user's token, then the token endpoint with the
client's secret) and returns a fresh ID token, as a workload's OIDC login would.

    def test_x(bao_oidc):
        token = bao_oidc.id_token()      # aud = bao_oidc.client_id, iss = bao_oidc.issuer
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import hvac
import pytest
import requests

from tests.servers import OpenBao

# Names of what the fixture creates in the shared OpenBao; unique to this module.
PROVIDER = "sidekey-tests"
KEY = "sidekey-tests"
USERPASS_PATH = "userpass-sidekey-oidc"
USER = "orders"
SCOPE = "workload"
# The claims the scope adds, from the entity's metadata.
SCOPE_TEMPLATE = '{"ns": {{identity.entity.metadata.ns}}, "sa": {{identity.entity.metadata.sa}}}'
REDIRECT_URI = "http://127.0.0.1:1/callback"  # never followed: the code comes back as JSON
# What a broker's spiffe_id template makes of those claims.
SPIFFE_TEMPLATE = "spiffe://example.org/ns/{ns}/sa/{sa}"
SPIFFE_ID = "spiffe://example.org/ns/prod/sa/orders"
HTTP_TIMEOUT = 10


@dataclass
class BaoOidc:
    bao: OpenBao
    issuer: str
    client_id: str
    client_secret: str
    user_token: str
    entity_id: str

    def id_token(self, scope: str = f"openid {SCOPE}") -> str:
        """A fresh ID token for the user's entity (aud: client_id)."""
        base = f"{self.bao.address}/v1/identity/oidc/provider/{PROVIDER}"
        state, nonce = secrets.token_hex(8), secrets.token_hex(8)
        authorized = requests.get(
            f"{base}/authorize",
            params={
                "client_id": self.client_id,
                "scope": scope,
                "redirect_uri": REDIRECT_URI,
                "response_type": "code",
                "state": state,
                "nonce": nonce,
            },
            headers={"X-Vault-Token": self.user_token},
            timeout=HTTP_TIMEOUT,
        )
        authorized.raise_for_status()
        code = authorized.json()["code"]
        answer = requests.post(
            f"{base}/token",
            auth=(self.client_id, self.client_secret),
            data={"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT_URI},
            timeout=HTTP_TIMEOUT,
        )
        answer.raise_for_status()
        token: str = answer.json()["id_token"]
        return token

    def rotate_key(self) -> None:
        """A new signing key; the old one stays published for verification."""
        self.bao.client().write(f"identity/oidc/key/{KEY}/rotate")

    def jwks_kids(self) -> list[str]:
        keys = requests.get(f"{self.issuer}/.well-known/keys", timeout=HTTP_TIMEOUT).json()
        return [k["kid"] for k in keys["keys"]]


def configure_oidc(bao: OpenBao) -> BaoOidc:
    root = bao.client()
    root.sys.enable_auth_method("userpass", path=USERPASS_PATH)
    password = secrets.token_hex(16)
    root.write(f"auth/{USERPASS_PATH}/users/{USER}", password=password, token_policies="default")
    login = hvac.Client(url=bao.address).write(
        f"auth/{USERPASS_PATH}/login/{USER}", password=password
    )
    user_token, entity_id = login["auth"]["client_token"], login["auth"]["entity_id"]
    root.write(f"identity/entity/id/{entity_id}", metadata={"ns": "prod", "sa": "orders"})
    root.write(f"identity/oidc/key/{KEY}", allowed_client_ids="*", algorithm="ES256")
    root.write(f"identity/oidc/assignment/{PROVIDER}", entity_ids=[entity_id])
    root.write(f"identity/oidc/scope/{SCOPE}", template=SCOPE_TEMPLATE)
    root.write(
        f"identity/oidc/client/{PROVIDER}",
        redirect_uris=[REDIRECT_URI],
        assignments=[PROVIDER],
        key=KEY,
        id_token_ttl="30m",
    )
    client = root.read(f"identity/oidc/client/{PROVIDER}")["data"]
    root.write(
        f"identity/oidc/provider/{PROVIDER}",
        allowed_client_ids=[client["client_id"]],
        scopes_supported=[SCOPE],
    )
    issuer = root.read(f"identity/oidc/provider/{PROVIDER}")["data"]["issuer"]
    return BaoOidc(bao, issuer, client["client_id"], client["client_secret"], user_token, entity_id)


@pytest.fixture(scope="session")
def bao_oidc(openbao: OpenBao) -> BaoOidc:
    """OpenBao's OIDC provider, configured once per session on the shared dev server."""
    return configure_oidc(openbao)
