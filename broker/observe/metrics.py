"""Prometheus metrics, on a registry of their own (no process-global state)."""

from __future__ import annotations

import asyncio
import importlib.util
import platform
import ssl
from collections.abc import Iterator, Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Literal

from prometheus_client import CollectorRegistry, Gauge, Histogram, Info, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from broker import __version__

# Vault round trips take milliseconds on a LAN; the buckets span cache-warm to timeout.
FETCH_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


def platform_info() -> dict[str, str]:
    """What this broker runs on, for `sidekey_build_info` and the start-up log line.

    The OpenSSL version matters to operators twice: for its advisories, and for cost: Debian
    12's 3.0 spends ~30 % more CPU per mutual-TLS handshake than 3.5 (`make bench-openssl`)."""
    return {
        "version": __version__,
        "python": platform.python_version(),
        "openssl": ssl.OPENSSL_VERSION,
        "event_loop": running_loop(),
    }


def running_loop() -> str:
    """The event loop this thread runs (``uvloop 0.21.0`` or ``asyncio``); outside a loop,
    what `sidekey run` would pick by default."""
    try:
        module = type(asyncio.get_running_loop()).__module__
    except RuntimeError:
        module = "uvloop" if importlib.util.find_spec("uvloop") is not None else "asyncio"
    if module.startswith("uvloop"):
        try:
            return f"uvloop {version('uvloop')}"
        except PackageNotFoundError:  # pragma: no cover - importable but not installed
            return "uvloop"
    return "asyncio"


