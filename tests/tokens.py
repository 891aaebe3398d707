"""Token issuers of the tests' own, for the negative cases a real issuer will not produce.

`SigningIssuer` holds a few key pairs (ES256, RS256, ...) minted at test time, writes their
public JWKS (or SPIFFE bundle) to a file the broker reads, and signs tokens with any claims,
header and key, including broken ones (expired, wrong audience, alg none, HS256 signed with
the public key, tampered payload). Real issuers are in tests/oidc.py (OpenBao) and
tests/spire.py (SPIRE). No private key is ever committed.

    def test_x(signing_issuer):
        token = signing_issuer.mint(sub="spiffe://example.org/ns/prod/sa/orders", aud="svc")
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

TRUST_DOMAIN = "example.org"
ORDERS_ID = f"spiffe://{TRUST_DOMAIN}/ns/prod/sa/orders"
# Token lifetime the tests use unless they ask for another: well past any test's timeout.
DEFAULT_LIFETIME = 600

Key = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def public_jwk(
    key: Key, kid: str | None, alg: str | None = None, use: str = "sig"
) -> dict[str, Any]:
    if isinstance(key, rsa.RSAPrivateKey):
        jwk: dict[str, Any] = json.loads(RSAAlgorithm.to_jwk(key.public_key()))
    else:
        jwk = json.loads(ECAlgorithm.to_jwk(key.public_key()))
    jwk["use"] = use
    if kid is not None:
        jwk["kid"] = kid
    if alg is not None:
        jwk["alg"] = alg
    return jwk


def new_key(alg: str) -> Key:
    if alg.startswith(("RS", "PS")):
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    curve = {"ES256": ec.SECP256R1(), "ES384": ec.SECP384R1(), "ES512": ec.SECP521R1()}[alg]
    return ec.generate_private_key(curve)


# Keys by (issuer, kid, alg), made once per test session: an RSA key takes 0.1-1 s to make on
# a loaded 2-core box, and each test would otherwise make several. Two issuers of one test
# (distinct names) never share a key.
_KEYS: dict[tuple[str, str, str], Key] = {}


def session_key(issuer: str, kid: str, alg: str) -> Key:
    key = _KEYS.get((issuer, kid, alg))
    if key is None:
        key = _KEYS[issuer, kid, alg] = new_key(alg)
    return key


class SigningIssuer:
    """Key pairs by kid, a JWKS file of their public halves, and `mint` for tokens."""

    def __init__(self, directory: Path, *, issuer: str | None = None, spiffe: bool = False) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.issuer = issuer
        # Written as a SPIFFE bundle (use: jwt-svid, spiffe_sequence) instead of a JWKS.
        self.spiffe = spiffe
        self.keys: dict[str, tuple[Key, str]] = {}
        self.jwks_path = directory / "jwks.json"
        self.sequence = 0
        self.add_key("es-1", "ES256")
        self.add_key("rs-1", "RS256")

    def add_key(self, kid: str, alg: str, *, publish: bool = True) -> None:
        self.keys[kid] = (session_key(self.directory.name, kid, alg), alg)
        if publish:
            self.publish()

    def remove_key(self, kid: str) -> None:
        del self.keys[kid]
        self.publish()

    def jwks(self, kids: list[str] | None = None) -> dict[str, Any]:
        use = "jwt-svid" if self.spiffe else "sig"
        keys = [
            public_jwk(key, kid, None if self.spiffe else alg, use)
            for kid, (key, alg) in self.keys.items()
            if kids is None or kid in kids
        ]
        doc: dict[str, Any] = {"keys": keys}
        if self.spiffe:
            self.sequence += 1
            doc["spiffe_sequence"] = self.sequence
        return doc

    def publish(self, kids: list[str] | None = None) -> None:
        """Write the JWKS file (atomically: the broker may be reading it)."""
        tmp = self.jwks_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.jwks(kids)))
        tmp.replace(self.jwks_path)

    def claims(self, **claims: Any) -> dict[str, Any]:
        now = int(time.time())
        out: dict[str, Any] = {"iat": now, "exp": now + DEFAULT_LIFETIME}
        if self.issuer is not None:
            out["iss"] = self.issuer
        out.update({k: v for k, v in claims.items() if v is not None})
        for k in [k for k, v in claims.items() if v is None]:
            out.pop(k, None)
        return out

    def mint(
        self, *, kid: str | None = "es-1", headers: dict[str, Any] | None = None, **claims: Any
    ) -> str:
        """A token signed by key `kid` (its own alg) with default iat/exp (and iss); a claim
        given as None is left out; `headers` may name another kid than the signing key's."""
        key, alg = self.keys[kid or "es-1"]
        hdr = dict(headers or {})
        if kid is not None:
            hdr.setdefault("kid", kid)
        return jwt.encode(self.claims(**claims), key, algorithm=alg, headers=hdr)

    # -- tokens no honest issuer makes -------------------------------------------------------

    def unsigned(self, **claims: Any) -> str:
        """alg: none."""
        return self._signing_input({"alg": "none", "typ": "JWT", "kid": "es-1"}, claims) + "."

    def hmac_with_public_key(self, kid: str = "rs-1", **claims: Any) -> str:
        """HS256 'signed' with the issuer's public key as the HMAC secret (key confusion)."""
        key, _ = self.keys[kid]
        secret = key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        signing_input = self._signing_input({"alg": "HS256", "typ": "JWT", "kid": kid}, claims)
        mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
        return f"{signing_input}.{_b64(mac)}"

    def _signing_input(self, header: dict[str, Any], claims: dict[str, Any]) -> str:
        payload = json.dumps(self.claims(**claims)).encode()
        return f"{_b64(json.dumps(header).encode())}.{_b64(payload)}"

    def tampered(self, token: str, **changes: Any) -> str:
        """`token` with its payload changed and the original signature kept."""
        header, payload, signature = token.split(".")
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        claims.update(changes)
        return f"{header}.{_b64(json.dumps(claims).encode())}.{signature}"


@pytest.fixture
def signing_issuer(tmp_path: Path) -> SigningIssuer:
    """JWT-SVIDs of example.org, keys es-1 (ES256) and rs-1 (RS256) in tmp_path/jwks.json."""
    return SigningIssuer(tmp_path / "issuer")


@pytest.fixture
def signing_issuers(tmp_path: Path) -> Iterator[Callable[..., SigningIssuer]]:
    """Make more issuers: `signing_issuers("name", issuer="https://...", spiffe=True)`."""

    def make(name: str, **kwargs: Any) -> SigningIssuer:
        return SigningIssuer(tmp_path / f"issuer-{name}", **kwargs)

    yield make
