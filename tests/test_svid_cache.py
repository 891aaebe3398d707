"""The SVID → identity cache: same answers as `identity_from_der`, bounded, expiry-aware."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from broker.identity import IdentityError, identity_from_der
from broker.identity.svid_cache import SvidCache
from tests.pki import DEFAULT_CLIENT_ID, TRUST_DOMAIN, Pki


def _der(pem: Path) -> bytes:
    return x509.load_pem_x509_certificate(pem.read_bytes()).public_bytes(Encoding.DER)


def test_hit_returns_the_same_identity_as_a_fresh_check(pki: Pki) -> None:
    der = _der(pki.client().cert)
    cache = SvidCache()
    first = cache.identity(der, TRUST_DOMAIN)
    assert first == identity_from_der(der, TRUST_DOMAIN)
    assert first.spiffe_id == DEFAULT_CLIENT_ID
    assert cache.identity(bytes(der), TRUST_DOMAIN) is first
    assert (cache.hits, cache.misses) == (1, 1)


def test_failures_are_not_cached_and_still_raise(pki: Pki) -> None:
    cache = SvidCache()
    der = _der(pki.foreign_domain_client().cert)
    for _ in range(2):
        with pytest.raises(IdentityError, match="outside the trust domain"):
            cache.identity(der, TRUST_DOMAIN)
    with pytest.raises(IdentityError, match="no client certificate"):
        cache.identity(None, TRUST_DOMAIN)
    assert len(cache) == 0


def test_the_trust_domain_is_part_of_the_key(pki: Pki) -> None:
    der = _der(pki.client().cert)
    cache = SvidCache()
    cache.identity(der, TRUST_DOMAIN)
    with pytest.raises(IdentityError):
        cache.identity(der, "other.org")


def test_expired_entries_are_not_returned(pki: Pki) -> None:
    der = _der(pki.client().cert)
    cache = SvidCache()
    identity = cache.identity(der, TRUST_DOMAIN)
    # Pretend the certificate expired while cached: the entry is checked again.
    stale = type(identity)(
        identity.spiffe_id,
        identity.method,
        datetime.now(UTC) - timedelta(seconds=1),
        identity.proof_id,
    )
    cache._entries[(der, TRUST_DOMAIN)] = stale
    assert cache.identity(der, TRUST_DOMAIN) == identity
    assert cache.misses == 2


def test_cache_is_bounded(pki: Pki) -> None:
    cache = SvidCache(max_entries=2)
    ders = [_der(pki.client(f"spiffe://{TRUST_DOMAIN}/w/{i}").cert) for i in range(3)]
    for der in ders:
        cache.identity(der, TRUST_DOMAIN)
    assert len(cache) == 2
    assert (ders[0], TRUST_DOMAIN) not in cache._entries
