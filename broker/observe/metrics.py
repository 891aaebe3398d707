"""Prometheus metrics, on a registry of their own (no process-global state)."""

from __future__ import annotations

import asyncio
import importlib.util
import platform
import ssl
from collections.abc import Iterator
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
        labelnames: list[str],
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

    def collect(self) -> Iterator[Metric]:
        family_type = CounterMetricFamily if self.kind == "counter" else GaugeMetricFamily
        family = family_type(self.name, self.documentation, labels=self.labelnames)
        for values, child in list(self._children.items()):
            family.add_metric(values, child.value)
        yield family

    def describe(self) -> Iterator[Metric]:
        family_type = CounterMetricFamily if self.kind == "counter" else GaugeMetricFamily
        yield family_type(self.name, self.documentation, labels=self.labelnames)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        Info("sidekey_build", "What this broker runs on", registry=r).info(platform_info())
        self.requests = Family(
            "sidekey_requests",
            "Requests and connections by service and decision",
            ["service", "decision"],
            kind="counter",
            registry=r,
        )
        self.credential_fetches = Family(
            "sidekey_credential_fetches",
            "Credential fetches from a provider",
            ["service", "provider", "outcome"],
            kind="counter",
            registry=r,
        )
        self.cache_hits = Family(
            "sidekey_credential_cache_hits",
            "Credential requests served from cache",
            ["service"],
            kind="counter",
            registry=r,
        )
        self.cache_misses = Family(
            "sidekey_credential_cache_misses",
            "Credential requests that needed a fetch",
            ["service"],
            kind="counter",
            registry=r,
        )
        self.fetch_seconds = Histogram(
            "sidekey_credential_fetch_seconds",
            "Latency of credential fetches",
            ["service", "provider"],
            buckets=FETCH_BUCKETS,
            registry=r,
        )
        self.upstream_errors = Family(
            "sidekey_upstream_errors",
            "Upstream failures by kind",
            ["service", "kind"],
            kind="counter",
            registry=r,
        )
        self.sessions_active = Family(
            "sidekey_sessions_active",
            "Proxied sessions in flight",
            ["service"],
            kind="gauge",
            registry=r,
        )
        self.sessions = Family(
            "sidekey_sessions",
            "Proxied sessions by outcome",
            ["service", "outcome"],
            kind="counter",
            registry=r,
        )
        self.leases = Family(
            "sidekey_leases",
            "Lease lifecycle events (created, renewed, revoked, expired)",
            ["service", "event"],
            kind="counter",
            registry=r,
        )
        self.connections_rejected = Family(
            "sidekey_connections_rejected",
            "Connections refused over max_connections",
            ["service"],
            kind="counter",
            registry=r,
        )

        # Upstream session reuse (broker.session.pool).
        self.pool_connections = Family(
            "sidekey_pool_connections",
            "Upstream connections of session pools: idle (kept for the next client) or active",
            ["service", "state"],
            kind="gauge",
            registry=r,
        )
        self.pool_checkouts = Family(
            "sidekey_pool_checkouts",
            "Sessions that took a pooled connection (reused), opened one (new), or found the "
            "identity's pool full past pool.wait (full)",
            ["service", "result"],
            kind="counter",
            registry=r,
        )
        self.pool_waits = Family(
            "sidekey_pool_waits",
            "Sessions that waited for a connection of a full pool",
            ["service"],
            kind="counter",
            registry=r,
        )
        self.pool_wait_seconds = Family(
            "sidekey_pool_wait_seconds",
            "Seconds sessions spent waiting for a connection of a full pool",
            ["service"],
            kind="counter",
            registry=r,
        )
        self.pool_closed = Family(
            "sidekey_pool_closed",
            "Pooled upstream connections closed, by why (idle, lease_ended, not_idle, "
            "reset_failed, revoked, upstream_closed, shutdown, ...)",
            ["service", "why"],
            kind="counter",
            registry=r,
        )

        self.vault_up = Family(
            "sidekey_vault_up",
            "1 while the vault answered the broker's last health check, else 0",
            ["address"],
            kind="gauge",
            registry=r,
        )
        self.audit_write_failures = Family(
            "sidekey_audit_write_failures",
            "Audit lines that could not be written to the audit file (a full disk, say)",
            [],
            kind="counter",
            registry=r,
        )
        self.deny_list_up = Family(
            "sidekey_deny_list_up",
            "1 when the last read of the shared deny list succeeded, 0 when it failed",
            [],
            kind="gauge",
            registry=r,
        )
        self.offboarded = Family(
            "sidekey_offboarded_identities",
            "Identities on the deny list this broker enforces",
            [],
            kind="gauge",
            registry=r,
        )
        self.sessions_closed = Family(
            "sidekey_sessions_closed",
            "Live sessions and connections the broker closed (reload, offboard)",
            ["service", "why"],
            kind="counter",
            registry=r,
        )
        # The broker's own identity material (broker.identity.material).
        self.svid_rotations = Family(
            "sidekey_svid_rotations",
            "The broker's X.509-SVID replaced by a new one, by source (file, workload_api)",
            ["source"],
            kind="counter",
            registry=r,
        )
        self.bundle_updates = Family(
            "sidekey_trust_bundle_updates",
            "Trust bundles replaced by a changed set of authorities",
            ["trust_domain", "kind", "source"],
            kind="counter",
            registry=r,
        )
        self.identity_errors = Family(
            "sidekey_identity_source_errors",
            "Identity material not had: a lost or refusing Workload API, rejected files",
            ["source", "kind"],
            kind="counter",
            registry=r,
        )
        # Read at scrape time from the material (the runtime sets the function).
        self.svid_expiry = Gauge(
            "sidekey_svid_expiry_seconds",
            "Seconds until the broker's X.509-SVID expires (negative once expired)",
            registry=r,
        )
        self.jwt_verifications = Family(
            "sidekey_jwt_verifications",
            "Inbound token verifications by configured issuer (unknown: none matched) and "
            "outcome (ok, cached, expired, bad_audience, bad_signature, unknown_key, ...)",
            ["issuer", "outcome"],
            kind="counter",
            registry=r,
        )
        self.jwks_refreshes = Family(
            "sidekey_jwks_refreshes",
            "Fetches of a token issuer's keys (JWKS, discovery, file, Workload API) by outcome",
            ["issuer", "outcome"],
            kind="counter",
            registry=r,
        )
        self.jwks_keys = Family(
            "sidekey_jwks_keys",
            "Signing keys a token issuer has right now",
            ["issuer"],
            kind="gauge",
            registry=r,
        )
        self.vault_logins = Family(
            "sidekey_vault_logins",
            "The broker's own logins to the vault, by method and outcome",
            ["method", "outcome"],
            kind="counter",
            registry=r,
        )
        self.vault_renewals = Family(
            "sidekey_vault_token_renewals",
            "Renewals of the broker's own vault token, by outcome",
            ["outcome"],
            kind="counter",
            registry=r,
        )
        self.vault_failures = Family(
            "sidekey_vault_failures",
            "Failed vault calls by kind (unreachable, timeout, tls, denied, rejected, ...)",
            ["kind"],
            kind="counter",
            registry=r,
        )
        self.vault_address_changes = Family(
            "sidekey_vault_address_changes",
            "Times the broker moved to another vault address, by the address it moved to",
            ["address"],
            kind="counter",
            registry=r,
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
