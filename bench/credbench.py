"""The credential path's cache-hit cost, timed in-process on the broker's own event loop type.

`CachedSource` (vault-kv: the HTTP adapter's source) with a primed cache and a stub fetcher,
and `LeaseManager` (vault-database: the PostgreSQL adapter's source) with a real lease from the
bench OpenBao. Each figure is the best of several timed batches of
``async with source.use(identity) as credential`` (what an adapter does per request or
connection), minus nothing: the loop and ``async with`` overhead are part of what the adapter
pays.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from broker.credentials import Credential, CredentialRef, CredentialSource
from broker.credentials.cache import CachedSource
from broker.credentials.leases import LeaseManager
from broker.credentials.vault import VaultClient
from broker.identity import WorkloadIdentity
from broker.observe.metrics import Metrics

IDENTITY = WorkloadIdentity(spiffe_id="spiffe://bench.test/ns/bench/sa/pgbench", method="x509-svid")


async def _time_use(source: CredentialSource, iterations: int, batches: int) -> float:
    """Best-of-batches microseconds per `async with source.use(identity)`."""
    best = float("inf")
    for _ in range(batches):
        started = time.perf_counter()
        for _ in range(iterations):
            async with source.use(IDENTITY) as credential:
                assert credential.fields
        best = min(best, (time.perf_counter() - started) / iterations)
    return best * 1e6


async def _time_empty(iterations: int, batches: int) -> float:
    """The same loop around a no-op: the floor any ``async with`` pays on this box."""

    class Nothing:
        async def __aenter__(self) -> int:
            return 1

        async def __aexit__(self, *exc: object) -> None:
            return None

    nothing = Nothing()
    best = float("inf")
    for _ in range(batches):
        started = time.perf_counter()
        for _ in range(iterations):
            async with nothing as value:
                assert value
        best = min(best, (time.perf_counter() - started) / iterations)
    return best * 1e6


async def _measure(vault_address: str, vault_token: str, iterations: int) -> dict[str, Any]:
    metrics = Metrics()
    fetches = 0

    async def fetch() -> Credential:
        nonlocal fetches
        fetches += 1
        return Credential({"token": "x" * 32}, CredentialRef("vault-kv", "secret/bench"))

    cached = CachedSource("bench", "vault-kv", fetch, 3600.0, metrics)
    await cached.prime()
    result: dict[str, Any] = {
        "iterations": iterations,
        "empty_async_with_us": await _time_empty(iterations, 5),
        "cached_source_use_us": await _time_use(cached, iterations, 5),
        "cached_source_fetches": fetches,
    }
    await cached.close()

    vault = VaultClient(vault_address, vault_token)
    leases = LeaseManager("bench", vault, "database", "bench", metrics)
    try:
        async with leases.use(IDENTITY):  # creates the one lease (a vault read)
            pass
        before = metrics.credential_fetches.collect()
        result["lease_manager_use_us"] = await _time_use(leases, iterations, 5)
        after = metrics.credential_fetches.collect()
        result["lease_manager_fetches_during_timing"] = _total(after) - _total(before)
    finally:
        await leases.close()
        await vault.close()
    return result


def _total(families: Any) -> float:
    samples = (s for family in families for s in family.samples if s.name.endswith("_total"))
    return float(sum(s.value for s in samples))


def measure(vault_address: str, vault_token: str, iterations: int = 20_000) -> dict[str, Any]:
    factory: Callable[[], asyncio.AbstractEventLoop] | None
    try:
        import uvloop

        factory = uvloop.new_event_loop
    except ImportError:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(_measure(vault_address, vault_token, iterations))
