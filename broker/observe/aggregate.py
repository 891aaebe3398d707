"""One Prometheus exposition out of several workers' (`workers: N`, broker.supervisor).

Each worker keeps its metrics as plain floats in its own process (broker.observe.metrics
explains why); the parent scrapes every worker's /metrics and adds them up here, so a scrape
of the parent reads as one broker. Counters and histograms are sums. A gauge is a sum too
(sessions in flight, pool sizes) unless adding makes no sense: "is it up" and "seconds left"
gauges take the worst worker (the minimum), counts of one shared thing (the deny list's
identities) the largest.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

# Gauges where the worst worker is the answer: 0 if any worker lost the vault.
MIN_GAUGES = frozenset(
    {
        "sidekey_vault_up",
        "sidekey_deny_list_up",
        "sidekey_svid_expiry_seconds",
        "sidekey_vault_token_expiry_seconds",
        "sidekey_jwks_keys",
    }
)
# Gauges that count one thing every worker sees the same (not one per worker).
MAX_GAUGES = frozenset({"sidekey_offboarded_identities"})


class _Families(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        yield from self.families


def merge(texts: Iterable[bytes], extra: Iterable[Metric] = ()) -> bytes:
    """The workers' expositions as one: samples with the same name and labels combined."""
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text.decode("utf-8", "replace")):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(
                    family.name, family.documentation, family.type
                )
                values[family.name] = {}
            into = values[family.name]
            op = _op(family.type, family.name)
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                old = into.get(key)
                if old is None:
                    into[key] = sample.value
                elif sample.name.endswith("_created") or op == "min":
                    into[key] = min(old, sample.value)
                elif op == "max":
                    into[key] = max(old, sample.value)
                elif op == "sum":
                    into[key] = old + sample.value
                # op "first" (info): the first worker's value stays
    out: list[Metric] = []
    for name, family in families.items():
        for (sample_name, labels), value in values[name].items():
            family.add_sample(sample_name, dict(labels), value)
        out.append(family)
    out.extend(extra)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(out))
    return generate_latest(registry)


def _op(kind: str, name: str) -> str:
    if kind == "info":
        return "first"
    if kind == "gauge":
        if name in MIN_GAUGES:
            return "min"
        if name in MAX_GAUGES:
            return "max"
    return "sum"
