"""The SPIRE fixture itself: what other tests rely on it for (SVIDs by uid, a one-minute
broker SVID, JWT-SVIDs, federated bundles), checked through py-spiffe and the agent's CLI."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import jwt
from cryptography import x509
from spiffe import TrustDomain, WorkloadApiClient

from tests.pki import Pki
from tests.spire import BROKER_ID, BROKER_SVID_TTL, CLIENT_ID, Spire


def test_the_broker_gets_a_short_lived_svid_over_the_workload_api(spire: Spire) -> None:
    with WorkloadApiClient(spire.endpoint, default_timeout=10) as client:
        context = client.fetch_x509_context()
    svid = context.default_svid
    assert str(svid.spiffe_id) == BROKER_ID
    leaf = svid.leaf
    # SPIRE backdates notBefore by 10 s; the life ahead is the TTL.
    lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert timedelta(seconds=BROKER_SVID_TTL) <= lifetime <= timedelta(seconds=BROKER_SVID_TTL + 15)
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    bundle = context.x509_bundle_set.get_bundle_for_trust_domain(svid.spiffe_id.trust_domain)
    assert bundle is not None
    assert x509.load_pem_x509_certificates(spire.bundle_pem())[0] in bundle.x509_authorities


def test_a_client_svid_and_jwt_svid_for_another_uid(spire: Spire, tmp_path: Path) -> None:
    svid = spire.fetch_x509(tmp_path)
    assert svid.spiffe_id == CLIENT_ID
    assert svid.key.stat().st_mode & 0o777 == 0o600
    leaf = x509.load_pem_x509_certificate(svid.cert.read_bytes())
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc > timedelta(minutes=30)

    token = spire.fetch_jwt("orders-api")
    with WorkloadApiClient(spire.endpoint, default_timeout=10) as client:
        bundles = client.fetch_jwt_bundles()
    header = jwt.get_unverified_header(token)
    bundle = bundles.get_bundle_for_trust_domain(TrustDomain("example.org"))
    assert bundle is not None
    key = bundle.get_jwt_authority(header["kid"])
    claims = jwt.decode(token, key=key, algorithms=[header["alg"]], audience="orders-api")
    assert claims["sub"] == CLIENT_ID


def test_federated_bundles_reach_workloads_that_federate(spire: Spire, tmp_path: Path) -> None:
    partner = Pki(tmp_path / "partner", "partner.org")
    spire.set_federated_bundle("partner.org", partner.bundle.read_bytes())
    entry = spire.register(
        "spiffe://example.org/ns/prod/sa/federated", uid=1, federates_with=["partner.org"]
    )
    try:
        spire.wait_for_svid("spiffe://example.org/ns/prod/sa/federated", uid=1)
        out = spire.agent_cli("api", "fetch", "x509", uid=1)
        assert "spiffe://partner.org" in out
    finally:
        spire.unregister(entry)
