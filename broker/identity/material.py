"""The broker's own identity material, kept current: its X.509-SVID, the trust bundles of its
trust domain and of every federated one, and the JWT bundles.

One `IdentityMaterial` per broker answers for all of it, whatever the source. Each piece has
exactly one source, chosen by the config (`broker.config.identity`): files (``tls.cert`` and
``tls.key``, ``identity.x509_bundle``, the files of ``identity.federation``), re-read when they
change on disk and on `reload()`; or the SPIFFE Workload API (``identity.workload_api``), whose
watch delivers every rotation. The interface, for the TLS contexts, the JWT verifier and the
vault login alike:

- `snapshot` — a `broker.identity.trust.Snapshot`: ``svid`` (`Svid`: chain, key, SPIFFE ID;
  None until the first arrives), ``bundles`` (trust domain -> `Bundle` of X.509 authorities),
  ``jwt_bundles`` (trust domain -> {key ID: public key}). Immutable: take it once per use.
- `jwt_bundles()` — the JWT authorities per trust domain (the Workload API's; empty with files
  alone), for verifying JWT-SVIDs.
- `subscribe(callback)` — ``callback(snapshot)`` on the event loop after every change (new
  SVID, a bundle that changed); returns the function that unsubscribes. Callbacks must not
  block; an exception in one is logged and does not stop the others.
- `fetch_jwt_svid(audience)` — a JWT-SVID of the broker itself for `audience`, from the
  Workload API (raises `IdentitySourceError` without one).
- `readiness()` — ``(ready, reason)``: not ready until the SVID and the own trust domain's
  bundle have arrived, and again once the SVID expires without a replacement.
- `reload()` — re-read every file now (SIGHUP); safe to call at any time, from the loop.
- `describe()` — what `/inventory` shows: sources, SPIFFE ID, serial, expiry; never a key.

A new SVID or bundle is checked before it replaces the current one (parsed, the key matches
the certificate, OpenSSL loads the pair, the SVID is not expired); a rejected one is logged
and counted, and the current material stays in service.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any

from broker.config import IdentityConfig, TLSConfig
from broker.errors import ConfigError, SidekeyError
from broker.observe.metrics import Metrics

from .files import FileWatch, Stat, read_bundle, read_svid, watches
from .tls import check_loadable
from .trust import FILE, WORKLOAD_API, Bundle, JwtAuthorities, Snapshot, Svid
from .workload_api import JwtSvidToken, WorkloadApiWatch

log = logging.getLogger("sidekey.identity")

# How often the files are checked for a change (a stat() each). cert-manager and spiffe-helper
# renew long before expiry (at 2/3 and 1/2 of the lifetime), so seconds of delay cost nothing.
FILE_POLL_SECONDS = 5.0

Subscriber = Callable[[Snapshot], None]


class IdentitySourceError(SidekeyError):
    """Identity material cannot be had from where the config says it comes from."""


class IdentityMaterial:
    """See the module docstring."""

    def __init__(
        self,
        identity: IdentityConfig,
        tls: TLSConfig | None,
        metrics: Metrics | None = None,
        *,
        poll_seconds: float | None = None,
    ) -> None:
        self.config = identity
        self.trust_domain = identity.trust_domain
        self.metrics = metrics
        self._poll_seconds = FILE_POLL_SECONDS if poll_seconds is None else poll_seconds
        self._snapshot = Snapshot()
        self._subscribers: list[Subscriber] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._expiry_timer: asyncio.TimerHandle | None = None
        # Files: the pair under "svid", each bundle under its trust domain.
        bundle_files: dict[str, Path] = {}
        if identity.x509_bundle is not None:
            bundle_files[identity.trust_domain] = identity.x509_bundle
        bundle_files.update({td: p for td, p in identity.federation.items() if p is not None})
        self._watches: dict[str, FileWatch] = watches(
            tls.cert if tls else None, tls.key if tls else None, bundle_files
        )
        self._bundle_files = bundle_files
        self._tls = tls
        # A rejected state of a piece's files, so one bad write is reported once.
        self._rejected: dict[str, tuple[Stat, ...]] = {}
        self._load_files()
        # The Workload API, for the pieces that have no file (and the JWT bundles).
        self._agent: WorkloadApiWatch | None = None
        self._agent_svid = tls is None
        self._agent_bundles = frozenset(
            td for td in identity.trust_domains if td not in bundle_files
        )
        if identity.workload_api is not None:
            self._agent = WorkloadApiWatch(
                identity.workload_api,
                on_x509=self._from_agent,
                on_jwt=self._from_agent_jwt,
                on_error=self._agent_error,
            )

    # ------------------------------------------------------------------------- reading

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    @property
    def svid(self) -> Svid | None:
        return self._snapshot.svid

    @property
    def bundles(self) -> Mapping[str, Bundle]:
        return self._snapshot.bundles

    def jwt_bundles(self) -> Mapping[str, JwtAuthorities]:
        return self._snapshot.jwt_bundles

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        self._subscribers.append(callback)

        def unsubscribe() -> None:
            if callback in self._subscribers:
                self._subscribers.remove(callback)

        return unsubscribe

    async def fetch_jwt_svid(self, audience: str) -> JwtSvidToken:
        """A JWT-SVID of the broker for `audience`, fresh from the Workload API (cache it for
        its lifetime if you call this often). Raises `IdentitySourceError`."""
        if self._agent is None:
            raise IdentitySourceError(
                "a JWT-SVID of the broker needs identity.workload_api (a SPIFFE Workload API)"
            )
        try:
            return await self._agent.fetch_jwt_svid(audience)
        except Exception as exc:  # py-spiffe's, gRPC's or the socket's
            self._count_error(WORKLOAD_API, "jwt_svid")
            raise IdentitySourceError(
                f"cannot fetch a JWT-SVID for audience {audience!r} from the Workload API at "
                f"{self._agent.endpoint}: {exc}"
            ) from None

    def seconds_to_expiry(self) -> float:
        """Seconds until the SVID's notAfter (negative once past); NaN without one."""
        svid = self._snapshot.svid
        if svid is None:
            return math.nan
        return (svid.expires - datetime.now(UTC)).total_seconds()

    def readiness(self) -> tuple[bool, str | None]:
        snap = self._snapshot
        agent = self._agent
        if snap.svid is None:
            if agent is None:
                return False, "waiting for the broker's X.509-SVID"
            error = agent.stream_errors.get("x509")
            why = f" (last error: {error})" if error else ""
            return False, (
                f"waiting for the broker's X.509-SVID from the Workload API at "
                f"{agent.endpoint}{why}"
            )
        if snap.svid.expires <= datetime.now(UTC):
            return False, (
                f"the broker's certificate ({snap.svid.source}) expired at "
                f"{snap.svid.expires.isoformat()} and no replacement has arrived"
            )
        if self.trust_domain not in snap.bundles:
            return False, f"waiting for the X.509 bundle of trust domain {self.trust_domain}"
        return True, None

    @property
    def ready(self) -> bool:
        return self.readiness()[0]

    def describe(self) -> dict[str, Any]:
        snap = self._snapshot
        svid = snap.svid.describe() if snap.svid else None
        if svid is not None:
            svid["seconds_to_expiry"] = round(self.seconds_to_expiry(), 1)
        bundles: dict[str, Any] = {}
        for td in self.config.trust_domains:
            bundle = snap.bundles.get(td)
            bundles[td] = bundle.describe() if bundle else {"source": self._bundle_source(td)}
        described: dict[str, Any] = {
            "trust_domain": self.trust_domain,
            "svid": svid,
            "bundles": bundles,
            "jwt_bundles": {td: sorted(keys) for td, keys in snap.jwt_bundles.items()},
        }
        agent = self._agent
        if agent is not None:
            described["workload_api"] = {
                "endpoint": agent.endpoint,
                "connected": dict(agent.connected),
                "errors": agent.errors,
                "last_error": agent.last_error,
            }
        return described

    def _bundle_source(self, td: str) -> str:
        path = self._bundle_files.get(td)
        if path is not None:
            return f"file:{path}"
        return self._agent.source if self._agent is not None else WORKLOAD_API

    # ------------------------------------------------------------------------ running

    async def start(self) -> None:
        if self._watches:
            self._spawn(self._watch_files(), "identity-files")
        if self._agent is not None:
            if self._agent_svid or self._agent_bundles:
                self._spawn(self._agent.watch_x509(), "workload-api-x509")
            self._spawn(self._agent.watch_jwt(), "workload-api-jwt")
        self._arm_expiry()

    async def stop(self) -> None:
        if self._expiry_timer is not None:
            self._expiry_timer.cancel()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def reload(self) -> None:
        """Re-read every file now, changed or not (SIGHUP). Problems are logged; the current
        material stays for every piece whose new files are rejected."""
        self._poll_files(force=True)

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _watch_files(self) -> None:
        while True:
            await asyncio.sleep(self._poll_seconds)
            self._poll_files(force=False)

    # ---------------------------------------------------------------------- the files

    def _load_files(self) -> None:
        """The first read, at construction: any problem is a ConfigError (`sidekey check`)."""
        svid: Svid | None = None
        bundles: dict[str, Bundle] = {}
        for piece, watch in self._watches.items():
            watch.seen = watch.current()
            if piece == "svid":
                svid = self._read_svid()
                check_loadable(svid)
            else:
                bundles[piece] = self._read_bundle(piece)
        if svid is not None and svid.expires <= datetime.now(UTC):
            log.warning(
                "the broker's certificate %s expired at %s: clients will refuse it",
                svid.source,
                svid.expires.isoformat(),
            )
        self._snapshot = Snapshot(svid, MappingProxyType(bundles))

    def _read_svid(self) -> Svid:
        assert self._tls is not None
        return read_svid(self._tls.cert, self._tls.key)

    def _read_bundle(self, td: str) -> Bundle:
        where = "identity.x509_bundle" if td == self.trust_domain else f"identity.federation.{td}"
        return read_bundle(td, self._bundle_files[td], where)

    def _poll_files(self, *, force: bool) -> None:
        new_svid: Svid | None = None
        new_bundles: dict[str, Bundle] = {}
        for piece, watch in self._watches.items():
            state = watch.current()
            if not force and (state == watch.seen or state == self._rejected.get(piece)):
                continue
            try:
                if piece == "svid":
                    candidate = self._read_svid()
                    self._check_svid(candidate)
                    new_svid = candidate
                else:
                    new_bundles[piece] = self._read_bundle(piece)
            except (ConfigError, IdentitySourceError) as exc:
                if force or state != self._rejected.get(piece):
                    log.warning("kept the current %s: the new files are rejected: %s", piece, exc)
                    self._count_error(FILE, "rejected")
                self._rejected[piece] = state
                continue
            watch.seen = state
            self._rejected.pop(piece, None)
        self._update(new_svid, new_bundles)

    # ------------------------------------------------------------- the Workload API

    def _from_agent(self, svid: Svid, bundles: Mapping[str, Bundle]) -> None:
        """An X.509 context from the agent (on the loop): take the pieces that have no file."""
        new_svid: Svid | None = None
        if self._agent_svid and not svid.same_as(self._snapshot.svid):
            try:
                self._check_agent_svid(svid)
            except (ConfigError, IdentitySourceError) as exc:
                log.error("refused the Workload API's X.509-SVID: %s", exc)
                self._count_error(WORKLOAD_API, "rejected")
            else:
                new_svid = svid
        wanted = {td: b for td, b in bundles.items() if td in self._agent_bundles}
        for td in sorted(self._agent_bundles - set(bundles)):
            if td != self.trust_domain:
                log.debug("the Workload API delivers no bundle of %s (no federatesWith?)", td)
        self._update(new_svid, wanted)

    def _check_agent_svid(self, svid: Svid) -> None:
        domain = (svid.spiffe_id or "").removeprefix("spiffe://").split("/", 1)[0]
        if domain != self.trust_domain:
            raise IdentitySourceError(
                f"its SPIFFE ID {svid.spiffe_id} is not of identity.trust_domain "
                f"{self.trust_domain}"
            )
        self._check_svid(svid)

    def _from_agent_jwt(self, bundles: Mapping[str, JwtAuthorities]) -> None:
        domains = set(self.config.trust_domains)
        self._update(jwt_bundles={td: keys for td, keys in bundles.items() if td in domains})

    def _agent_error(self, kind: str, error: str) -> None:
        self._count_error(WORKLOAD_API, kind)

    # --------------------------------------------------------------------- updating

    def _check_svid(self, svid: Svid) -> None:
        """Refuse an SVID that must not replace the current one."""
        if svid.expires <= datetime.now(UTC):
            raise IdentitySourceError(
                f"the certificate from {svid.source} expired at {svid.expires.isoformat()}"
            )
        check_loadable(svid)

    def _update(
        self,
        svid: Svid | None = None,
        bundles: Mapping[str, Bundle] | None = None,
        jwt_bundles: Mapping[str, JwtAuthorities] | None = None,
    ) -> None:
        """Apply checked pieces (None and absent keys: unchanged); notify on any change."""
        old = self._snapshot
        changed = False
        new_svid = old.svid
        if svid is not None and not svid.same_as(old.svid):
            if old.svid is not None:
                self._count("svid_rotations", svid.source.split(":", 1)[0])
            log.info(
                "the broker's certificate is now serial %s (%s), expires %s, from %s",
                svid.serial,
                svid.spiffe_id or "not an SVID",
                svid.expires.isoformat(),
                svid.source,
            )
            new_svid, changed = svid, True
        merged = dict(old.bundles)
        for td, bundle in (bundles or {}).items():
            if bundle.same_as(old.bundles.get(td)):
                continue
            if td in old.bundles:
                self._count_bundle(td, "x509", bundle.source.split(":", 1)[0])
            log.info(
                "trust bundle of %s: %d authorities from %s",
                td,
                len(bundle.authorities),
                bundle.source,
            )
            merged[td], changed = bundle, True
        new_jwt = old.jwt_bundles
        if jwt_bundles is not None and dict(jwt_bundles) != dict(old.jwt_bundles):
            for td, keys in jwt_bundles.items():
                if td in old.jwt_bundles and dict(keys) != dict(old.jwt_bundles[td]):
                    self._count_bundle(td, "jwt", WORKLOAD_API)
            log.info(
                "JWT bundles: %s",
                ", ".join(f"{td} ({len(k)} keys)" for td, k in sorted(jwt_bundles.items())),
            )
            new_jwt, changed = MappingProxyType(dict(jwt_bundles)), True
        if not changed:
            return
        self._snapshot = Snapshot(new_svid, MappingProxyType(merged), new_jwt)
        if new_svid is not old.svid:
            self._arm_expiry()
        for callback in list(self._subscribers):
            try:
                callback(self._snapshot)
            except Exception:
                log.exception("identity material subscriber %r failed", callback)

    def _arm_expiry(self) -> None:
        """Log when the current SVID expires without a replacement (readiness says so too)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        if self._expiry_timer is not None:
            self._expiry_timer.cancel()
        svid = self._snapshot.svid
        if svid is None:
            return
        delay = max((svid.expires - datetime.now(UTC)).total_seconds(), 0.0)
        self._expiry_timer = loop.call_later(delay, self._expired, svid)

    def _expired(self, svid: Svid) -> None:
        if self._snapshot.svid is svid:
            log.error(
                "the broker's certificate (serial %s, from %s) expired at %s and no "
                "replacement has arrived: not ready",
                svid.serial,
                svid.source,
                svid.expires.isoformat(),
            )

    # ---------------------------------------------------------------------- metrics

    def _count(self, family: str, source: str) -> None:
        if self.metrics is not None:
            getattr(self.metrics, family).labels(source).inc()

    def _count_bundle(self, td: str, kind: str, source: str) -> None:
        if self.metrics is not None:
            self.metrics.bundle_updates.labels(td, kind, source).inc()

    def _count_error(self, source: str, kind: str) -> None:
        if self.metrics is not None:
            self.metrics.identity_errors.labels(source, kind).inc()
