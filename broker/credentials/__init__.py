"""Credentials: what a provider returns, and the source interface adapters use.

An adapter never talks to a vault. It asks its service's `CredentialSource` for a credential
for one proven identity, holds it while a request or session uses it, and lets go:

    async with ctx.credentials.use(identity) as credential:
        token = credential.fields["token"]

The source decides caching, sharing one fetch between concurrent callers, per-identity leases,
renewal and revocation. Secret values live only in `Credential.fields`, which never appears in
a repr, a log line or the audit trail: use `credential.ref` for those.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any

from broker.identity import WorkloadIdentity


@dataclass(frozen=True, slots=True)
class CredentialRef:
    """Where a credential came from: safe to log and audit (never a value)."""

    provider: str
    location: str
    version: int | None = None
    lease_id: str | None = None

    def to_audit(self) -> dict[str, Any]:
        return {
            k: v
            for k, v in (
                ("provider", self.provider),
                ("path", self.location),
                ("version", self.version),
                ("lease_id", self.lease_id),
            )
            if v is not None
        }


@dataclass(frozen=True, slots=True)
class Credential:
    """One secret with all its fields (username *and* password of one lease, say)."""

    fields: Mapping[str, str] = field(repr=False)
    ref: CredentialRef
    # Seconds the vault said the credential (or its lease) is valid for; None if unknown.
    lease_duration: float | None = None
    renewable: bool = False

    def __repr__(self) -> str:
        return f"Credential(ref={self.ref!r}, fields=<{len(self.fields)} redacted>)"

    __str__ = __repr__


class CredentialSource(abc.ABC):
    """A service's supply of credentials. One per service; shared by all its connections."""

    @abc.abstractmethod
    def use(self, identity: WorkloadIdentity) -> AbstractAsyncContextManager[Credential]:
        """Hold a credential for `identity` while the context is open.

        Raises `broker.errors.CredentialUnavailable` (fail closed) when none can be had.
        """

    @abc.abstractmethod
    async def prime(self) -> None:
        """Fetch once at start-up so readiness means "credentials reachable"; may raise."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop background work and revoke every lease this source holds."""

    def describe(self) -> str:
        """A log-safe one-line description of where credentials come from."""
        return type(self).__name__

    async def revoke_identity(self, spiffe_id: str) -> list[str]:
        """Revoke every lease this source holds for one identity (offboarding); returns
        their lease ids. Sources without per-identity leases hold none."""
        return []

    def on_lease_end(self, callback: Callable[[str], None]) -> None:
        """Call `callback(lease_id)` when a lease this source handed out ends (revoked,
        expired, or retired: no longer handed to new users), so whatever was logged in with
        it (a session pool's connections) goes too. A source without leases never calls it."""
        return None

    def leases_of(self) -> dict[str, list[str]]:
        """Lease ids held per identity right now (for the inventory)."""
        return {}

    async def invalidate(self, identity: WorkloadIdentity, credential: Credential) -> None:
        """The upstream refused `credential` (handed out for `identity`): never hand it out
        again. A source that leases credentials revokes the lease; the default keeps what it
        has (a static secret is the same on the next fetch)."""
        return None

    async def refresh(self, identity: WorkloadIdentity, credential: Credential) -> bool:
        """The upstream refused `credential` as no longer valid (an HTTP 401): drop it so
        the next `use()` fetches a new one, and return True, when this source can (an OAuth2
        access token); the caller may then retry a request that can be sent again. The
        default can get nothing newer and returns False."""
        return False

    def status(self) -> dict[str, Any]:
        """What /readyz shows of this source right now: whether a credential is held, for how
        long it stays valid, the last error. Never a value; no IO."""
        return {}
