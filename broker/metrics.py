"""Prometheus metrics, on a registry of their own (no process-global state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Vault round trips take milliseconds on a LAN; the buckets span cache-warm to timeout.
FETCH_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "sidekey_requests",
            "Requests and connections by service and decision",
            ["service", "decision"],
            registry=r,
        )
        self.credential_fetches = Counter(
            "sidekey_credential_fetches",
            "Credential fetches from a provider",
            ["service", "provider", "outcome"],
            registry=r,
        )
        self.cache_hits = Counter(
            "sidekey_credential_cache_hits",
            "Credential requests served from cache",
            ["service"],
            registry=r,
        )
        self.cache_misses = Counter(
            "sidekey_credential_cache_misses",
            "Credential requests that needed a fetch",
            ["service"],
            registry=r,
        )
        self.fetch_seconds = Histogram(
            "sidekey_credential_fetch_seconds",
            "Latency of credential fetches",
            ["service", "provider"],
            buckets=FETCH_BUCKETS,
            registry=r,
        )
        self.upstream_errors = Counter(
            "sidekey_upstream_errors",
            "Upstream failures by kind",
            ["service", "kind"],
            registry=r,
        )
        self.sessions_active = Gauge(
            "sidekey_sessions_active",
            "Proxied sessions in flight",
            ["service"],
            registry=r,
        )
        self.sessions = Counter(
            "sidekey_sessions",
            "Proxied sessions by outcome",
            ["service", "outcome"],
            registry=r,
        )
        self.leases = Counter(
            "sidekey_leases",
            "Lease lifecycle events (created, renewed, revoked, expired)",
            ["service", "event"],
            registry=r,
        )
        self.connections_rejected = Counter(
            "sidekey_connections_rejected",
            "Connections refused over max_connections",
            ["service"],
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
