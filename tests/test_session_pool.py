"""broker.session.pool's bookkeeping: which connection goes to whom, and what an ended lease
takes with it. The connections here are stand-ins that record being closed: the pool never
reads or writes them (tests/test_postgres_pool.py runs the same rules against PostgreSQL)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest

from broker.config.pool import PoolConfig
from broker.credentials import CredentialRef
from broker.identity import WorkloadIdentity
from broker.observe.metrics import Metrics
from broker.session import pool as pool_module
from broker.session.pool import SessionPool
from broker.session.registry import Registry

SERVICE = "orders-db"
ALICE = WorkloadIdentity("spiffe://example.org/alice", "mtls")
KEY = (ALICE.spiffe_id, "appdb")
OTHER_KEY = (ALICE.spiffe_id, "otherdb")


@dataclass
class _Conduit:
    is_closed: bool = False
    buffered: int = 0

    def close(self) -> None:
        self.is_closed = True


@dataclass
class _Upstream:
    conduit: _Conduit = field(default_factory=_Conduit)


def lease(n: int) -> CredentialRef:
    return CredentialRef("vault-database", "db/creds/app", lease_id=f"db/creds/app/{n}")


def closed(metrics: Metrics, why: str) -> float:
    return metrics.pool_closed.labels(SERVICE, why).value


async def pooled(pool: SessionPool, ref: CredentialRef, key: tuple[str, str] = KEY) -> _Upstream:
    """A connection opened for `ref` and handed back idle."""
    loop = asyncio.get_running_loop()
    assert await pool.checkout(key, ref, loop.time() + 1) is None
    upstream = _Upstream()
    pool.checkin(key, upstream, ref, ALICE, "127.0.0.1:5000")
    return upstream


async def test_a_closed_idle_connection_leaves_its_key_serving() -> None:
    """The checkout that closes the key's last idle connection (an older credential's, or one
    the server closed while idle) still opens one of its own, and hands it back."""
    metrics, live = Metrics(), Registry()
    pool = SessionPool(SERVICE, PoolConfig(size=4), metrics, live)
    loop = asyncio.get_running_loop()
    try:
        old = await pooled(pool, lease(1))
        new = await pooled(pool, lease(2))  # the identity's lease was replaced meanwhile
        assert old.conduit.is_closed and closed(metrics, "lease_changed") == 1
        assert len(live) == 1 and pool.describe()["keys"][0]["open"] == 1
        assert await pool.checkout(KEY, lease(2), loop.time() + 1) is new
        new.conduit.close()  # the server ends it while it is idle (a restart)
        pool.checkin(KEY, new, lease(2), ALICE, "127.0.0.1:5000")
        again = await pooled(pool, lease(2))
        assert closed(metrics, "upstream_closed") == 1 and not again.conduit.is_closed
        assert await pool.checkout(KEY, lease(2), loop.time() + 1) is again
        pool.discard(KEY)
        assert pool.describe()["keys"] == []
    finally:
        await pool.close()


async def test_a_lease_reported_ended_again_closes_nothing_more() -> None:
    metrics, live = Metrics(), Registry()
    pool = SessionPool(SERVICE, PoolConfig(size=4), metrics, live)
    try:
        one, two = lease(1), lease(2)
        first = await pooled(pool, one)
        second = await pooled(pool, two, OTHER_KEY)
        assert len(live) == 2
        # The lease manager reports one end up to three times (retired, dropped, revoked).
        for _ in range(3):
            pool.drop_lease(one.lease_id or "")
        assert first.conduit.is_closed and not second.conduit.is_closed
        assert closed(metrics, "lease_ended") == 1
        assert len(live) == 1
        # A session of the ended lease that comes back later is closed, not pooled.
        loop = asyncio.get_running_loop()
        assert await pool.checkout(KEY, one, loop.time() + 1) is None
        late = _Upstream()
        pool.checkin(KEY, late, one, ALICE, "127.0.0.1:5001")
        assert late.conduit.is_closed and closed(metrics, "lease_ended") == 2
        # The other lease's connection is still handed out.
        assert await pool.checkout(OTHER_KEY, two, loop.time() + 1) is second
    finally:
        await pool.close()


async def test_ended_leases_are_remembered_up_to_the_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pool_module, "ENDED_LEASES_KEPT", 3)
    metrics = Metrics()
    pool = SessionPool(SERVICE, PoolConfig(size=4), metrics, Registry())
    try:
        for n in range(5):
            pool.drop_lease(f"db/creds/app/{n}")
        # The two oldest are forgotten: a connection of theirs would be pooled again.
        upstream = await pooled(pool, lease(0))
        assert not upstream.conduit.is_closed
        late = await pooled(pool, lease(4), OTHER_KEY)
        assert late.conduit.is_closed
    finally:
        await pool.close()
