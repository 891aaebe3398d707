"""Upstream session reuse (`pool: {mode: session, size: N, idle: 60s}`): logged-in upstream
connections kept per identity and handed to that identity's next client.

Applications that connect per request (PHP, serverless, CLI jobs) pay a process fork in
PostgreSQL and an upstream TLS + SCRAM handshake per connection. With a pool, a client's
session ends but its upstream connection stays logged in, is reset, and waits for the next
client of the same key:

    key = (SPIFFE ID, what the adapter says must match: database, client parameters, ...)

The rules, each enforced here or in the life cycle (broker.session.lifecycle):

- never across identities: the key starts with the SPIFFE ID, and the connection must have
  been logged in with the credential the new session was handed (the same lease);
- never mid-transaction or mid-reply: the adapter's `SessionWatch` follows both directions
  of the splice and says whether the upstream is idle when the client leaves (PostgreSQL:
  every request answered, the last ReadyForQuery idle); a connection that is not is closed;
- never without a reset: the adapter's `reset` step (PostgreSQL: DISCARD ALL) must succeed
  and leave the connection idle, else the connection is closed;
- a lease that is revoked, expires or is retired empties the pool of its connections at
  once (`drop_lease`, called by the credential source); an offboarded identity's, or one a
  reload's policy denies, are closed like its sessions (each idle connection is a registry
  entry of kind "pooled");
- `size` caps the connections of one key (in use plus idle): a client past it waits up to
  `wait` for one to come back, then is refused; an idle connection is closed after `idle`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any, Protocol

from broker.config.pool import PoolConfig
from broker.credentials import CredentialRef
from broker.identity import WorkloadIdentity
from broker.observe.metrics import Metrics

from .registry import Entry, Registry
from .splice import StreamFilter

log = logging.getLogger("sidekey.pool")

# Lease ids that ended, remembered so a connection of one that comes back from a session
# that was still running is closed rather than pooled. More than a broker has leases at once.
ENDED_LEASES_KEPT = 4096
# The idle reaper runs this many times per `idle`: a connection lives at most 1.25 idles.
REAPS_PER_IDLE = 4

Key = tuple[Hashable, ...]


class SessionWatch(Protocol):
    """What an adapter gives the splice of a pooled session: filters for both directions
    (they watch, and may hold back the client's goodbye so it never reaches the upstream)
    and whether the upstream is idle right now."""

    @property
    def client(self) -> StreamFilter: ...

    @property
    def upstream(self) -> StreamFilter: ...

    def idle(self) -> bool: ...


def chain_filters(first: StreamFilter | None, second: StreamFilter) -> StreamFilter:
    """`second` sees what `first` forwards (a guard's rewrite first, then the watch)."""
    if first is None:
        return second
    return _Chained(first, second)


class _Chained:
    __slots__ = ("first", "second")

    def __init__(self, first: StreamFilter, second: StreamFilter) -> None:
        self.first, self.second = first, second

    @property
    def goodbye(self) -> bool:
        return bool(getattr(self.second, "goodbye", False))

    def feed(self, data: bytes) -> tuple[bytes, bytes]:
        forward, answer = self.first.feed(data)
        if not forward:
            return b"", answer
        forward, more = self.second.feed(forward)
        return forward, answer + more


class PoolFull(Exception):
    """Every connection of the key is in use and none came back within `wait`."""


@dataclass(eq=False, slots=True)
class _Idle:
    upstream: Any  # broker.session.lifecycle.Upstream (the core's, not imported: no cycle)
    ref: CredentialRef
    since: float
    entry: Entry | None = None


@dataclass(slots=True)
class _Bucket:
    open: int = 0  # connections of this key, in use and idle
    idle: list[_Idle] = field(default_factory=list)  # most recently returned last
    waiters: collections.deque[asyncio.Future[None]] = field(default_factory=collections.deque)


class SessionPool:
    """The pool of one service (see the module docstring)."""

    def __init__(self, service: str, config: PoolConfig, metrics: Metrics, live: Registry) -> None:
        self.service = service
        self.config = config
        self._live = live
        self._buckets: dict[Key, _Bucket] = {}
        # An insertion-ordered set (checked on every checkin: a dict lookup, where a deque
        # of ENDED_LEASES_KEPT was a scan of up to 4096 strings); a lease source reports an
        # ended lease more than once (retired, then dropped, then revoked).
        self._ended: dict[str, None] = {}
        self._reaper: asyncio.Task[None] | None = None
        self._closed = False
        self._idle_gauge = metrics.pool_connections.labels(service, "idle")
        self._active_gauge = metrics.pool_connections.labels(service, "active")
        self._checkouts = {
            r: metrics.pool_checkouts.labels(service, r) for r in ("reused", "new", "full")
        }
        self._waits = metrics.pool_waits.labels(service)
        self._wait_seconds = metrics.pool_wait_seconds.labels(service)
        self._closes = metrics.pool_closed

    # -- the life cycle's calls -------------------------------------------------------------

    async def checkout(self, key: Key, ref: CredentialRef, deadline: float) -> Any | None:
        """An idle connection of `key` logged in with `ref`'s credential, or None: the caller
        may open a new one (its slot is reserved: `discard` or `checkin` it). Waits while the
        key is at `size`; raises PoolFull after `wait` (or at `deadline`, loop time)."""
        loop = asyncio.get_running_loop()
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket()
        waited_since: float | None = None
        try:
            while True:
                while bucket.idle:
                    idle = bucket.idle.pop()
                    self._unlist(idle)
                    conduit = idle.upstream.conduit
                    if idle.ref != ref:
                        self._close(key, bucket, idle, "lease_changed")
                    elif conduit.is_closed or conduit.buffered:
                        # Closed by the server while idle (idle_session_timeout, a restart),
                        # or it said something nobody asked for (a FATAL notice).
                        self._close(key, bucket, idle, "upstream_closed")
                    else:
                        self._checkouts["reused"].inc()
                        self._active_gauge.inc()
                        return idle.upstream
                if bucket.open < self.config.size:
                    # A close above may have emptied and forgotten the bucket (an idle
                    # connection of an older credential, or one the server closed): the
                    # reservation lists it again, or checkin/discard would not find it.
                    self._buckets[key] = bucket
                    bucket.open += 1
                    self._checkouts["new"].inc()
                    self._active_gauge.inc()
                    return None
                if waited_since is None:
                    waited_since = time.monotonic()
                    self._waits.inc()
                left = min(
                    self.config.wait - (time.monotonic() - waited_since), deadline - loop.time()
                )
                if left <= 0:
                    self._checkouts["full"].inc()
                    raise PoolFull(
                        f"all {self.config.size} upstream connections of this identity are "
                        f"in use (pool.size of service {self.service}); none came back in "
                        f"{self.config.wait:g}s"
                    )
                waiter = loop.create_future()
                bucket.waiters.append(waiter)
                try:
                    async with asyncio.timeout(left):
                        await waiter
                except TimeoutError:
                    pass
                finally:
                    if waiter in bucket.waiters:
                        bucket.waiters.remove(waiter)
        finally:
            if waited_since is not None:
                self._wait_seconds.inc(time.monotonic() - waited_since)

    def checkin(
        self,
        key: Key,
        upstream: Any,
        ref: CredentialRef,
        identity: WorkloadIdentity,
        peer: str,
    ) -> None:
        """A checked-out connection, reset and idle, back for the next client of `key`."""
        bucket = self._buckets[key]
        self._active_gauge.dec()
        idle = _Idle(upstream, ref, time.monotonic())
        if self._closed or (ref.lease_id is not None and ref.lease_id in self._ended):
            self._close(key, bucket, idle, "lease_ended" if not self._closed else "shutdown")
            return
        bucket.idle.append(idle)
        self._idle_gauge.inc()

        def close(reason: str) -> None:
            if idle in bucket.idle:
                self._evict(key, bucket, idle, "revoked")

        idle.entry = self._live.add(identity, self.service, peer, "pooled", close)
        self._wake(bucket)
        if self._reaper is None:
            self._reaper = asyncio.get_running_loop().create_task(
                self._reap(), name=f"pool-reaper-{self.service}"
            )

    def discard(self, key: Key, why: str | None = None) -> None:
        """A checked-out connection that will not come back (failed, closed, not idle)."""
        bucket = self._buckets[key]
        self._active_gauge.dec()
        bucket.open -= 1
        if why is not None:
            self._closes.labels(self.service, why).inc()
        self._wake(bucket)
        self._forget(key, bucket)

    # -- emptying ------------------------------------------------------------------------------

    def drop_lease(self, lease_id: str) -> None:
        """A lease ended (revoked, expired, retired): close its idle connections now, and
        those in use when they come back."""
        if lease_id in self._ended:
            return  # already emptied of it
        self._ended[lease_id] = None
        if len(self._ended) > ENDED_LEASES_KEPT:
            del self._ended[next(iter(self._ended))]
        for key, bucket in list(self._buckets.items()):
            for idle in [i for i in bucket.idle if i.ref.lease_id == lease_id]:
                self._evict(key, bucket, idle, "lease_ended")

    async def close(self) -> None:
        """Close every idle connection (shutdown, or the service is rebuilt)."""
        self._closed = True
        if self._reaper is not None:
            self._reaper.cancel()
            await asyncio.gather(self._reaper, return_exceptions=True)
            self._reaper = None
        for key, bucket in list(self._buckets.items()):
            while bucket.idle:
                idle = bucket.idle.pop()
                self._unlist(idle)
                self._close(key, bucket, idle, "shutdown")

    # -- what /inventory shows ---------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        keys = [
            {
                "spiffe_id": key[0],
                "key": [str(k) for k in key[1:]],
                "open": bucket.open,
                "idle": len(bucket.idle),
                "waiting": len(bucket.waiters),
            }
            for key, bucket in self._buckets.items()
        ]
        return {
            "mode": self.config.mode,
            "size": self.config.size,
            "idle_seconds": self.config.idle,
            "wait_seconds": self.config.wait,
            "keys": keys,
        }

    # -- helpers -------------------------------------------------------------------------------

    def _unlist(self, idle: _Idle) -> None:
        self._idle_gauge.dec()
        if idle.entry is not None:
            self._live.discard(idle.entry)
            idle.entry = None

    def _evict(self, key: Key, bucket: _Bucket, idle: _Idle, why: str) -> None:
        """Take an idle connection out of its bucket and close it."""
        bucket.idle.remove(idle)
        self._unlist(idle)
        self._close(key, bucket, idle, why)

    def _close(self, key: Key, bucket: _Bucket, idle: _Idle, why: str) -> None:
        """Close a connection no longer idle in its bucket (`_unlist`ed, or never listed)."""
        idle.upstream.conduit.close()
        bucket.open -= 1
        self._closes.labels(self.service, why).inc()
        log.debug("pooled connection closed service=%s key=%s why=%s", self.service, key, why)
        self._wake(bucket)
        self._forget(key, bucket)

    def _forget(self, key: Key, bucket: _Bucket) -> None:
        if bucket.open <= 0 and not bucket.idle and not bucket.waiters:
            self._buckets.pop(key, None)

    @staticmethod
    def _wake(bucket: _Bucket) -> None:
        for waiter in bucket.waiters:
            if not waiter.done():
                waiter.set_result(None)
                return

    async def _reap(self) -> None:
        idle_for = self.config.idle
        while True:
            await asyncio.sleep(idle_for / REAPS_PER_IDLE)
            cutoff = time.monotonic() - idle_for
            for key, bucket in list(self._buckets.items()):
                for idle in [i for i in bucket.idle if i.since <= cutoff]:
                    self._evict(key, bucket, idle, "idle")
