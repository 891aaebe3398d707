"""CachedSource over real OpenBao KV v2: TTL, rotation, single flight, failing closed."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import pytest

from broker.credentials.cache import FAILED_FETCH_HOLDOFF_SECONDS, CachedSource
from broker.credentials.providers import EnvFetcher, VaultKvFetcher
from broker.credentials.vault import VaultClient
from broker.errors import CredentialUnavailable
from broker.identity import WorkloadIdentity, local_identity
from broker.observe.metrics import Metrics
from tests.servers import OpenBao

ME = local_identity("spiffe://example.org/ns/test/sa/app")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def fetches(metrics: Metrics, outcome: str = "ok") -> float:
    return sample(
        metrics,
        "sidekey_credential_fetches_total",
        service="svc",
        provider="vault-kv",
        outcome=outcome,
    )


@pytest.fixture
async def vault(openbao: OpenBao) -> AsyncIterator[VaultClient]:
    client = VaultClient(openbao.address, openbao.token, timeout=2.0)
    yield client
    await client.close()


def kv_source(
    vault: VaultClient, path: str, metrics: Metrics, clock: FakeClock, ttl: float = 10.0
) -> CachedSource:
    return CachedSource(
        "svc", "vault-kv", VaultKvFetcher(vault, "secret", path), ttl, metrics, clock=clock
    )


async def value(source: CachedSource, identity: WorkloadIdentity = ME) -> str:
    async with source.use(identity) as cred:
        return cred.fields["token"]


async def settle(source: CachedSource) -> None:
    """Wait for a background refresh, if any, to finish."""
    task = source._inflight
    if task is not None:
        await asyncio.gather(task, return_exceptions=True)


async def test_kv_all_fields_and_version(openbao: OpenBao, vault: VaultClient) -> None:
    openbao.client().secrets.kv.v2.create_or_update_secret(
        path="cache/fields", secret={"user": "svc", "token": "tok-1"}
    )
    source = kv_source(vault, "cache/fields", Metrics(), FakeClock())
    async with source.use(ME) as cred:
        assert dict(cred.fields) == {"user": "svc", "token": "tok-1"}
        assert cred.ref.provider == "vault-kv" and cred.ref.location == "secret/cache/fields"
        assert cred.ref.version is not None and cred.ref.version >= 1
    await source.close()


async def test_rotation_served_after_ttl_not_before(openbao: OpenBao, vault: VaultClient) -> None:
    kv = openbao.client().secrets.kv.v2
    kv.create_or_update_secret(path="cache/rotate", secret={"token": "old"})
    clock, metrics = FakeClock(), Metrics()
    source = kv_source(vault, "cache/rotate", metrics, clock, ttl=10.0)
    assert await value(source) == "old"
    kv.create_or_update_secret(path="cache/rotate", secret={"token": "new"})
    clock.now += 5.0
    assert await value(source) == "old"  # within the TTL, before refresh-ahead
    assert fetches(metrics) == 1
    clock.now += 5.1
    assert await value(source) == "new"
    assert fetches(metrics) == 2
    assert sample(metrics, "sidekey_credential_cache_hits_total", service="svc") == 1
    assert sample(metrics, "sidekey_credential_cache_misses_total", service="svc") == 2
    await source.close()


async def test_refresh_ahead_serves_cached_while_fetching(
    openbao: OpenBao, vault: VaultClient
) -> None:
    kv = openbao.client().secrets.kv.v2
    kv.create_or_update_secret(path="cache/ahead", secret={"token": "v1"})
    clock, metrics = FakeClock(), Metrics()
    source = kv_source(vault, "cache/ahead", metrics, clock, ttl=10.0)
    assert await value(source) == "v1"
    kv.create_or_update_secret(path="cache/ahead", secret={"token": "v2"})
    clock.now += 8.0  # past 3/4 of the TTL: this hit starts a background refresh
    assert await value(source) == "v1"
    await settle(source)
    assert await value(source) == "v2"  # rotated value within one TTL, nobody waited
    assert fetches(metrics) == 2
    await source.close()


async def test_concurrent_callers_share_one_fetch(openbao: OpenBao, vault: VaultClient) -> None:
    openbao.client().secrets.kv.v2.create_or_update_secret(
        path="cache/flight", secret={"token": "shared"}
    )
    metrics = Metrics()
    source = kv_source(vault, "cache/flight", metrics, FakeClock())
    identities = [local_identity(f"spiffe://example.org/ns/test/sa/w{i}") for i in range(25)]
    values = await asyncio.gather(*(value(source, ident) for ident in identities))
    assert values == ["shared"] * 25
    assert fetches(metrics) == 1
    await source.close()


async def test_cancelled_caller_does_not_cancel_shared_fetch(
    openbao: OpenBao, vault: VaultClient
) -> None:
    openbao.client().secrets.kv.v2.create_or_update_secret(
        path="cache/cancel", secret={"token": "ok"}
    )
    metrics = Metrics()
    source = kv_source(vault, "cache/cancel", metrics, FakeClock())
    first = asyncio.create_task(value(source))
    second = asyncio.create_task(value(source))
    await asyncio.sleep(0)
    first.cancel()
    assert await second == "ok"
    assert fetches(metrics) == 1
    await source.close()


async def test_vault_down_serves_cache_until_ttl_then_fails_closed(
    openbao_factory, caplog: pytest.LogCaptureFixture
) -> None:
    bao = openbao_factory()
    bao.client().secrets.kv.v2.create_or_update_secret(
        path="down", secret={"token": "cached-tok-81x"}
    )
    vault = VaultClient(bao.address, bao.token, timeout=2.0)
    clock, metrics = FakeClock(), Metrics()
    source = kv_source(vault, "down", metrics, clock, ttl=10.0)
    try:
        assert await value(source) == "cached-tok-81x"
        bao.stop()
        clock.now += 9.0  # refresh-ahead runs, fails; the cached value is still served
        assert await value(source) == "cached-tok-81x"
        await settle(source)
        assert fetches(metrics, "error") == 1
        clock.now += 0.9
        assert await value(source) == "cached-tok-81x"  # no extension, but still inside the TTL
        clock.now += 0.2  # TTL over
        with pytest.raises(CredentialUnavailable, match=r"cannot reach .*vault\.address"):
            await value(source)
        # Callers within the hold-off get the same answer without asking the vault again.
        errors = fetches(metrics, "error")
        with pytest.raises(CredentialUnavailable, match="cannot reach"):
            await value(source)
        assert fetches(metrics, "error") == errors
        clock.now += FAILED_FETCH_HOLDOFF_SECONDS
        with pytest.raises(CredentialUnavailable):
            await value(source)
        assert fetches(metrics, "error") == errors + 1
        assert "cached-tok-81x" not in caplog.text
    finally:
        await source.close()
        await vault.close()


async def test_prime_raises_when_unavailable() -> None:
    source = CachedSource("svc", "env", EnvFetcher({"t": "SIDEKEY_UNSET_VAR"}, {}), 5, Metrics())
    with pytest.raises(CredentialUnavailable, match="SIDEKEY_UNSET_VAR"):
        await source.prime()
    await source.close()
    with pytest.raises(CredentialUnavailable, match="closed"):
        await value(source)


async def test_no_secret_in_repr_or_logs(
    openbao: OpenBao, vault: VaultClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    secret = "kv-secret-9f3a7c"
    openbao.client().secrets.kv.v2.create_or_update_secret(
        path="cache/leak", secret={"token": secret}
    )
    clock = FakeClock()
    source = kv_source(vault, "cache/leak", Metrics(), clock, ttl=1.0)
    async with source.use(ME) as cred:
        assert secret not in repr(cred) and secret not in str(cred)
    clock.now += 0.9
    await value(source)
    await settle(source)
    assert secret not in repr(source) and secret not in source.describe()
    await source.close()
    assert secret not in caplog.text


async def test_hot_path_is_cheap() -> None:
    # A fresh hit must not cost a lock or a context switch. The budget is loose (CI noise);
    # the measured number is in the comment in CachedSource.get().
    source = CachedSource("svc", "env", EnvFetcher({"t": "V"}, {"V": "x"}), 3600, Metrics())
    await source.prime()
    rounds = 20_000
    started = time.perf_counter()
    for _ in range(rounds):
        async with source.use(ME):
            pass
    per_call = (time.perf_counter() - started) / rounds
    await source.close()
    assert per_call < 50e-6, f"{per_call * 1e6:.1f} us per use()"


async def test_close_during_fetch_fails_waiters_closed() -> None:
    started = asyncio.Event()

    async def slow_fetch():
        started.set()
        await asyncio.Event().wait()  # never answers

    source = CachedSource("svc", "env", slow_fetch, 5, Metrics())
    waiter = asyncio.create_task(value(source))
    await started.wait()
    await source.close()
    with pytest.raises(CredentialUnavailable, match="closed"):
        await waiter
