"""The pure token verifier (broker/identity/jwt.py) with tokens the tests sign themselves:
every way a token must fail, the claim mapping, the cache, and key sets."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jwt as pyjwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from broker.config import Section
from broker.config.jwt import parse_jwt
from broker.identity import jwt as jwtmod
from broker.identity.jwt import (
    JwtVerifier,
    KeySet,
    KeySetError,
    TokenError,
    UnknownKey,
    map_claims,
)
from tests.tokens import ORDERS_ID, SigningIssuer, public_jwk

AUD = "orders-api"
K8S_ISS = "https://k8s.example.org"
GH_ISS = "https://token.actions.githubusercontent.com"
K8S_TEMPLATE = (
    "spiffe://example.org/ns/{kubernetes.io.namespace}/sa/{kubernetes.io.serviceaccount.name}"
)
GH_TEMPLATE = "spiffe://ci.example.org/gh/{repository}/{ref}"


def verifier(tmp_path: Path, issuers: list[dict[str, Any]], **jwt_section: Any) -> JwtVerifier:
    section = Section({"issuers": issuers, **jwt_section}, "identity.jwt")
    return JwtVerifier(parse_jwt(section, tmp_path, "example.org"))


@pytest.fixture
def svid(tmp_path: Path, signing_issuer: SigningIssuer) -> tuple[JwtVerifier, SigningIssuer]:
    """A verifier of example.org JWT-SVIDs with the signing issuer's keys loaded."""
    v = verifier(tmp_path, [{"name": "spire", "jwks": str(signing_issuer.jwks_path)}])
    v.set_keys("spire", {"example.org": KeySet.from_jwks(signing_issuer.jwks())})
    return v, signing_issuer


def refused(v: JwtVerifier, token: str, outcome: str, audience: str = AUD) -> TokenError:
    with pytest.raises(TokenError) as info:
        v.verify(token, audience)
    assert info.value.outcome == outcome, str(info.value)
    assert token not in str(info.value)  # never echoed
    return info.value


# --------------------------------------------------------------------------- JWT-SVIDs


@pytest.mark.parametrize("kid", ["es-1", "rs-1"])
def test_jwt_svid_proves_its_sub(svid: tuple[JwtVerifier, SigningIssuer], kid: str) -> None:
    v, issuer = svid
    token = issuer.mint(kid=kid, sub=ORDERS_ID, aud=AUD, jti="t-1")
    result = v.verify(token, AUD)
    identity = result.identity
    assert (identity.spiffe_id, identity.method, identity.issuer) == (
        ORDERS_ID,
        "jwt-svid",
        "spire",
    )
    assert identity.claims == (("sub", ORDERS_ID),)
    assert identity.proof_id == "t-1"
    assert identity.expires is not None and identity.expires.timestamp() > time.time()
    assert result.issuer == "spire" and not result.cached


def test_a_token_seen_again_is_not_checked_again(
    svid: tuple[JwtVerifier, SigningIssuer], monkeypatch: pytest.MonkeyPatch
) -> None:
    v, issuer = svid
    token = issuer.mint(sub=ORDERS_ID, aud=[AUD, "other"])
    calls = []
    original = jwtmod._JWT.decode_complete

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(jwtmod._JWT, "decode_complete", counting)
    assert not v.verify(token, AUD).cached
    again = v.verify(token, AUD)
    assert again.cached and again.identity.spiffe_id == ORDERS_ID
    assert v.verify(token, "other").cached
    assert len(calls) == 1
    # Cached, but still addressed to whom it was addressed to.
    refused(v, token, "bad_audience", audience="payments")


def test_the_cache_keeps_no_token_and_is_bounded(
    tmp_path: Path, signing_issuer: SigningIssuer
) -> None:
    section = Section({"issuers": [{"name": "spire", "jwks": str(signing_issuer.jwks_path)}]}, "j")
    v = JwtVerifier(parse_jwt(section, tmp_path, "example.org"), max_cached=2)
    v.set_keys("spire", {"example.org": KeySet.from_jwks(signing_issuer.jwks())})
    tokens = [signing_issuer.mint(sub=ORDERS_ID, aud=AUD, jti=str(i)) for i in range(3)]
    for token in tokens:
        v.verify(token, AUD)
    assert len(v) == 2
    assert all(isinstance(k, bytes) and len(k) == 32 for k in v._cache)
    assert not v.verify(tokens[0], AUD).cached  # evicted first
    assert v.verify(tokens[2], AUD).cached


