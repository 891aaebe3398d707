"""broker.observe.aggregate: several workers' /metrics as one exposition, from real
expositions (each worker's Metrics().render())."""

from __future__ import annotations

import pytest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.parser import text_string_to_metric_families

from broker.observe.aggregate import merge
from broker.observe.metrics import Metrics


def samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text.decode())
        for s in family.samples
    }


def worker(requests: float, active: float, vault_up: float, denied: float, fetch: float) -> bytes:
    m = Metrics()
    m.requests.labels("orders", "allow").inc(requests)
    m.sessions_active.labels("orders").inc(active)
    m.vault_up.labels("https://vault:8200").inc(vault_up)
    m.offboarded.labels().inc(denied)
    m.fetch_seconds.labels("orders", "vault-kv").observe(fetch)
    return m.render()


def test_counters_and_histograms_add_gauges_add_or_take_the_worst() -> None:
    merged = samples(
        merge(
            [worker(3, 2, 1, 5, 0.002), worker(4, 1, 0, 5, 0.2)],
            extra=[GaugeMetricFamily("sidekey_workers", "Worker processes configured", value=2)],
        )
    )
    assert merged[("sidekey_requests_total", (("decision", "allow"), ("service", "orders")))] == 7
    assert merged[("sidekey_sessions_active", (("service", "orders"),))] == 3
    # Up gauges take the worst worker; a count of one shared thing is not multiplied.
    assert merged[("sidekey_vault_up", (("address", "https://vault:8200"),))] == 0
    assert merged[("sidekey_offboarded_identities", ())] == 5
    fetch = (("provider", "vault-kv"), ("service", "orders"))
    assert merged[("sidekey_credential_fetch_seconds_count", fetch)] == 2
    assert merged[("sidekey_credential_fetch_seconds_bucket", (("le", "0.0025"), *fetch))] == 1
    assert merged[("sidekey_credential_fetch_seconds_sum", fetch)] == pytest.approx(0.202)
    assert merged[("sidekey_workers", ())] == 2


def test_one_worker_is_its_own_exposition() -> None:
    one = worker(3, 2, 1, 5, 0.002)
    assert samples(merge([one])) == samples(one)
