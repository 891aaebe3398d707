"""broker.observe.metrics: the hot-path families render as Prometheus counters and gauges."""

from __future__ import annotations

import platform
import ssl

import pytest
from prometheus_client.parser import text_string_to_metric_families

from broker import __version__
from broker.observe.metrics import Metrics


def scrape(metrics: Metrics) -> dict[str, tuple[str, dict[tuple[tuple[str, str], ...], float]]]:
    """family name -> (type, {sorted labels: value}) from the text exposition."""
    out = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        samples = {tuple(sorted(s.labels.items())): s.value for s in family.samples}
        out[family.name] = (family.type, samples)
    return out


def test_counters_and_gauges_render_with_their_labels_and_values() -> None:
    metrics = Metrics()
    allowed = metrics.requests.labels("api", "allow")
    allowed.inc()
    allowed.inc()
    metrics.requests.labels(service="api", decision="deny").inc(3)
    active = metrics.sessions_active.labels("db")
    active.inc()
    active.inc()
    active.dec()

    families = scrape(metrics)
    kind, samples = families["sidekey_requests"]
    assert kind == "counter"
    assert samples == {
        (("decision", "allow"), ("service", "api")): 2.0,
        (("decision", "deny"), ("service", "api")): 3.0,
    }
    assert families["sidekey_sessions_active"] == ("gauge", {(("service", "db"),): 1.0})
    assert (
        metrics.registry.get_sample_value(
            "sidekey_requests_total", {"service": "api", "decision": "allow"}
        )
        == 2.0
    )


def test_labels_by_name_and_by_position_are_the_same_child() -> None:
    metrics = Metrics()
    assert metrics.sessions.labels("api", "ok") is metrics.sessions.labels(
        outcome="ok", service="api"
    )


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [
        (("api",), {}),
        (("api", "ok", "x"), {}),
        ((), {"service": "api"}),
        (("api",), {"outcome": "ok"}),
    ],
)
def test_wrong_labels_are_refused(args: tuple[str, ...], kwargs: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="labels are service, outcome"):
        Metrics().sessions.labels(*args, **kwargs)


def test_build_info_names_the_openssl_python_and_loop_in_use() -> None:
    # The text format has no info type: a gauge named *_info, always 1, as prometheus_client
    # writes it.
    (kind, samples) = scrape(Metrics())["sidekey_build_info"]
    assert kind == "gauge"
    [(labels, value)] = samples.items()
    info = dict(labels)
    assert value == 1.0
    assert info["openssl"] == ssl.OPENSSL_VERSION
    assert info["python"] == platform.python_version()
    assert info["version"] == __version__
    assert info["event_loop"].startswith(("uvloop ", "asyncio"))
