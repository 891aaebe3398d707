"""A proven workload identity: a SPIFFE ID and how it was proven. Pure and synchronous."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from spiffe import SpiffeId

from broker.errors import ClientError

Method = Literal["x509-svid", "jwt-svid", "oidc", "local"]


class IdentityError(ClientError):
    """The peer presented no identity, or one that does not meet the SPIFFE rules."""


class MissingCertificate(IdentityError):
    """A TLS caller presented no client certificate where one is required: each protocol
    adds how its clients present one (libpq's sslcert/sslkey, curl's --cert/--key)."""


@dataclass(frozen=True, slots=True)
class WorkloadIdentity:
    """A proven SPIFFE ID and how it was proven."""

    spiffe_id: str
    method: Method
    # When the proof stops being valid (certificate notAfter, token exp); None for local.
    expires: datetime | None = None
    # Certificate serial (hex) or token id (jti, else a SHA-256 prefix), for the audit trail.
    proof_id: str | None = None
    # Tokens: the configured issuer's name, and the claims the SPIFFE ID was made of (sub of
    # a JWT-SVID, the template's claims of an OIDC token); never the token itself.
    issuer: str | None = None
    claims: tuple[tuple[str, str], ...] = ()
    # Every verified claim of a token (policy `claims:` conditions match them; never audited
    # whole: `claims` is what the audit trail shows); None for an X.509-SVID or local caller.
    token_claims: Mapping[str, Any] | None = field(default=None, compare=False)

    @property
    def trust_domain(self) -> str:
        return SpiffeId(self.spiffe_id).trust_domain.name

    def __str__(self) -> str:
        return self.spiffe_id


def local_identity(spiffe_id: str) -> WorkloadIdentity:
    """The configured identity of a `client_auth: local` service (explicit operator opt-in)."""
    return WorkloadIdentity(spiffe_id=spiffe_id, method="local")