def test_expired_token(svid: tuple[JwtVerifier, SigningIssuer]) -> None:
    v, issuer = svid
    now = int(time.time())
    refused(v, issuer.mint(sub=ORDERS_ID, aud=AUD, iat=now - 600, exp=now - 60), "expired")
    # Within the skew (30 s by default) it still verifies.
    assert v.verify(issuer.mint(sub=ORDERS_ID, aud=AUD, iat=now - 600, exp=now - 5), AUD)


def test_a_cached_token_expires_too(svid: tuple[JwtVerifier, SigningIssuer]) -> None:
    v, issuer = svid
    token = issuer.mint(sub=ORDERS_ID, aud=AUD, exp=int(time.time()) + 1)
    v.skew = 0
    assert v.verify(token, AUD)

    def expired() -> bool:
        try:
            v.verify(token, AUD)
        except TokenError as exc:
            return exc.outcome == "expired"
        return False

    deadline = time.monotonic() + 10
    while not expired():
        assert time.monotonic() < deadline, "the cached token never expired"
        time.sleep(0.1)


def test_not_yet_valid(svid: tuple[JwtVerifier, SigningIssuer]) -> None:
    v, issuer = svid
    now = int(time.time())
    refused(v, issuer.mint(sub=ORDERS_ID, aud=AUD, nbf=now + 300), "not_yet_valid")
    refused(v, issuer.mint(sub=ORDERS_ID, aud=AUD, iat=now + 300), "not_yet_valid")


def test_skew_is_configurable(tmp_path: Path, signing_issuer: SigningIssuer) -> None:
    v = verifier(tmp_path, [{"name": "spire", "jwks": str(signing_issuer.jwks_path)}], clock_skew=0)
    v.set_keys("spire", {"example.org": KeySet.from_jwks(signing_issuer.jwks())})
    now = int(time.time())
    refused(v, signing_issuer.mint(sub=ORDERS_ID, aud=AUD, exp=now - 2), "expired")


def test_wrong_or_missing_audience(svid: tuple[JwtVerifier, SigningIssuer]) -> None:
    v, issuer = svid
    refused(v, issuer.mint(sub=ORDERS_ID, aud="payments"), "bad_audience")
    refused(v, issuer.mint(sub=ORDERS_ID, aud=["payments", "billing"]), "bad_audience")
    refused(v, issuer.mint(sub=ORDERS_ID), "bad_audience")
    refused(v, issuer.mint(sub=ORDERS_ID, aud=[]), "bad_audience")


def test_exp_is_required(svid: tuple[JwtVerifier, SigningIssuer]) -> None:
    v, issuer = svid
    refused(v, issuer.mint(sub=ORDERS_ID, aud=AUD, exp=None), "malformed")


def test_unknown_kid_asks_for_a_refresh(svid: tuple[JwtVerifier, SigningIssuer]) -> None:
    v, issuer = svid
    issuer.add_key("es-2", "ES256", publish=False)
    token = issuer.mint(kid="es-2", sub=ORDERS_ID, aud=AUD)
    with pytest.raises(UnknownKey) as info:
        v.verify(token, AUD)
    assert info.value.issuer == "spire"
    # The IO side refreshes; then it verifies.
    v.set_keys("spire", {"example.org": KeySet.from_jwks(issuer.jwks())})
    assert v.verify(token, AUD).identity.spiffe_id == ORDERS_ID


def test_a_key_that_leaves_the_set_stops_verifying(svid: tuple[JwtVerifier, SigningIssuer]) -> None:
    v, issuer = svid
    token = issuer.mint(kid="rs-1", sub=ORDERS_ID, aud=AUD)
    assert v.verify(token, AUD)
    assert v.verify(token, AUD).cached
    v.set_keys("spire", {"example.org": KeySet.from_jwks(issuer.jwks(kids=["es-1"]))})
    with pytest.raises(UnknownKey):
        v.verify(token, AUD)
    # The other key's tokens are unaffected.
    assert v.verify(issuer.mint(kid="es-1", sub=ORDERS_ID, aud=AUD), AUD)