class Value:
    """One labelled child of a `Family`: a plain number the event loop adds to."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def dec(self, amount: float = 1.0) -> None:
        self.value -= amount


class Family(Collector):
    """A counter or gauge family for the hot paths, read by the registry at scrape time.

    prometheus_client's Counter.inc() takes a lock and makes four Python calls; an HTTP
    request incremented five of them (~1.2 us each; 3.5 % of py-spy samples of the broker under
    the trivial-upstream bench). The broker updates metrics from its one event-loop thread,
    so a child here is a plain float and inc() one addition. Scrapes read the floats.
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        *,
        kind: Literal["counter", "gauge"],
        registry: CollectorRegistry,
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self.kind = kind
        self._children: dict[tuple[str, ...], Value] = {}
        registry.register(self)

    def labels(self, *values: str, **by_name: str) -> Value:
        """The child for these label values (positional, or all by name), made on first use."""
        if by_name:
            if values or set(by_name) != set(self.labelnames):
                raise ValueError(f"{self.name}: labels are {', '.join(self.labelnames)}")
            values = tuple(by_name[n] for n in self.labelnames)
        elif len(values) != len(self.labelnames):
            raise ValueError(f"{self.name}: labels are {', '.join(self.labelnames)}")
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = Value()
        return child

    def _empty(self) -> CounterMetricFamily | GaugeMetricFamily:
        family_type = CounterMetricFamily if self.kind == "counter" else GaugeMetricFamily
        return family_type(self.name, self.documentation, labels=self.labelnames)

    def collect(self) -> Iterator[Metric]:
        family = self._empty()
        for values, child in list(self._children.items()):
            family.add_metric(values, child.value)
        yield family

    def describe(self) -> Iterator[Metric]:
        yield self._empty()


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()

        def counter(name: str, documentation: str, labels: Sequence[str] = ()) -> Family:
            return Family(name, documentation, labels, kind="counter", registry=r)

        def gauge(name: str, documentation: str, labels: Sequence[str] = ()) -> Family:
            return Family(name, documentation, labels, kind="gauge", registry=r)

        Info("sidekey_build", "What this broker runs on", registry=r).info(platform_info())
        self.requests = counter(
            "sidekey_requests",
            "Requests and connections by service and decision",
            ["service", "decision"],
        )
        self.credential_fetches = counter(
            "sidekey_credential_fetches",
            "Credential fetches from a provider",
            ["service", "provider", "outcome"],
        )
        self.cache_hits = counter(
            "sidekey_credential_cache_hits",
            "Credential requests served from cache",
            ["service"],
        )
        self.cache_misses = counter(
            "sidekey_credential_cache_misses",
            "Credential requests that needed a fetch",
            ["service"],
        )
        self.fetch_seconds = Histogram(
            "sidekey_credential_fetch_seconds",
            "Latency of credential fetches",
            ["service", "provider"],
            buckets=FETCH_BUCKETS,
            registry=r,
        )
        self.upstream_errors = counter(
            "sidekey_upstream_errors",
            "Upstream failures by kind",
            ["service", "kind"],
        )
        self.sessions_active = gauge(
            "sidekey_sessions_active",
            "Proxied sessions in flight",
            ["service"],
        )
        self.sessions = counter(
            "sidekey_sessions",
            "Proxied sessions by outcome",
            ["service", "outcome"],
        )
        self.leases = counter(
            "sidekey_leases",
            "Lease lifecycle events (created, renewed, revoked, expired)",
            ["service", "event"],
        )
        self.connections_rejected = counter(
            "sidekey_connections_rejected",
            "Connections refused over max_connections",
            ["service"],
        )

        self.cancels = counter(
            "sidekey_cancel_requests",
            "PostgreSQL CancelRequests by outcome: forwarded upstream, unknown key, refused "
            "(another identity's session), limited (over the rate passed to other workers)",
            ["service", "outcome"],
        )

        # Upstream session reuse (broker.session.pool).
        self.pool_connections = gauge(
            "sidekey_pool_connections",
            "Upstream connections of session pools: idle (kept for the next client) or active",
            ["service", "state"],
        )
        self.pool_checkouts = counter(
            "sidekey_pool_checkouts",
            "Sessions that took a pooled connection (reused), opened one (new), or found the "
            "identity's pool full past pool.wait (full)",
            ["service", "result"],
        )
        self.pool_waits = counter(
            "sidekey_pool_waits",
            "Sessions that waited for a connection of a full pool",
            ["service"],
        )
        self.pool_wait_seconds = counter(
            "sidekey_pool_wait_seconds",
            "Seconds sessions spent waiting for a connection of a full pool",
            ["service"],
        )
        self.pool_closed = counter(
            "sidekey_pool_closed",
            "Pooled upstream connections closed, by why (idle, lease_ended, not_idle, "
            "reset_failed, revoked, upstream_closed, shutdown, ...)",
            ["service", "why"],
        )

        self.vault_up = gauge(
            "sidekey_vault_up",
            "1 while the vault answered the broker's last health check, else 0",
            ["address"],
        )
        self.audit_write_failures = counter(
            "sidekey_audit_write_failures",
            "Audit lines that could not be written to the audit file (a full disk, say)",
        )
        self.deny_list_up = gauge(
            "sidekey_deny_list_up",
            "1 when the last read of the shared deny list succeeded, 0 when it failed",
        )
        self.offboarded = gauge(
            "sidekey_offboarded_identities",
            "Identities on the deny list this broker enforces",
        )
        self.sessions_closed = counter(
            "sidekey_sessions_closed",
            "Live sessions and connections the broker closed (reload, offboard)",
            ["service", "why"],
        )
        # The broker's own identity material (broker.identity.material).
        self.svid_rotations = counter(
            "sidekey_svid_rotations",
            "The broker's X.509-SVID replaced by a new one, by source (file, workload_api)",
            ["source"],
        )
        self.bundle_updates = counter(
            "sidekey_trust_bundle_updates",
            "Trust bundles replaced by a changed set of authorities",
            ["trust_domain", "kind", "source"],
        )
        self.identity_errors = counter(
            "sidekey_identity_source_errors",
            "Identity material not had: a lost or refusing Workload API, rejected files",
            ["source", "kind"],
        )
        # Read at scrape time from the material (the runtime sets the function).
        self.svid_expiry = Gauge(
            "sidekey_svid_expiry_seconds",
            "Seconds until the broker's X.509-SVID expires (negative once expired)",
            registry=r,
        )
        self.jwt_verifications = counter(
            "sidekey_jwt_verifications",
            "Inbound token verifications by configured issuer (unknown: none matched) and "
            "outcome (ok, cached, expired, bad_audience, bad_signature, unknown_key, ...)",
            ["issuer", "outcome"],
        )
        self.jwks_refreshes = counter(
            "sidekey_jwks_refreshes",
            "Fetches of a token issuer's keys (JWKS, discovery, file, Workload API) by outcome",
            ["issuer", "outcome"],
        )
        self.jwks_keys = gauge(
            "sidekey_jwks_keys",
            "Signing keys a token issuer has right now",
            ["issuer"],
        )
        self.vault_logins = counter(
            "sidekey_vault_logins",
            "The broker's own logins to the vault, by method and outcome",
            ["method", "outcome"],
        )
        self.vault_renewals = counter(
            "sidekey_vault_token_renewals",
            "Renewals of the broker's own vault token, by outcome",
            ["outcome"],
        )
        self.vault_failures = counter(
            "sidekey_vault_failures",
            "Failed vault calls by kind (unreachable, timeout, tls, denied, rejected, ...)",
            ["kind"],
        )
        self.vault_address_changes = counter(
            "sidekey_vault_address_changes",
            "Times the broker moved to another vault address, by the address it moved to",
            ["address"],
        )
        # Set to a function by the vault client: the value is computed at scrape time.
        self.vault_token_expiry = Gauge(
            "sidekey_vault_token_expiry_seconds",
            "Seconds until the broker's own vault token expires (0: no valid token, "
            "+Inf: a token that never expires)",
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
