"""Token issuers' keys, fetched and kept fresh, and token verification with its metrics: the
IO side of `broker.identity.jwt` (which stays pure).

Per issuer (`identity.jwt.issuers[]`), the keys come from:

- a file (JWKS or SPIFFE bundle): read at start (so `sidekey check` reports a bad one), then
  again on refresh, off the event loop;
- a URL (JWKS or SPIFFE bundle endpoint), or OIDC discovery (`issuer` +
  ``/.well-known/openid-configuration`` -> ``jwks_uri``): fetched with aiohttp, with a
  timeout, a size cap and no redirects;
- the Workload API: pushed by whoever watches it, through `set_workload_bundles`.

Keys are fetched again every `refresh` seconds (sooner if a SPIFFE bundle's refresh hint says
so), and at once when a token names an unknown `kid`, at most once per
`UNKNOWN_KID_REFRESH_SECONDS` per issuer, with concurrent callers sharing one fetch. A
successful fetch replaces the whole set, so a key the issuer withdrew stops verifying; a
failed one keeps the last good set and is retried with backoff.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from broker.config import JwtConfig, JwtIssuerConfig
from broker.errors import ConfigError
from broker.observe.metrics import Metrics, Value

from .jwt import (
    JwtVerifier,
    KeySet,
    KeySetError,
    TokenError,
    UnknownKey,
    Verified,
    from_public_key,
)
from .tls import client_context
from .workload import WorkloadIdentity

log = logging.getLogger("sidekey.jwt")

# A JWKS or discovery request that has not finished in this long is failing; the last good
# keys stay in use meanwhile. Issuers answer in milliseconds.
FETCH_TIMEOUT_SECONDS = 10.0
# Real key sets are 1-10 KiB (Google's ~2 KiB, Azure AD's ~10 KiB); a larger answer is not a
# key set, and reading it unbounded would let the issuer's host exhaust our memory.
MAX_JWKS_BYTES = 256 * 1024
# Discovery documents are 1-5 KiB.
MAX_DISCOVERY_BYTES = 64 * 1024
# An unknown kid prompts a fetch at most this often per issuer: a caller sending tokens with
# made-up kids must not turn the broker into a request flood against the issuer.
UNKNOWN_KID_REFRESH_SECONDS = 10.0
# After a failed fetch, try again after this long, doubling up to the refresh interval.
RETRY_SECONDS = 5.0
# A token that prompted a fetch waits this long for it before being refused: the fetch
# timeout itself would hold an HTTP request or a database login for too long.
REFRESH_WAIT_SECONDS = 5.0
# Where an OIDC issuer publishes its discovery document (OpenID Connect Discovery 1.0 sec 4).
DISCOVERY_PATH = "/.well-known/openid-configuration"


@dataclass(slots=True)
class _State:
    config: JwtIssuerConfig
    ssl: ssl.SSLContext | None = field(default=None, repr=False)
    loaded: bool = False
    last_kid_fetch: float = float("-inf")  # loop time of the last fetch for an unknown kid
    last_success: float | None = None  # wall-clock time, for the inventory
    last_error: str | None = None
    jwks_uri: str | None = None  # from discovery
    inflight: asyncio.Task[bool] | None = None
    task: asyncio.Task[None] | None = None
    refresh_hint: float | None = None


class JwtAuthority:
    """Every configured issuer's keys, and `verify` for the services that take tokens."""

    def __init__(self, config: JwtConfig, metrics: Metrics) -> None:
        self.config = config
        self.verifier = JwtVerifier(config)
        self.metrics = metrics
        self._states: dict[str, _State] = {}
        self._outcomes: dict[tuple[str, str], Value] = {}
        self._session: aiohttp.ClientSession | None = None
        for cfg in config.issuers:
            state = _State(cfg)
            if cfg.source in ("url", "discovery"):
                state.ssl = client_context(ca=cfg.ca, where=cfg.where)
            self._states[cfg.name] = state
            if cfg.source == "file":
                assert cfg.jwks_file is not None
                # At construction, so `sidekey check` reports a bad file by its key.
                try:
                    keys = _read_jwks_file(cfg.jwks_file)
                except KeySetError as exc:
                    raise ConfigError(f"{cfg.where}.jwks: {cfg.jwks_file}: {exc}") from None
                self._install(state, keys)

    # -- life cycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Fetch what must be fetched, in the background, and keep every set fresh."""
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=FETCH_TIMEOUT_SECONDS),
            # Fetched as they are: no cookies, no proxies from the environment.
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
        )
        for state in self._states.values():
            if state.config.source != "workload_api":
                state.task = asyncio.create_task(
                    self._keep_fresh(state), name=f"jwks-{state.config.name}"
                )

    async def stop(self) -> None:
        tasks: list[asyncio.Task[Any]] = [s.task for s in self._states.values() if s.task]
        tasks += [s.inflight for s in self._states.values() if s.inflight is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def uses_workload_api(self) -> bool:
        """Whether an issuer's keys are the Workload API's JWT bundles."""
        return any(s.config.source == "workload_api" for s in self._states.values())

    @property
    def ready(self) -> bool:
        """Every issuer has had keys at least once."""
        return all(s.loaded for s in self._states.values())

    def not_ready(self) -> dict[str, str]:
        """Issuers without keys yet, and why."""
        return {
            name: s.last_error or "keys not loaded yet"
            for name, s in self._states.items()
            if not s.loaded
        }

    def describe(self) -> list[dict[str, Any]]:
        """Each issuer for the inventory: where its keys come from, which it has, and when."""
        out: list[dict[str, Any]] = []
        for name, s in self._states.items():
            cfg = s.config
            keys = self.verifier.keys(name)
            out.append(
                {
                    "name": name,
                    "auth_method": cfg.method,
                    "issuer": cfg.issuer,
                    "keys_from": cfg.describe_source(),
                    "jwks_uri": s.jwks_uri,
                    "trust_domain": cfg.trust_domain,
                    "spiffe_id": cfg.spiffe_id.text if cfg.spiffe_id else None,
                    "algorithms": list(cfg.algorithms),
                    "key_ids": {td or "*": ks.kids for td, ks in keys.items()},
                    "refreshed_at": s.last_success,
                    "error": s.last_error,
                }
            )
        return out

    # -- verification -----------------------------------------------------------------------

    async def verify(self, token: str, audience: str) -> WorkloadIdentity:
        """The identity `token` proves to a service with `audience`; raises TokenError.
        Counts `sidekey_jwt_verifications_total{issuer,outcome}`."""
        try:
            try:
                result = self.verifier.verify(token, audience)
            except UnknownKey as exc:
                assert exc.issuer is not None  # an unknown key is always some issuer's
                if not await self.refresh(exc.issuer, unknown_kid=True):
                    raise
                result = self.verifier.verify(token, audience)
        except TokenError as exc:
            self._count(exc.issuer or "unknown", exc.outcome)
            raise
        self._count(result.issuer, "cached" if result.cached else "ok")
        return result.identity

    def verify_cached(self, token: str, audience: str) -> Verified:
        """The synchronous verification (cache, then signature), without any fetch."""
        return self.verifier.verify(token, audience)

    def _count(self, issuer: str, outcome: str) -> None:
        child = self._outcomes.get((issuer, outcome))
        if child is None:
            child = self._outcomes[issuer, outcome] = self.metrics.jwt_verifications.labels(
                issuer, outcome
            )
        child.inc()

    # -- keys -------------------------------------------------------------------------------

    def set_workload_bundles(self, bundles: Mapping[str, Mapping[str, object]]) -> None:
        """The Workload API's JWT bundles: trust domain -> {kid: public key}. Replaces what
        the workload_api issuer had; a key left out stops verifying."""
        for state in self._states.values():
            if state.config.source != "workload_api":
                continue
            sets: dict[str, KeySet] = {}
            for domain, authorities in bundles.items():
                keys = []
                for kid, key in authorities.items():
                    try:
                        keys.append(from_public_key(key, kid))
                    except KeySetError as exc:
                        log.warning("JWT bundle of %s: key %s skipped: %s", domain, kid, exc)
                sets[domain] = KeySet.from_keys(keys)
            self._set(state, sets)
            self._refreshed(state, "ok")

    async def refresh(self, name: str, *, unknown_kid: bool = False) -> bool:
        """Fetch issuer `name`'s keys now (sharing a fetch already under way); True if the
        set was replaced. For an unknown kid: at most once per UNKNOWN_KID_REFRESH_SECONDS,
        and the caller waits at most REFRESH_WAIT_SECONDS."""
        state = self._states[name]
        if state.config.source == "workload_api":
            return False  # pushed, never fetched
        if not unknown_kid:
            return await asyncio.shield(self._fetching(state))
        now = asyncio.get_running_loop().time()
        if state.inflight is None:
            if now - state.last_kid_fetch < UNKNOWN_KID_REFRESH_SECONDS:
                return False
            state.last_kid_fetch = now
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation
            # that arrives as the fetch completes, and the caller then never stops.
            async with asyncio.timeout(REFRESH_WAIT_SECONDS):
                return await asyncio.shield(self._fetching(state))
        except TimeoutError:
            return False

    def _fetching(self, state: _State) -> asyncio.Task[bool]:
        """The fetch of `state`'s keys under way, started if there is none."""
        if state.inflight is None:
            task = asyncio.create_task(self._fetch(state), name=f"jwks-fetch-{state.config.name}")
            state.inflight = task

            def done(_task: asyncio.Task[bool]) -> None:
                state.inflight = None

            task.add_done_callback(done)
        return state.inflight

    async def _keep_fresh(self, state: _State) -> None:
        delay = RETRY_SECONDS
        while True:
            await self.refresh(state.config.name)
            if state.last_error is None:
                delay = RETRY_SECONDS
                wait = state.config.refresh
                if state.refresh_hint is not None:
                    wait = max(min(wait, state.refresh_hint), UNKNOWN_KID_REFRESH_SECONDS)
            else:
                wait, delay = delay, min(delay * 2, state.config.refresh)
            await asyncio.sleep(wait)

    async def _fetch(self, state: _State) -> bool:
        """One fetch of `state`'s keys; True if they were installed. Never raises."""
        cfg = state.config
        try:
            if cfg.source == "file":
                assert cfg.jwks_file is not None
                keys = await asyncio.to_thread(_read_jwks_file, cfg.jwks_file)
            else:
                url = cfg.jwks_url
                if cfg.source == "discovery":
                    url = state.jwks_uri = await self._discover(state)
                assert url is not None
                keys = KeySet.from_jwks(await self._get(url, state.ssl, MAX_JWKS_BYTES))
        except (KeySetError, _FetchError) as exc:
            state.last_error = str(exc)
            log.warning("keys of issuer %s not refreshed: %s", cfg.name, exc)
            self._refreshed(state, "error")
            return False
        self._install(state, keys)
        self._refreshed(state, "ok")
        return True

    async def _discover(self, state: _State) -> str:
        cfg = state.config
        assert cfg.issuer is not None
        url = cfg.issuer.rstrip("/") + DISCOVERY_PATH
        try:
            doc = json.loads(await self._get(url, state.ssl, MAX_DISCOVERY_BYTES))
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise _FetchError(f"{url}: not JSON") from None
        if not isinstance(doc, dict):
            raise _FetchError(f"{url}: not a discovery document")
        # OIDC Discovery section 4.3: the document must name exactly the issuer asked for.
        if doc.get("issuer") != cfg.issuer:
            raise _FetchError(
                f"{url}: names issuer {doc.get('issuer')!r}, not {cfg.issuer!r} (set issuer: to "
                "exactly the iss of the tokens)"
            )
        jwks_uri = doc.get("jwks_uri")
        if not isinstance(jwks_uri, str) or not _fetchable(jwks_uri):
            raise _FetchError(f"{url}: jwks_uri is missing or not an https URL")
        return jwks_uri

    async def _get(self, url: str, ssl_context: ssl.SSLContext | None, limit: int) -> bytes:
        assert self._session is not None, "JwtAuthority.start() first"
        use_ssl: ssl.SSLContext | bool = (
            ssl_context if url.startswith("https:") and ssl_context else False
        )
        try:
            async with self._session.get(
                url, ssl=use_ssl, allow_redirects=False, headers={"Accept": "application/json"}
            ) as resp:
                if resp.status != 200:
                    raise _FetchError(f"{url}: HTTP {resp.status}")
                if resp.content_length is not None and resp.content_length > limit:
                    raise _FetchError(f"{url}: larger than {limit} bytes")
                body = bytearray()
                async for chunk in resp.content.iter_chunked(16 * 1024):
                    body += chunk
                    if len(body) > limit:
                        raise _FetchError(f"{url}: larger than {limit} bytes")
                return bytes(body)
        except TimeoutError:
            raise _FetchError(f"{url}: no answer in {FETCH_TIMEOUT_SECONDS:g}s") from None
        except aiohttp.ClientError as exc:
            raise _FetchError(f"{url}: {type(exc).__name__}: {exc}") from None

    def _install(self, state: _State, keys: KeySet) -> None:
        cfg = state.config
        # JWT-SVIDs by their trust domain; an OIDC issuer's one set under "".
        domain = cfg.trust_domain or ""
        state.refresh_hint = keys.refresh_hint
        self._set(state, {domain: keys})

    def _set(self, state: _State, sets: dict[str, KeySet]) -> None:
        name = state.config.name
        before = {td: set(ks.kids) for td, ks in self.verifier.keys(name).items()}
        self.verifier.set_keys(name, sets)
        after = {td: set(ks.kids) for td, ks in sets.items()}
        if before != after:
            log.info(
                "keys of issuer %s: %s",
                name,
                "; ".join(
                    f"{td or '*'}: {', '.join(sorted(k)) or '(none)'}" for td, k in after.items()
                ),
            )
        state.loaded, state.last_error = True, None
        state.last_success = time.time()
        self.metrics.jwks_keys.labels(name).value = float(sum(len(k) for k in sets.values()))

    def _refreshed(self, state: _State, outcome: str) -> None:
        self.metrics.jwks_refreshes.labels(state.config.name, outcome).inc()


class _FetchError(Exception):
    """A key set or discovery document could not be fetched (the message says why)."""


def _read_jwks_file(path: Path) -> KeySet:
    try:
        with path.open("rb") as f:
            data = f.read(MAX_JWKS_BYTES + 1)
    except OSError as exc:
        raise KeySetError(f"cannot read: {exc.strerror}") from None
    if len(data) > MAX_JWKS_BYTES:
        raise KeySetError(f"larger than {MAX_JWKS_BYTES} bytes")
    return KeySet.from_jwks(data)


def _fetchable(url: str) -> bool:
    """https, or http to a loopback address (the rule `identity.jwt` URLs follow)."""
    parts = urlsplit(url)
    if not parts.hostname or parts.scheme not in ("http", "https"):
        return False
    if parts.scheme == "https" or parts.hostname == "localhost":
        return True
    try:
        return ipaddress.ip_address(parts.hostname).is_loopback
    except ValueError:
        return False