def test_a_refetched_set_with_the_same_key_keeps_the_cache(
    svid: tuple[JwtVerifier, SigningIssuer],
) -> None:
    v, issuer = svid
    token = issuer.mint(sub=ORDERS_ID, aud=AUD)
    assert not v.verify(token, AUD).cached
    # The same keys, parsed again (a periodic fetch): a new set object, the key still in it.
    v.set_keys("spire", {"example.org": KeySet.from_jwks(issuer.jwks())})
    assert v.verify(token, AUD).cached
    assert v.verify(token, AUD).cached


def test_alg_none_is_never_accepted(svid: tuple[JwtVerifier, SigningIssuer]) -> None:
    v, issuer = svid
    refused(v, issuer.unsigned(sub=ORDERS_ID, aud=AUD), "bad_algorithm")


def test_hs256_signed_with_the_public_key_is_refused(
    svid: tuple[JwtVerifier, SigningIssuer],
) -> None:
    v, issuer = svid
    refused(v, issuer.hmac_with_public_key(sub=ORDERS_ID, aud=AUD), "bad_algorithm")
    refused(v, issuer.hmac_with_public_key(kid="es-1", sub=ORDERS_ID, aud=AUD), "bad_algorithm")


def test_an_alg_that_does_not_fit_the_key_is_refused(
    svid: tuple[JwtVerifier, SigningIssuer],
) -> None:
    v, issuer = svid
    rsa_key, _ = issuer.keys["rs-1"]
    # RS256-signed, claiming to be by the EC key es-1.
    token = pyjwt.encode(
        issuer.claims(sub=ORDERS_ID, aud=AUD), rsa_key, algorithm="RS256", headers={"kid": "es-1"}
    )
    refused(v, token, "bad_algorithm")


def test_tampered_payload(svid: tuple[JwtVerifier, SigningIssuer]) -> None:
    v, issuer = svid
    token = issuer.mint(sub=ORDERS_ID, aud=AUD)
    admin = "spiffe://example.org/ns/prod/sa/admin"
    refused(v, issuer.tampered(token, sub=admin), "bad_signature")
    refused(v, issuer.tampered(token, exp=int(time.time()) + 86400), "bad_signature")


def test_a_token_for_another_trust_domain(svid: tuple[JwtVerifier, SigningIssuer]) -> None:
    v, issuer = svid
    # Signed with a key of example.org's bundle, claiming an ID of evil.org.
    error = refused(
        v, issuer.mint(sub="spiffe://evil.org/ns/prod/sa/orders", aud=AUD), "unknown_issuer"
    )
    assert "evil.org" in str(error)


def test_the_trust_domain_must_be_the_bundles_own(
    tmp_path: Path, signing_issuer: SigningIssuer
) -> None:
    v = verifier(
        tmp_path,
        [{"name": "spire", "jwks": str(signing_issuer.jwks_path), "issuer": "https://spire"}],
    )
    v.set_keys("spire", {"example.org": KeySet.from_jwks(signing_issuer.jwks())})
    token = signing_issuer.mint(iss="https://spire", sub="spiffe://evil.org/x", aud=AUD)
    refused(v, token, "bad_subject")


@pytest.mark.parametrize("sub", ["orders", "https://example.org/x", 42, None])
def test_a_jwt_svid_sub_must_be_a_spiffe_id(
    svid: tuple[JwtVerifier, SigningIssuer], sub: Any
) -> None:
    v, issuer = svid
    # Without an iss, only a SPIFFE ID sub can select an issuer.
    refused(v, issuer.mint(sub=sub, aud=AUD), "unknown_issuer")


def test_a_jwt_svid_sub_must_name_a_workload(svid: tuple[JwtVerifier, SigningIssuer]) -> None:
    v, issuer = svid
    refused(v, issuer.mint(sub="spiffe://example.org", aud=AUD), "bad_subject")


