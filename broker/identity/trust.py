"""The broker's own identity material as values: its X.509-SVID and the trust bundles.

`Svid` (certificate chain and key) and `Bundle` (one trust domain's X.509 authorities) are
immutable; `Snapshot` is everything at one moment. Where they come from (files, the Workload
API) and how they change is `broker.identity.material`'s business; this module is pure.

Several trust domains (federation): OpenSSL verifies a client's chain against the union of
every configured bundle, since the server cannot know the client's trust domain before its
certificate arrives and Python exposes no verify callback to pick a store per chain. That
union alone would let one domain's CA vouch for another domain's IDs, so `check_anchor`
applies the SPIFFE rule afterwards: the trust anchor OpenSSL's verified chain ends at must be
one of the authorities of the bundle of the ID's own trust domain. See
`broker.identity.tls.verified_anchor` for how the anchor is read.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
    PublicKeyTypes,
)
from spiffe.errors import PySpiffeError
from spiffe.svid.x509_svid import _extract_spiffe_id

from .workload import IdentityError, WorkloadIdentity

# The private keys a serving certificate may have (what OpenSSL serves and SPIRE issues).
SIGNING_KEYS = (
    ec.EllipticCurvePrivateKey,
    rsa.RSAPrivateKey,
    ed25519.Ed25519PrivateKey,
    ed448.Ed448PrivateKey,
)

# Where a piece of material comes from, in metrics labels.
FILE = "file"
WORKLOAD_API = "workload_api"


@dataclass(frozen=True, slots=True, eq=False)
class Svid:
    """The broker's certificate chain (leaf first) and private key.

    `spiffe_id` is None when the configured certificate is not an X.509-SVID (a serving
    certificate from another CA is allowed in ``tls.cert``). `source` names where it came
    from (``file:/etc/sidekey/broker.pem``, ``workload_api:unix:///run/spire/agent.sock``).
    """

    chain: tuple[x509.Certificate, ...]
    key: CertificateIssuerPrivateKeyTypes
    source: str
    spiffe_id: str | None = None

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]

    @property
    def expires(self) -> datetime:
        return self.leaf.not_valid_after_utc

    @property
    def serial(self) -> str:
        return format(self.leaf.serial_number, "x")

    def chain_pem(self) -> bytes:
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.chain)

    def key_pem(self) -> bytes:
        """The private key as unencrypted PKCS#8 PEM: only ever handed to OpenSSL."""
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def same_as(self, other: Svid | None) -> bool:
        return other is not None and self.chain == other.chain

    def describe(self) -> dict[str, Any]:
        return {
            "spiffe_id": self.spiffe_id,
            "source": self.source,
            "serial": self.serial,
            "expires": self.expires.isoformat(),
        }


@dataclass(frozen=True, slots=True, eq=False)
class Bundle:
    """One trust domain's X.509 authorities."""

    trust_domain: str
    authorities: tuple[x509.Certificate, ...]
    source: str
    # The authorities' DER, for the anchor check (a set lookup per federated handshake).
    ders: frozenset[bytes] = field(init=False)

    def __post_init__(self) -> None:
        ders = frozenset(c.public_bytes(serialization.Encoding.DER) for c in self.authorities)
        object.__setattr__(self, "ders", ders)

    def pem(self) -> bytes:
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.authorities)

    def same_as(self, other: Bundle | None) -> bool:
        return other is not None and self.ders == other.ders

    def describe(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "authorities": len(self.authorities),
            "expires": min(c.not_valid_after_utc for c in self.authorities).isoformat()
            if self.authorities
            else None,
        }


# JWT authorities of one trust domain: key ID -> public key.
JwtAuthorities = Mapping[str, PublicKeyTypes]


@dataclass(frozen=True, slots=True)
class Snapshot:
    """All of the broker's identity material at one moment."""

    svid: Svid | None = None
    # Trust domain -> its X.509 bundle (the broker's own domain and every federated one).
    bundles: Mapping[str, Bundle] = field(default_factory=lambda: MappingProxyType({}))
    # Trust domain -> its JWT authorities (from the Workload API only).
    jwt_bundles: Mapping[str, JwtAuthorities] = field(default_factory=lambda: MappingProxyType({}))


def spiffe_id_of(leaf: x509.Certificate) -> str | None:
    """The SPIFFE ID of a certificate with exactly one spiffe:// URI SAN, else None."""
    try:
        return str(_extract_spiffe_id(leaf))
    except PySpiffeError:
        return None


def check_anchor(
    identity: WorkloadIdentity, anchor_der: bytes | None, bundles: Mapping[str, Bundle]
) -> None:
    """Refuse `identity` unless its chain's trust anchor is in its own trust domain's bundle.

    `anchor_der` is the last certificate of the chain OpenSSL verified (against the union of
    `bundles`). Raises `IdentityError` with a message that says which rule failed.
    """
    # The ID was parsed and checked already: its trust domain is the text up to the path
    # (WorkloadIdentity.trust_domain parses it again: 15 us).
    domain = identity.spiffe_id[len("spiffe://") :].split("/", 1)[0]
    bundle = bundles.get(domain)
    if bundle is None:
        raise IdentityError(
            f"SPIFFE ID {identity.spiffe_id} is of trust domain {domain!r}, which has no bundle "
            f"here (bundles: {', '.join(sorted(bundles)) or 'none'})"
        )
    if anchor_der is None or anchor_der not in bundle.ders:
        vouching = sorted(td for td, b in bundles.items() if anchor_der in b.ders)
        by = f" ({', '.join(vouching)}'s)" if vouching else ""
        raise IdentityError(
            f"the certificate of {identity.spiffe_id} chains to a CA outside the bundle of "
            f"{domain!r}{by}: an X.509-SVID must chain to its own trust domain's bundle"
        )
