"""X.509-SVIDs: the SPIFFE rules applied to a TLS client certificate. Pure and synchronous.

The TLS layer (OpenSSL, with CERT_REQUIRED and the trust bundle) has already verified the
chain before anything here runs; this module applies the SPIFFE X.509-SVID rules to the
verified leaf and maps it to a `WorkloadIdentity`. An unproven caller is never mapped to an
identity: every failure raises `IdentityError`, whose message is safe to put in a log line or
a protocol error reply (the peer's text in it has its control characters escaped).
"""

from __future__ import annotations

from cryptography import x509
from spiffe.errors import PySpiffeError

# The SVID rules (one URI SAN, a SPIFFE ID with a path, leaf not a CA, digitalSignature and no
# keyCertSign/cRLSign key usage) are spiffe's own; we call them instead of writing them again.
# They are module-private there, hence the pinned minor version in pyproject.toml.
from spiffe.svid.x509_svid import (
    _extract_spiffe_id,
    _validate_leaf_certificate,
    _validate_leaf_spiffe_id,
)

from broker.spiffeid import SpiffeIdError, parse_spiffe_id, printable

from .workload import IdentityError, MissingCertificate, WorkloadIdentity

# The trust domains an identity may come from: one name, or a set of them (federation).
TrustDomains = str | frozenset[str]


def identity_from_der(leaf_der: bytes | None, trust_domain: TrustDomains) -> WorkloadIdentity:
    """Map a chain-verified TLS client certificate (DER) to an identity, or raise."""
    if not leaf_der:
        raise MissingCertificate(
            "no client certificate: this service requires the caller's X.509-SVID as its TLS "
            "client certificate"
        )
    try:
        leaf = x509.load_der_x509_certificate(leaf_der)
    except ValueError:
        raise IdentityError("client certificate is not valid DER") from None
    return identity_from_certificate(leaf, trust_domain)


def identity_from_certificate(
    leaf: x509.Certificate, trust_domain: TrustDomains
) -> WorkloadIdentity:
    """Apply the X.509-SVID rules to a leaf certificate whose chain is already verified.

    With several trust domains, which of them vouches for the chain is checked apart
    (`broker.identity.trust.check_anchor`): this checks only that the ID is of one of them.
    """
    try:
        # py-spiffe lower-cases the trust domain it parses (TD.TEST -> td.test); the spec and
        # SPIRE allow only the canonical form, so the URI as written is checked first.
        uris = _uri_sans(leaf)
        if len(uris) == 1:
            parse_spiffe_id(uris[0])
        spiffe_id = _extract_spiffe_id(leaf)
        _validate_leaf_spiffe_id(spiffe_id)
        _validate_leaf_certificate(leaf)
    except SpiffeIdError as exc:
        raise IdentityError(f"not a valid X.509-SVID: {exc}") from None
    except PySpiffeError as exc:
        raise IdentityError(f"not a valid X.509-SVID: {printable(str(exc))}") from None
    domain = spiffe_id.trust_domain.name
    if isinstance(trust_domain, str):
        if domain != trust_domain:
            raise IdentityError(
                f"SPIFFE ID {spiffe_id} is outside the trust domain {trust_domain!r}"
            )
    elif domain not in trust_domain:
        known = ", ".join(repr(td) for td in sorted(trust_domain))
        raise IdentityError(
            f"SPIFFE ID {spiffe_id} is outside the trust domains {known}: no bundle is "
            f"configured for {domain!r}"
        )
    return WorkloadIdentity(
        spiffe_id=str(spiffe_id),
        method="x509-svid",
        expires=leaf.not_valid_after_utc,
        proof_id=format(leaf.serial_number, "x"),
    )


def _uri_sans(leaf: x509.Certificate) -> list[str]:
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except (x509.ExtensionNotFound, ValueError):
        return []
    return list(san.value.get_values_for_type(x509.UniformResourceIdentifier))