@pytest.mark.parametrize(
    "token",
    ["", "abc", "a.b.c", "e30.e30.", "eyJhbGciOiJFUzI1NiJ9.bm90IGpzb24.c2ln", "x" * 20000],
)
def test_garbage_is_malformed(svid: tuple[JwtVerifier, SigningIssuer], token: str) -> None:
    v, _ = svid
    with pytest.raises(TokenError) as info:
        v.verify(token, AUD)
    assert info.value.outcome in ("malformed", "bad_algorithm")


def test_a_token_without_kid_needs_a_single_key_set(
    tmp_path: Path, signing_issuer: SigningIssuer
) -> None:
    v = verifier(tmp_path, [{"name": "spire", "jwks": str(signing_issuer.jwks_path)}])
    v.set_keys("spire", {"example.org": KeySet.from_jwks(signing_issuer.jwks())})
    token = signing_issuer.mint(kid=None, sub=ORDERS_ID, aud=AUD)
    with pytest.raises(UnknownKey):
        v.verify(token, AUD)
    v.set_keys("spire", {"example.org": KeySet.from_jwks(signing_issuer.jwks(kids=["es-1"]))})
    assert v.verify(token, AUD)


# --------------------------------------------------------------------------- OIDC tokens


@pytest.fixture
def oidc(tmp_path: Path, signing_issuers: Any) -> tuple[JwtVerifier, SigningIssuer, SigningIssuer]:
    k8s = signing_issuers("k8s", issuer=K8S_ISS)
    gh = signing_issuers("gh", issuer=GH_ISS)
    v = verifier(
        tmp_path,
        [
            {
                "name": "k8s",
                "issuer": K8S_ISS,
                "jwks": str(k8s.jwks_path),
                "spiffe_id": K8S_TEMPLATE,
            },
            {
                "name": "github",
                "issuer": GH_ISS,
                "jwks": str(gh.jwks_path),
                "spiffe_id": GH_TEMPLATE,
            },
        ],
    )
    v.set_keys("k8s", {"": KeySet.from_jwks(k8s.jwks())})
    v.set_keys("github", {"": KeySet.from_jwks(gh.jwks())})
    return v, k8s, gh


def k8s_claims(namespace: str = "prod", name: str = "orders") -> dict[str, Any]:
    return {
        "sub": f"system:serviceaccount:{namespace}:{name}",
        "kubernetes.io": {
            "namespace": namespace,
            "serviceaccount": {"name": name, "uid": "5b7e8c2a"},
            "pod": {"name": "orders-7d9f", "uid": "1f0c"},
        },
    }


def test_kubernetes_service_account_token(oidc: Any) -> None:
    v, k8s, _ = oidc
    identity = v.verify(k8s.mint(aud=AUD, **k8s_claims()), AUD).identity
    assert identity.spiffe_id == ORDERS_ID
    assert identity.method == "oidc" and identity.issuer == "k8s"
    assert dict(identity.claims) == {
        "kubernetes.io.namespace": "prod",
        "kubernetes.io.serviceaccount.name": "orders",
    }


def test_github_actions_token(oidc: Any) -> None:
    v, _, gh = oidc
    token = gh.mint(
        aud=AUD, sub="repo:acme/shop:ref:refs/heads/main", repository="acme/shop",
        ref="refs/heads/main", workflow="deploy",
    )  # fmt: skip
    identity = v.verify(token, AUD).identity
    assert identity.spiffe_id == "spiffe://ci.example.org/gh/acme/shop/refs/heads/main"
    assert dict(identity.claims) == {"repository": "acme/shop", "ref": "refs/heads/main"}


def test_wrong_issuer(oidc: Any) -> None:
    v, k8s, _ = oidc
    refused(v, k8s.mint(aud=AUD, iss="https://evil.example", **k8s_claims()), "unknown_issuer")
    # GitHub's iss, signed with the k8s issuer's key: GitHub's keys do not verify it.
    forged = k8s.mint(aud=AUD, iss=GH_ISS, repository="acme/shop", ref="refs/heads/main")
    with pytest.raises(TokenError) as info:
        v.verify(forged, AUD)
    # (both test issuers name their keys es-1 and rs-1: github's es-1 is tried, and fails)
    assert info.value.outcome == "bad_signature" and info.value.issuer == "github"


