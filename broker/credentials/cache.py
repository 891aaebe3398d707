"""A TTL cache with single flight and refresh-ahead, for vault-kv, env and file credentials.

A fetched credential is served for `ttl` seconds and never longer. Once `refresh_ahead` of
its TTL has passed, the next caller starts one background refresh and is still served the
cached value; a successful refresh replaces it (so a value rotated at the source is served
within one TTL). A failed refresh leaves the cached value in place until its own TTL ends -
no extension - after which `use()` fetches in the caller's path and, if that fails too,
raises `CredentialUnavailable` (fail closed).

Concurrent callers share one fetch. One credential serves every identity: these providers
have no per-identity secrets (dynamic per-identity credentials are `LeaseManager`'s).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import Any

from broker.credentials import Credential, CredentialSource
from broker.credentials.providers import Fetcher
from broker.errors import CredentialUnavailable
from broker.identity import WorkloadIdentity
from broker.observe.metrics import Metrics

log = logging.getLogger("sidekey.credentials")

# Start a background refresh once this fraction of the TTL has passed: early enough that a
# fetch (ms, or up to vault.timeout) finishes before expiry, late enough not to double the load.
DEFAULT_REFRESH_AHEAD = 0.75
# After a failed refresh, wait this long before the next try, so a down vault is not asked
# again by every caller while the cached value is still good.
REFRESH_RETRY_SECONDS = 1.0
# With nothing valid cached, a failed fetch is reported to callers arriving within this window
# instead of asking the vault again at connection rate; recovery waits at most this long.
FAILED_FETCH_HOLDOFF_SECONDS = 1.0


class _Use:
    """The `use()` context manager. Stateless, so one instance serves every caller.

    A hand-written class, not @asynccontextmanager: no generator per call on the hot path.
    """

    __slots__ = ("_source",)

    def __init__(self, source: CachedSource) -> None:
        self._source = source

    async def __aenter__(self) -> Credential:
        return await self._source.get()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None


class CachedSource(CredentialSource):
    """Cache one credential from `fetch` for `ttl` seconds (see the module docstring)."""

    def __init__(
        self,
        service: str,
        provider: str,
        fetch: Fetcher,
        ttl: float,
        metrics: Metrics,
        *,
        description: str | None = None,
        refresh_ahead: float = DEFAULT_REFRESH_AHEAD,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ttl <= 0:
            raise ValueError("ttl must be positive")
        if not 0 < refresh_ahead <= 1:
            raise ValueError("refresh_ahead must be in (0, 1]")
        self.service = service
        self.provider = provider
        self.ttl = ttl
        self.refresh_ahead = refresh_ahead
        self._fetch = fetch
        self._clock = clock
        self._description = description or f"{provider} (cached {ttl:g}s)"
        self._credential: Credential | None = None
        self._expires = 0.0  # clock time the cached credential stops being served
        self._refresh_at = 0.0  # clock time from which a hit starts a background refresh
        self._inflight: asyncio.Task[Credential] | None = None
        self._failure: str | None = None  # message of the last failed fetch, for the holdoff
        self._failure_until = 0.0
        # The last fetch's error while it is the latest outcome, for status().
        self._last_error: str | None = None
        self._closed = False
        self._use = _Use(self)
        # Bind label values once: .labels() costs a dict lookup and tuple build per call.
        self._hits = metrics.cache_hits.labels(service=service)
        self._misses = metrics.cache_misses.labels(service=service)
        self._fetch_ok = metrics.credential_fetches.labels(
            service=service, provider=provider, outcome="ok"
        )
        self._fetch_error = metrics.credential_fetches.labels(
            service=service, provider=provider, outcome="error"
        )
        self._fetch_seconds = metrics.fetch_seconds.labels(service=service, provider=provider)

    def __repr__(self) -> str:
        return f"CachedSource(service={self.service!r}, {self._description})"

    def describe(self) -> str:
        return self._description

    def use(self, identity: WorkloadIdentity) -> AbstractAsyncContextManager[Credential]:
        return self._use

    def status(self) -> dict[str, Any]:
        now = self._clock()
        if self._credential is not None and now < self._expires:
            state = "refresh_failing" if self._last_error is not None else "valid"
            return {
                "state": state,
                "valid_for_seconds": round(self._expires - now, 1),
                "error": self._last_error,
            }
        return {"state": "none" if self._last_error is None else "unavailable",
                "error": self._last_error}  # fmt: skip

    async def get(self) -> Credential:
        """The cached credential, or a fresh one; raises CredentialUnavailable (fail closed)."""
        # Hot path: two clock comparisons and a counter, no await on a lock. Measured by hand
        # (2 cores, CPython 3.11): 1.5 us per `async with source.use(identity)` on a fresh
        # hit, 1.2 us of it the Prometheus counter's inc(); budget 10 us.
        credential = self._credential
        if credential is not None:
            now = self._clock()
            if now < self._expires:
                self._hits.inc()
                if now >= self._refresh_at and self._inflight is None and not self._closed:
                    self._start_refresh(now)
                return credential
        return await self._get_slow()

    async def prime(self) -> None:
        await self.get()

    async def close(self) -> None:
        self._closed = True
        task, self._inflight = self._inflight, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        self._credential = None

    def holds(self, credential: Credential) -> bool:
        """`credential` is the one being served right now."""
        return self._credential is credential

    def drop(self, credential: Credential) -> None:
        """Stop serving `credential` (if it is the current one): the next `use()` fetches."""
        if self._credential is credential:
            self._credential = None
            self._expires = self._refresh_at = 0.0

    # ------------------------------------------------------------------ internals

    async def _get_slow(self) -> Credential:
        if self._closed:
            raise CredentialUnavailable(f"{self._description}: source is closed")
        self._misses.inc()
        if self._failure is not None and self._clock() < self._failure_until:
            # A new exception each time: re-raising one instance would grow its traceback.
            raise CredentialUnavailable(self._failure)
        task = self._inflight or self._start_fetch()
        try:
            # shield: a caller that gives up (cancelled) must not cancel the fetch others share.
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if task.cancelled() and current is not None and not current.cancelling():
                # close() cancelled the shared fetch, not this caller: fail closed instead of
                # leaking a CancelledError into a connection handler that was not cancelled.
                raise CredentialUnavailable(f"{self._description}: source is closed") from None
            raise

    def _start_refresh(self, now: float) -> None:
        # Not again until the retry delay has passed, should this refresh fail.
        self._refresh_at = now + REFRESH_RETRY_SECONDS
        self._start_fetch()

    def _start_fetch(self) -> asyncio.Task[Credential]:
        task = asyncio.create_task(self._fetch_once(), name=f"fetch-credential-{self.service}")
        self._inflight = task
        task.add_done_callback(self._fetch_done)
        return task

    def _fetch_done(self, task: asyncio.Task[Credential]) -> None:
        if self._inflight is task:
            self._inflight = None
        # Mark a failure retrieved: a background refresh may have no awaiter.
        if not task.cancelled():
            task.exception()

    async def _fetch_once(self) -> Credential:
        started = time.perf_counter()
        try:
            credential = await self._fetch()
        except CredentialUnavailable as exc:
            self._record_failure(exc, started)
            raise
        except Exception as exc:
            # A bug, not a vault answer: its text could hold anything, so report the type only.
            error = CredentialUnavailable(
                f"{self._description}: unexpected {type(exc).__name__} while fetching"
            )
            self._record_failure(error, started)
            raise error from None
        self._fetch_seconds.observe(time.perf_counter() - started)
        self._fetch_ok.inc()
        now = self._clock()
        # A credential that says how long it lives (an access token's expires_in) is served
        # no longer than that, nor than the configured ttl.
        ttl = self.ttl
        if credential.lease_duration is not None:
            ttl = min(ttl, credential.lease_duration)
        self._credential = credential
        self._expires = now + ttl
        self._refresh_at = now + ttl * self.refresh_ahead
        self._failure = None
        self._last_error = None
        return credential

    def _record_failure(self, exc: CredentialUnavailable, started: float) -> None:
        self._fetch_seconds.observe(time.perf_counter() - started)
        self._fetch_error.inc()
        self._last_error = str(exc)
        now = self._clock()
        if self._credential is not None and now < self._expires:
            log.warning(
                "credential refresh failed; serving the cached value for %.1fs more "
                "service=%s error=%s",
                self._expires - now,
                self.service,
                exc,
            )
        else:
            self._failure, self._failure_until = str(exc), now + FAILED_FETCH_HOLDOFF_SECONDS
            log.warning("credential unavailable service=%s error=%s", self.service, exc)
