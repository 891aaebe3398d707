"""The rate of cancels a worker passes to its siblings (adapters/postgres/_cancel.py).

End to end, with two workers and made-up keys from one address:
test_workers_cancel.py. These pin the bucket's rules with a clock the test moves.
"""

from __future__ import annotations

import pytest

from adapters.postgres import _cancel
from adapters.postgres._cancel import SiblingCancelRate


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_then_the_rate_per_peer_address() -> None:
    clock = Clock()
    rate = SiblingCancelRate(per_second=10, burst=3, clock=clock)
    assert [rate.allow("10.0.0.1:5000") for _ in range(4)] == [True, True, True, False]
    assert rate.allow("10.0.0.2:5000"), "another address has its own bucket"
    assert not rate.allow("10.0.0.1:6000"), "the port is not the peer"
    clock.now += 0.15  # one and a half tokens back
    assert rate.allow("10.0.0.1:5000")
    assert not rate.allow("10.0.0.1:5000")
    clock.now += 60
    assert [rate.allow("10.0.0.1:5000") for _ in range(4)] == [True, True, True, False]


def test_past_the_table_size_new_peers_share_one_bucket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_cancel, "MAX_CANCEL_PEERS", 3)
    clock = Clock()
    rate = SiblingCancelRate(per_second=1, burst=1, clock=clock)
    for host in ("10.0.0.1", "10.0.0.2", "10.0.0.3"):
        assert rate.allow(f"{host}:1")
    assert rate.allow("10.0.0.4:1"), "the first of the shared bucket"
    assert not rate.allow("10.0.0.5:1"), "the shared bucket is empty"
    clock.now += 1  # every bucket refilled: the oldest are dropped for new peers
    assert rate.allow("10.0.0.6:1") and rate.allow("10.0.0.7:1")