def test_missing_iss(oidc: Any) -> None:
    v, k8s, _ = oidc
    claims = k8s_claims()
    refused(v, k8s.mint(aud=AUD, iss=None, **claims), "unknown_issuer")


@pytest.mark.parametrize(
    ("namespace", "name"),
    [("prod", "../admin"), ("prod", ""), ("pr od", "orders"), ("prod", "a/../../b"), ("ü", "x")],
)
def test_claims_that_do_not_make_a_spiffe_id(oidc: Any, namespace: str, name: str) -> None:
    v, k8s, _ = oidc
    refused(v, k8s.mint(aud=AUD, **k8s_claims(namespace, name)), "bad_claims")


def test_missing_or_non_string_claim(oidc: Any) -> None:
    v, k8s, _ = oidc
    claims = k8s_claims()
    del claims["kubernetes.io"]["namespace"]
    refused(v, k8s.mint(aud=AUD, **claims), "bad_claims")
    claims = k8s_claims()
    claims["kubernetes.io"]["namespace"] = ["prod", "dev"]  # one token, one identity
    refused(v, k8s.mint(aud=AUD, **claims), "bad_claims")


def test_a_claim_path_read_two_ways_is_refused() -> None:
    template = parse_template_for_test("spiffe://example.org/x/{a.b}")
    with pytest.raises(TokenError):
        map_claims(template, {"a.b": "one", "a": {"b": "two"}}, "i")
    assert map_claims(template, {"a": {"b": "two"}}, "i")[0] == "spiffe://example.org/x/two"
    assert map_claims(template, {"a.b": "one"}, "i")[0] == "spiffe://example.org/x/one"


def parse_template_for_test(text: str) -> Any:
    from broker.config.jwt import parse_template

    return parse_template(text, "t")


# --------------------------------------------------------------------------- key sets


def test_spiffe_bundle_keeps_only_jwt_authorities(signing_issuers: Any) -> None:
    issuer = signing_issuers("spiffe", spiffe=True)
    doc = issuer.jwks()
    doc["keys"].append({"use": "x509-svid", "kty": "EC", "crv": "P-256", "x5c": ["..."]})
    doc["spiffe_refresh_hint"] = 60
    keys = KeySet.from_jwks(json.dumps(doc).encode())
    assert keys.kids == ["es-1", "rs-1"]
    assert keys.refresh_hint == 60


@pytest.mark.parametrize(
    ("jwk", "why"),
    [
        ({"kty": "oct", "k": "c2VjcmV0", "kid": "h"}, "asymmetric"),
        ({"kty": "EC", "crv": "P-256", "kid": "x", "x": "AA", "y": "AA"}, "unusable"),
        ({"kty": "RSA", "kid": "r", "n": "AQAB", "e": "AQAB"}, "RSA"),
    ],
)
def test_unusable_keys(jwk: dict[str, Any], why: str) -> None:
    with pytest.raises(KeySetError, match=why):
        KeySet.from_jwks({"keys": [jwk]})


def test_weak_rsa_and_mismatched_alg() -> None:
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(KeySetError, match="1024 bits"):
        KeySet.from_jwks({"keys": [public_jwk(weak, "w")]})
    strong = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(KeySetError, match=r"unusable|does not fit"):
        KeySet.from_jwks({"keys": [public_jwk(strong, "s", alg="ES256")]})
    with pytest.raises(KeySetError, match="not an asymmetric"):
        KeySet.from_jwks({"keys": [public_jwk(strong, "s", alg="HS256")]})


def test_duplicate_kids_and_not_a_jwks(signing_issuer: SigningIssuer) -> None:
    doc = signing_issuer.jwks()
    doc["keys"].append(doc["keys"][0])
    with pytest.raises(KeySetError, match="two keys"):
        KeySet.from_jwks(doc)
    for bad in (b"nope", b"[]", b'{"keys": 1}', b'{"keys": [1]}'):
        with pytest.raises(KeySetError):
            KeySet.from_jwks(bad)


def test_encryption_keys_are_skipped(signing_issuer: SigningIssuer) -> None:
    doc = signing_issuer.jwks()
    doc["keys"][0]["use"] = "enc"
    assert KeySet.from_jwks(doc).kids == ["rs-1"]
