"""Per-identity dynamic database credentials: one Vault lease per (service, SPIFFE ID).

`use(identity)` hands out that identity's lease - username and password from one read of
`<mount>/creds/<role>` - creating it on first use (concurrent first uses share one read) and
reusing it for the identity's later connections while it is valid. Each identity gets its own
database role, so the database's own logs and grants stay attributable to a workload.

Lifecycle, driven by one background task:

- **Renewal.** A lease is renewed once `renew_fraction` of its duration has passed, asking
  for its original duration again.
- **Max TTL.** When a renewal grants less than asked, the lease is close to its max TTL and
  cannot be extended: it is *retired*. New connections of that identity get a fresh lease;
  sessions already holding the retired one keep it until it expires (the database engine then
  drops the role, which ends those sessions). A retired lease nobody holds is revoked at once.
  A lease that is not renewable is retired the same way when its renewal would be due.
- **Idle.** A lease no connection has held for `idle_timeout` seconds is revoked.
- **Vault down.** Existing leases keep being handed out while still valid (renewals are retried);
  an identity without a valid lease fails closed with `CredentialUnavailable`.
- **The broker's token.** The vault revokes a token's leases when that token ends (max TTL,
  revoked from outside), whatever their own TTL. A lease is handed out only while the token
  that created it (`LeaseResponse.generation`) lives `min_remaining` longer; once the broker
  has logged in again, the old token's leases are retired like leases near their max TTL,
  and dropped when it ends.
- **close()** revokes every lease this manager holds.

Lease ids and usernames are safe to log; the password never is.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from broker.config import DEFAULT_LEASE_IDLE_SECONDS
from broker.credentials import Credential, CredentialRef, CredentialSource
from broker.credentials.vault import VaultClient
from broker.errors import CredentialUnavailable
from broker.identity import WorkloadIdentity
from broker.observe.metrics import Metrics

log = logging.getLogger("sidekey.leases")

PROVIDER = "vault-database"
# Renew at two thirds of the lease: leaves a third of it to retry through a vault hiccup.
DEFAULT_RENEW_FRACTION = 2 / 3
# Do not hand out a lease with less than this left: a login would succeed and the session
# would be cut moments later when the engine drops the role.
MIN_REMAINING_SECONDS = 2.0
# After a failed renewal, try again this soon (but never past the lease's expiry).
RENEW_RETRY_SECONDS = 2.0
# The maintenance task re-checks at least this often even with nothing due, so an injected
# clock that jumps (tests) or a missed wake-up never delays a renewal for long.
MAX_MAINTENANCE_SLEEP_SECONDS = 5.0
# A lease can be revoked between its creation and a waiter taking it (idle_timeout 0); a
# waiter retries this many times before giving up.
ACQUIRE_ATTEMPTS = 3
# Vault rounds lease durations to whole seconds; a grant this much shorter than asked is
# the max TTL cutting in, not rounding.
MAX_TTL_TOLERANCE_SECONDS = 1.0


@dataclass(slots=True, eq=False)
class _Lease:
    identity: str
    lease_id: str
    credential: Credential = field(repr=False)
    duration: float  # what was granted at creation; asked for again at each renewal
    expires: float  # clock time the lease (and the database role's login) ends
    renew_at: float
    renewable: bool
    last_used: float
    users: int = 0
    retired: bool = False
    generation: int = 0  # the broker's vault token that created it: the lease ends with it


class LeaseManager(CredentialSource):
    """Per-identity leases from a database secrets engine (see the module docstring)."""

    def __init__(
        self,
        service: str,
        vault: VaultClient,
        mount: str,
        role: str,
        metrics: Metrics,
        *,
        idle_timeout: float = DEFAULT_LEASE_IDLE_SECONDS,
        renew_fraction: float = DEFAULT_RENEW_FRACTION,
        min_remaining: float = MIN_REMAINING_SECONDS,
        renew_retry: float = RENEW_RETRY_SECONDS,
        max_sleep: float = MAX_MAINTENANCE_SLEEP_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0 < renew_fraction < 1:
            raise ValueError("renew_fraction must be in (0, 1)")
        self.service = service
        self.mount = mount
        self.role = role
        self.path = f"{mount}/creds/{role}"
        self.idle_timeout = idle_timeout
        self.renew_fraction = renew_fraction
        self.min_remaining = min_remaining
        self.renew_retry = renew_retry
        self.max_sleep = max_sleep
        self._vault = vault
        self._clock = clock
        self._current: dict[str, _Lease] = {}  # the lease handed to each identity's new users
        self._retired: list[_Lease] = []  # no longer handed out; held until unused or expired
        self._pending: dict[str, asyncio.Task[_Lease]] = {}  # single flight per identity
        self._maintainer: asyncio.Task[None] | None = None
        # Told of every lease that ends (on_lease_end): a session pool closes its
        # connections logged in with it.
        self._end_callbacks: list[Callable[[str], None]] = []
        self._wake = asyncio.Event()
        self._closed = False
        # The last vault error of a create or renewal while it is the latest outcome.
        self._last_error: str | None = None
        self._hits = metrics.cache_hits.labels(service=service)
        self._misses = metrics.cache_misses.labels(service=service)
        self._fetches = metrics.credential_fetches
        self._fetch_seconds = metrics.fetch_seconds.labels(service=service, provider=PROVIDER)
        self._events = {
            event: metrics.leases.labels(service=service, event=event)
            for event in ("created", "renewed", "revoked", "expired")
        }

    def __repr__(self) -> str:
        return f"LeaseManager(service={self.service!r}, path={self.path!r}, leases={self.active})"

    def describe(self) -> str:
        return f"{PROVIDER}:{self.path} (one lease per identity)"

    @property
    def active(self) -> int:
        """Leases held right now (current and retired)."""
        return len(self._current) + len(self._retired)

    async def invalidate(self, identity: WorkloadIdentity, credential: Credential) -> None:
        lease_id = credential.ref.lease_id
        if not lease_id:
            return
        found = [
            lease
            for lease in (*self._current.values(), *self._retired)
            if lease.lease_id == lease_id
        ]
        for lease in found:
            self._drop(lease)
        # Revoked now even if other sessions hold it: the role's password is no longer the
        # broker's, and revoking also ends a session someone opened with it directly.
        await self._revoke_id(lease_id, "rejected by the upstream", identity.spiffe_id)

    def status(self) -> dict[str, Any]:
        now = self._clock()
        current = list(self._current.values())
        valid = [lease for lease in current if self._servable(lease, now)]
        status: dict[str, Any] = {
            "state": "valid" if valid else "none",
            "leases": self.active,
            "identities": len(current),
            "in_use": sum(lease.users for lease in (*current, *self._retired)),
        }
        if valid:
            status["soonest_expiry_seconds"] = round(min(v.expires for v in valid) - now, 1)
        status["error"] = self._last_error
        return status

    def lease_id(self, identity: WorkloadIdentity | str) -> str | None:
        """The lease currently handed to `identity`'s new connections, if any."""
        lease = self._current.get(str(identity))
        return lease.lease_id if lease else None

    @asynccontextmanager
    async def use(self, identity: WorkloadIdentity) -> AsyncIterator[Credential]:
        lease = await self._acquire(identity.spiffe_id)
        try:
            yield lease.credential
        finally:
            lease.users -= 1
            lease.last_used = self._clock()
            if lease.users == 0:
                self._wake.set()  # an idle deadline (or a retired lease's revocation) is new

    async def prime(self) -> None:
        # Leases are per identity, so none is created ahead of a caller; readiness means the
        # vault answers and the token is valid.
        await self._vault.check()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._maintainer is not None:
            self._maintainer.cancel()
            await asyncio.gather(self._maintainer, return_exceptions=True)
            self._maintainer = None
        # Let reads in flight finish rather than cancel them: a cancelled read may still
        # create a lease in the vault that nobody would revoke. Closed, they revoke it.
        await asyncio.gather(*self._pending.values(), return_exceptions=True)
        leases = [*self._current.values(), *self._retired]
        self._current.clear()
        self._retired.clear()
        await asyncio.gather(*(self._revoke(lease, "close") for lease in leases))

    async def revoke_identity(self, spiffe_id: str) -> list[str]:
        pending = self._pending.get(spiffe_id)
        if pending is not None:  # a read in flight would create a lease after this
            await asyncio.gather(pending, return_exceptions=True)
        leases = [
            lease
            for lease in [*self._current.values(), *self._retired]
            if lease.identity == spiffe_id
        ]
        for lease in leases:
            self._drop(lease)
        done = await asyncio.gather(*(self._revoke(lease, "offboarded") for lease in leases))
        return [lease.lease_id for lease, ok in zip(leases, done, strict=True) if ok]

    def on_lease_end(self, callback: Callable[[str], None]) -> None:
        self._end_callbacks.append(callback)

    def _ended(self, lease_id: str) -> None:
        for callback in self._end_callbacks:
            callback(lease_id)

    def leases_of(self) -> dict[str, list[str]]:
        held: dict[str, list[str]] = {}
        for lease in [*self._current.values(), *self._retired]:
            held.setdefault(lease.identity, []).append(lease.lease_id)
        return held

    async def tick(self) -> float:
        """One maintenance pass; returns the clock time of the next thing due.

        The background task calls this; tests may call it directly with an injected clock.
        """
        now = self._clock()
        for lease in [*self._current.values(), *self._retired]:
            token_left = self._vault.token_remaining(lease.generation)
            if now >= lease.expires or token_left <= 0:
                self._drop(lease)
                self._events["expired"].inc()
                log.info(
                    "lease expired%s service=%s identity=%s lease_id=%s users=%d",
                    " with the broker's vault token" if token_left <= 0 else "",
                    self.service, lease.identity, lease.lease_id, lease.users,
                )  # fmt: skip
            elif not lease.retired and not self._token_current(lease):
                self._retire(lease, f"the vault token that created it ends in {token_left:.0f}s")
        to_revoke: list[tuple[_Lease, str]] = []
        to_renew: list[_Lease] = []
        for lease in list(self._current.values()):
            if lease.users == 0 and now - lease.last_used >= self.idle_timeout:
                self._drop(lease)
                to_revoke.append((lease, "idle"))
            elif now >= lease.renew_at:
                if lease.renewable and lease.lease_id:
                    to_renew.append(lease)
                else:
                    self._retire(lease, "not renewable")
        for lease in list(self._retired):
            if lease.users == 0:
                self._drop(lease)
                to_revoke.append((lease, "retired"))
        if to_revoke or to_renew:
            async with asyncio.TaskGroup() as tg:
                for lease, why in to_revoke:
                    tg.create_task(self._revoke(lease, why))
                for lease in to_renew:
                    tg.create_task(self._renew(lease))
        return self._next_due()

    # ------------------------------------------------------------------ acquiring

    async def _acquire(self, identity: str) -> _Lease:
        for _ in range(ACQUIRE_ATTEMPTS):
            if self._closed:
                raise CredentialUnavailable(f"{self.describe()}: source is closed")
            lease = self._current.get(identity)
            if lease is not None and self._servable(lease, self._clock()):
                self._hits.inc()
                return self._hold(lease)
            self._misses.inc()
            task = self._pending.get(identity)
            if task is None:
                task = self._start_create(identity)
            try:
                # shield: one caller giving up must not cancel the read others wait for.
                lease = await asyncio.shield(task)
            except CredentialUnavailable:
                fallback = self._fallback(identity)
                if fallback is None:
                    raise
                log.warning(
                    "new lease unavailable; reusing a retired one until it expires "
                    "service=%s identity=%s lease_id=%s",
                    self.service, identity, fallback.lease_id,
                )  # fmt: skip
                return self._hold(fallback)
            if self._current.get(identity) is lease and self._servable(lease, self._clock()):
                return self._hold(lease)
        raise CredentialUnavailable(
            f"{self.describe()}: lease for {identity} was revoked as soon as it was created"
        )

    def _hold(self, lease: _Lease) -> _Lease:
        lease.users += 1
        lease.last_used = self._clock()
        return lease

    def _servable(self, lease: _Lease, now: float) -> bool:
        return (
            not lease.retired
            and now < lease.expires - self.min_remaining
            and self._token_current(lease)
        )

    def _token_current(self, lease: _Lease) -> bool:
        """The lease was made with the broker's current token, which lives on: once the
        broker logged in again, new connections get leases of the new token."""
        return (
            lease.generation >= self._vault.generation
            and self._vault.token_remaining(lease.generation) > self.min_remaining
        )

    def _fallback(self, identity: str) -> _Lease | None:
        """A lease of `identity` no longer handed out but still valid for a while (retired,
        or made with the broker's previous token), for when the vault is down."""
        now = self._clock()
        current = self._current.get(identity)
        candidates = [
            lease
            for lease in [*self._retired, *([current] if current is not None else [])]
            if lease.identity == identity
            and now < lease.expires - self.min_remaining
            and self._vault.token_remaining(lease.generation) > self.min_remaining
        ]
        return max(candidates, key=lambda lease: lease.expires, default=None)

    def _start_create(self, identity: str) -> asyncio.Task[_Lease]:
        task = asyncio.create_task(self._create(identity), name=f"lease-{self.service}")
        self._pending[identity] = task

        def done(t: asyncio.Task[_Lease]) -> None:
            if self._pending.get(identity) is t:
                del self._pending[identity]
            if not t.cancelled():
                t.exception()  # retrieved: waiters may all have gone

        task.add_done_callback(done)
        return task

    async def _create(self, identity: str) -> _Lease:
        started, t0 = self._clock(), time.perf_counter()
        try:
            response = await self._vault.read(self.path)
        except CredentialUnavailable as exc:
            self._fetched("error", t0)
            self._last_error = str(exc)
            log.warning(
                "cannot create lease service=%s identity=%s error=%s", self.service, identity, exc
            )
            raise
        self._fetched("ok", t0)
        self._last_error = None
        username = response.data.get("username")
        password = response.data.get("password")
        duration = response.lease_duration
        if not isinstance(username, str) or not isinstance(password, str) or not username:
            if response.lease_id:
                await self._revoke_id(response.lease_id, "malformed")
            raise CredentialUnavailable(
                f"vault: {self.path} did not return a username and password; is it a "
                "database secrets engine role?"
            )
        lease = _Lease(
            identity=identity,
            lease_id=response.lease_id,
            credential=Credential(
                fields=MappingProxyType({"username": username, "password": password}),
                ref=CredentialRef(PROVIDER, self.path, lease_id=response.lease_id or None),
                lease_duration=duration if duration > 0 else None,
                renewable=response.renewable,
            ),
            duration=duration,
            # Counted from before the read: the vault's clock started no later than that.
            expires=started + duration if duration > 0 else math.inf,
            renew_at=started + duration * self.renew_fraction if duration > 0 else math.inf,
            renewable=response.renewable,
            last_used=self._clock(),
            generation=response.generation,
        )
        if self._closed:
            await self._revoke(lease, "close")
            raise CredentialUnavailable(f"{self.describe()}: source is closed")
        self._events["created"].inc()
        log.info(
            "lease created service=%s identity=%s lease_id=%s username=%s ttl=%.0fs",
            self.service, identity, lease.lease_id, username, duration,
        )  # fmt: skip
        old = self._current.get(identity)
        if old is not None:
            self._retire(old, "replaced")
        self._current[identity] = lease
        self._ensure_maintainer()
        return lease

    def _fetched(self, outcome: str, t0: float) -> None:
        self._fetch_seconds.observe(time.perf_counter() - t0)
        self._fetches.labels(service=self.service, provider=PROVIDER, outcome=outcome).inc()

    # ------------------------------------------------------------------ lifecycle

    def _retire(self, lease: _Lease, why: str) -> None:
        if self._current.get(lease.identity) is lease:
            del self._current[lease.identity]
        self._ended(lease.lease_id)
        if not lease.retired:
            lease.retired = True
            self._retired.append(lease)
            log.info(
                "lease retired (new connections get a fresh one) service=%s identity=%s "
                "lease_id=%s reason=%s",
                self.service, lease.identity, lease.lease_id, why,
            )  # fmt: skip
        self._wake.set()

    def _drop(self, lease: _Lease) -> None:
        self._ended(lease.lease_id)
        if self._current.get(lease.identity) is lease:
            del self._current[lease.identity]
        if lease.retired and lease in self._retired:
            self._retired.remove(lease)

    async def _renew(self, lease: _Lease) -> None:
        started = self._clock()
        try:
            response = await self._vault.renew(lease.lease_id, lease.duration)
        except CredentialUnavailable as exc:
            self._last_error = str(exc)
            lease.renew_at = min(started + self.renew_retry, lease.expires)
            log.warning(
                "lease renewal failed; still valid for %.0fs service=%s identity=%s "
                "lease_id=%s error=%s",
                max(0.0, lease.expires - started), self.service, lease.identity,
                lease.lease_id, exc,
            )  # fmt: skip
            return
        if lease.retired or self._current.get(lease.identity) is not lease:
            return  # revoked or replaced while the renewal was in flight
        granted = response.lease_duration
        lease.expires = started + granted
        self._events["renewed"].inc()
        self._last_error = None
        if granted < lease.duration - MAX_TTL_TOLERANCE_SECONDS:
            self._retire(lease, f"near max TTL ({granted:.0f}s left)")
        else:
            lease.renew_at = started + granted * self.renew_fraction
            log.debug(
                "lease renewed service=%s lease_id=%s ttl=%.0fs",
                self.service, lease.lease_id, granted,
            )  # fmt: skip

    async def _revoke(self, lease: _Lease, why: str) -> bool:
        if lease.lease_id:
            return await self._revoke_id(lease.lease_id, why, lease.identity)
        return False

    async def _revoke_id(self, lease_id: str, why: str, identity: str = "") -> bool:
        self._ended(lease_id)  # its sessions' pooled connections go before its role does
        try:
            await self._vault.revoke(lease_id)
        except CredentialUnavailable as exc:
            # The vault revokes it at the end of its TTL anyway.
            log.warning(
                "lease revocation failed service=%s lease_id=%s reason=%s error=%s",
                self.service, lease_id, why, exc,
            )  # fmt: skip
            return False
        self._events["revoked"].inc()
        log.info(
            "lease revoked service=%s identity=%s lease_id=%s reason=%s",
            self.service, identity, lease_id, why,
        )  # fmt: skip
        return True

    def _next_due(self) -> float:
        due = math.inf
        now = self._clock()
        for lease in self._current.values():
            due = min(due, lease.renew_at, lease.expires, self._token_due(lease, now))
            if lease.users == 0:
                due = min(due, lease.last_used + self.idle_timeout)
        for lease in self._retired:
            due = min(due, lease.expires, self._token_due(lease, now))
        return due

    def _token_due(self, lease: _Lease, now: float) -> float:
        """When the end of the lease's token calls for a retire (current) or drop (retired)."""
        left = self._vault.token_remaining(lease.generation)
        if math.isinf(left):
            return math.inf
        return now + max(0.0, left - (0 if lease.retired else self.min_remaining))

    def _ensure_maintainer(self) -> None:
        if self._maintainer is None or self._maintainer.done():
            self._maintainer = asyncio.create_task(self._maintain(), name=f"leases-{self.service}")
        self._wake.set()

    async def _maintain(self) -> None:
        while not self._closed:
            self._wake.clear()
            try:
                due = await self.tick()
            except Exception:
                # A bug must not stop renewals for every identity: log it and carry on.
                log.exception("lease maintenance failed service=%s", self.service)
                due = self._clock() + self.renew_retry
            delay = min(max(0.0, due - self._clock()), self.max_sleep)
            try:
                async with asyncio.timeout(delay):
                    await self._wake.wait()
            except TimeoutError:
                pass
