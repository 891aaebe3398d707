"""The runtime: builds every service from a parsed config, runs them, drains on shutdown.

`Broker(config)` does no IO, so `sidekey check` can build one to validate a config and the
files it references. `start()` binds listeners and primes credentials; `reload()` applies a
new config without dropping what is open (SIGHUP); `stop()` drains in-flight work, revokes
leases and closes the audit trail (SIGTERM).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from broker.config import DEFAULT_DRAIN_SECONDS, Config, ServiceConfig, load_config
from broker.control import DenyWatcher
from broker.credentials import CredentialSource
from broker.credentials.factory import make_source
from broker.credentials.journal import SINGLE_JOURNAL, LeaseJournal, orphaned
from broker.credentials.vault import VaultClient
from broker.credentials.vault_auth import MaterialCertificate, MaterialJwt
from broker.errors import ConfigError, SidekeyError
from broker.governance.denylist import DenyEntry
from broker.governance.posture import Use
from broker.governance.posture import inventory as governance_inventory
from broker.governance.snapshot import effective_policy
from broker.identity.jwks import JwtAuthority
from broker.identity.material import IdentityMaterial
from broker.identity.tls import ServerTLS
from broker.identity.trust import Snapshot
from broker.observe.admin import AdminServer
from broker.observe.audit import AuditLog
from broker.observe.metrics import Metrics
from broker.observe.refusals import RefusalLimiter
from broker.observe.sinks import OtlpSink, SyslogSink
from broker.session.adapter import Adapter, load_adapter
from broker.session.context import ServiceContext
from broker.session.registry import Entry, Registry
from broker.session.siblings import Siblings

log = logging.getLogger("sidekey")

# Retry priming a credential this often while it fails, so readiness recovers by itself.
PRIME_RETRY_SECONDS = 2.0
# What each client_auth asks of a TLS client: a certificate always (mtls), a certificate if
# it has one (mtls+jwt: certificate first, else a token), none (jwt: the token proves it).
# mtls asks with CERT_OPTIONAL too: a certificate that is sent must still chain to the bundle
# (OpenSSL ends the handshake otherwise), but a caller that sends none finishes the handshake
# and is refused in its own protocol, with what is missing and how to present it (psql and
# curl saw only "server closed the connection" / "empty reply" under CERT_REQUIRED, whose
# alert asyncio never flushes). ServiceContext.identify refuses it: no certificate, no
# identity (broker.identity.MissingCertificate).
CLIENT_CERT_MODE = {
    "mtls": ssl.CERT_OPTIONAL,
    "mtls+jwt": ssl.CERT_OPTIONAL,
    "jwt": ssl.CERT_NONE,
}
# Ask the vault whether it answers (token lookup-self) this often: /readyz and
# sidekey_vault_up then say within about this long plus vault.timeout that it is down, and
# /readyz itself never waits on the vault. One cheap call per broker every few seconds.
VAULT_PROBE_SECONDS = 5.0


@dataclass
class VaultHealth:
    """The vault's last health check, as /readyz shows it."""

    reachable: bool | None = None  # None until the first check answered or failed
    error: str | None = None
    checked_at: float | None = None  # time.monotonic() of the last check
    since: float | None = None  # when `reachable` last changed


@dataclass
class Service:
    context: ServiceContext
    adapter: Adapter
    primed: bool = False
    prime_error: str | None = None
    # Ends the service's serving context's subscription to the identity material.
    stop_following: Callable[[], None] | None = None


# Service fields a reload applies in place (the next decision uses them); a change to any
# other field rebuilds the service: its old listener drains while the new one serves.
POLICY_FIELDS: dict[str, Any] = {
    "allow": (),
    "rules": (),
    "owner": None,
    "purpose": None,
    "labels": {},
    "index": 0,
}
# Top-level sections a reload cannot apply to a running broker: a change is logged, and it
# takes effect at the next start.
RESTART_SECTIONS = ("identity", "tls", "vault", "admin", "event_loop", "state_dir")


@dataclass
class Broker:
    """All services of one config, plus the admin server and shared vault client."""

    config: Config
    metrics: Metrics = field(default_factory=Metrics)
    services: dict[str, Service] = field(init=False, default_factory=dict)
    # How long a stop (and a reload's replaced services) lets open work finish.
    drain_timeout: float = DEFAULT_DRAIN_SECONDS
    # Under `workers: N` (broker.supervisor): this worker's number (1..N), carried by its
    # audit lines, and the listening sockets its parent bound, by service name. None: the
    # broker is the whole process and binds its own listeners.
    worker: int | None = None
    sockets: dict[str, socket.socket] = field(default_factory=dict)
    # Under `workers: N`: this worker's socket for the other workers' requests, and theirs.
    siblings: Siblings | None = None
    # This process's lease journal (broker.credentials.journal): under `workers: N` the
    # slot's, from the parent; else `state_dir`'s leases.journal, if there is a state_dir.
    lease_journal: Path | None = None
    # Journals in `state_dir` no process of this broker opens (journal.orphaned), which this
    # one takes over: from the parent, for worker 1; found at start by a single process.
    adopt_journals: list[Path] = field(default_factory=list)

    def __post_init__(self) -> None:
        cfg = self.config
        self.audit = AuditLog(
            cfg.audit.file, chain=cfg.audit.chain, worker=self.worker, required=cfg.audit.required
        )
        self.audit.on_failure = self.metrics.audit_write_failures.labels().inc
        self.refusals = RefusalLimiter(
            cfg.audit.refusal_lines_per_minute,
            lambda fields: self.audit.emit_record("deny_suppressed", fields),
        )
        # Which address each inherited socket was bound for: a reload that moves a service
        # elsewhere binds a socket of its own (a TCP port shared with the other workers).
        self._socket_for = {s.name: s.listen for s in cfg.services if s.name in self.sockets}
        # Started here, not in start(): they open no connection until the first line.
        self._sinks: list[SyslogSink | OtlpSink] = []
        if cfg.audit.syslog is not None:
            self._sinks.append(SyslogSink(cfg.audit.syslog))
        if cfg.audit.otlp is not None:
            self._sinks.append(OtlpSink(cfg.audit.otlp))
        self.audit.sinks.extend(self._sinks)
        # The broker's certificate and trust bundles, from files or the Workload API; every
        # serving context follows its changes, and so does the vault login.
        self.identity = IdentityMaterial(cfg.identity, cfg.tls, self.metrics)
        self.metrics.svid_expiry.set_function(self.identity.seconds_to_expiry)
        self.vault = (
            VaultClient.from_config(
                cfg.vault,
                metrics=self.metrics,
                audit=self.audit,
                # cert auth presents the broker's current SVID; jwt may ask for a JWT-SVID.
                certificate=MaterialCertificate(self.identity),
                jwt_source=MaterialJwt(self.identity),
            )
            if cfg.vault
            else None
        )
        if self.lease_journal is None and self.worker is None and cfg.state_dir is not None:
            self.lease_journal = cfg.state_dir / SINGLE_JOURNAL
        self.live = Registry()
        self.vault_health = VaultHealth()
        self._prime_tasks: set[asyncio.Task[None]] = set()
        self._retiring: set[asyncio.Task[None]] = set()
        self._reload_lock = asyncio.Lock()
        self.admin: AdminServer | None = None
        self._started = False
        self.deny: DenyWatcher | None = None
        if self.vault is not None and cfg.governance.deny_list.enabled:
            self.deny = DenyWatcher(
                self.vault, cfg.governance.deny_list, cfg.governance.watch_interval,
                self._deny_list_changed, up=self.metrics.deny_list_up.labels(),
            )  # fmt: skip
        jwt = cfg.identity.jwt
        self.tokens = JwtAuthority(jwt, self.metrics) if jwt is not None else None
        if self.tokens is not None and self.tokens.uses_workload_api:
            # JWT-SVIDs verified by the Workload API's JWT bundles, as they rotate.
            self.identity.subscribe(self._jwt_bundles_changed)
            self._jwt_bundles_changed(self.identity.snapshot)
        for service in cfg.services:
            self.services[service.name] = self._build(cfg, service)

    def _build(self, cfg: Config, service: ServiceConfig) -> Service:
        adapter_cls = load_adapter(service.adapter, f"{service.where}.adapter")
        server_ssl = None
        stop_following = None
        cert_mode = CLIENT_CERT_MODE.get(service.client_auth)
        if cert_mode is not None:
            # One stable context for the listener, following the identity material.
            server_tls = ServerTLS(
                self.identity.snapshot, verify=cert_mode, where="tls",
                resumption=service.tls_resumption, alpn=adapter_cls.tls_alpn or None,
            )  # fmt: skip
            stop_following = self.identity.subscribe(server_tls.update)
            server_ssl = server_tls.context
        source: CredentialSource = make_source(service, self.vault, self.metrics)
        inherited = (
            self.sockets[service.name]
            if self._socket_for.get(service.name) == service.listen
            else None
        )
        ctx = ServiceContext(
            config=cfg,
            service=service,
            server_ssl=server_ssl,
            credentials=source,
            audit=self.audit,
            metrics=self.metrics,
            log=logging.getLogger(f"sidekey.{service.adapter}"),
            live=self.live,
            refusals=self.refusals,
            material=self.identity,
            tokens=self.tokens if service.jwt is not None else None,
            listen_socket=inherited,
            shared_listen=self.worker is not None,
            siblings=self.siblings,
        )
        adapter = adapter_cls(ctx)
        if service.pool is not None and adapter.describe_pool() is None:
            raise ConfigError(
                f"{service.where}.pool: the {service.adapter} adapter does not pool upstream "
                "sessions"
            )
        return Service(ctx, adapter, stop_following=stop_following)

    @property
    def ready(self) -> bool:
        """Every listener bound, the broker's SVID and bundle in hand and not expired, every
        service's credential fetched at least once, every token issuer's keys loaded, and the
        vault (if any) answering and the broker holding a valid token for it: while it is down
        the broker still serves what it holds, but cannot serve a caller whose credential must
        be fetched."""
        return (
            self._started
            and self.identity.ready
            and all(s.primed for s in self.services.values())
            and (
                self.vault is None
                or (self.vault_health.reachable is not False and self.vault.ready)
            )
            and (self.tokens is None or self.tokens.ready)
        )

    # -- what the admin server shows (broker.observe.admin.AdminView) -------------------------

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Whether the broker is ready, and why (not): no IO, so /readyz answers at once."""
        now = time.monotonic()
        services = {
            name: {
                "primed": svc.primed,
                "error": svc.prime_error,
                "credential": svc.context.credentials.status(),
            }
            for name, svc in self.services.items()
        }
        ready = self.ready
        identity_ready, reason = self.identity.readiness()
        body: dict[str, Any] = {
            "ready": ready,
            "identity": {"ready": identity_ready, "error": reason},
        }
        if self.vault is not None:
            health = self.vault_health
            # The token's state (ready, auth, token_expires_in, or error: why there is none)
            # and the last health check's.
            vault = self.vault.status()
            vault.update(
                reachable=health.reachable,
                checked_seconds_ago=(
                    None if health.checked_at is None else round(now - health.checked_at, 1)
                ),
                state_for_seconds=(None if health.since is None else round(now - health.since, 1)),
            )
            if "error" not in vault:
                vault["error"] = health.error
            body["vault"] = vault
        body["services"] = services
        if self.deny is not None:
            # Not a readiness condition: the last list read stays in force while the vault
            # cannot be read, and taking every broker out of service for it would be worse.
            body["deny_list"] = self.deny.state()
        if self.tokens is not None:
            body["jwt_issuers_not_ready"] = self.tokens.not_ready()
        return ready, body

    def metrics_text(self) -> bytes:
        return self.metrics.render()

    def inventory(self) -> dict[str, Any]:
        services: list[dict[str, Any]] = []
        for name, svc in self.services.items():
            cfg = svc.context.service
            services.append(
                {
                    "name": name,
                    "adapter": cfg.adapter,
                    "listen": svc.adapter.address,
                    "client_auth": cfg.client_auth,
                    "jwt": (
                        {"audience": cfg.jwt.audience, "header": cfg.jwt.header}
                        if cfg.jwt is not None
                        else None
                    ),
                    "allow": list(cfg.allow),
                    "credentials": cfg.credentials.describe(),
                    "credential_source": svc.context.credentials.describe(),
                }
            )
            pool = svc.adapter.describe_pool()
            if pool is not None:
                services[-1]["pool"] = pool
        # Who may reach what, owners, use since start, live leases (broker.governance).
        now = datetime.now(UTC)
        usage = {
            key: Use(datetime.fromtimestamp(u.first, UTC), datetime.fromtimestamp(u.last, UTC),
                     u.calls_24h(now.timestamp()))
            for key, u in self.live.usage().items()
        }  # fmt: skip
        leases = {n: s.context.credentials.leases_of() for n, s in self.services.items()}
        identities = governance_inventory(self.config, usage, now=now, leases=leases)
        inventory: dict[str, Any] = {
            "trust_domain": self.config.identity.trust_domain,
            "identity": self.identity.describe(),
            "services": services,
            "identities": identities["identities"],
            "denied": sorted(self.live.denied),
        }
        if self.tokens is not None:
            inventory["jwt_issuers"] = self.tokens.describe()
        return inventory

    def _jwt_bundles_changed(self, snapshot: Snapshot) -> None:
        assert self.tokens is not None
        if snapshot.jwt_bundles:  # nothing yet is not "no keys": wait for the first
            self.tokens.set_workload_bundles(snapshot.jwt_bundles)

    def address(self, service_name: str) -> str:
        return self.services[service_name].adapter.address

    def reload_identity(self) -> None:
        """Re-read the broker's certificate, key and bundle files now; `reload` (SIGHUP)
        starts with it."""
        self.identity.reload()

    async def start(self) -> None:
        await self.identity.start()
        if self.vault is not None:
            if self.lease_journal is not None:
                # Opened here, not when built: `sidekey check` builds a Broker of the config
                # a running broker holds the journal of.
                journal = LeaseJournal(self.lease_journal)
                adopt = self.adopt_journals
                if self.worker is None and self.config.state_dir is not None:
                    adopt = orphaned(self.config.state_dir, keep={SINGLE_JOURNAL})
                journal.adopt(adopt)
                self.vault.journal = journal
            self.vault.start()  # log in while the listeners bind
        if self.deny is not None:
            # Before the first listener: a broker that starts knows who is offboarded.
            await self.deny.read_once()
            self.deny.start()
        if self.config.admin is not None:
            self.admin = AdminServer(self, self.config.admin.listen)
            await self.admin.start()
        if self.tokens is not None:
            await self.tokens.start()
        if self.siblings is not None:
            await self.siblings.start(self._sibling_request)
        for svc in self.services.values():
            await self._start_service(svc)
        if self.vault is not None:
            task = asyncio.create_task(self._probe_vault(self.vault), name="probe-vault")
            self._prime_tasks.add(task)
            task.add_done_callback(self._prime_tasks.discard)
        self._started = True
        self.audit.emit_record("policy", {"reason": "start", **self._policy()})

    async def _sibling_request(
        self, service: str, topic: str, fields: dict[str, Any], sender: int | None
    ) -> dict[str, Any] | None:
        """Another worker's request (broker.session.siblings), for the service running
        under that name now."""
        svc = self.services.get(service)
        if svc is None:
            return None
        return await svc.adapter.sibling_request(topic, fields, sender)

    async def _start_service(self, svc: Service) -> None:
        await svc.adapter.start()
        log.info(
            "listening service=%s adapter=%s address=%s client_auth=%s credentials=%s",
            svc.context.service.name,
            svc.context.service.adapter,
            svc.adapter.address,
            svc.context.service.client_auth,
            svc.context.service.credentials.describe(),
        )
        task = asyncio.create_task(self._prime(svc), name=f"prime-{svc.context.service.name}")
        self._prime_tasks.add(task)
        task.add_done_callback(self._prime_tasks.discard)

    # -- reload (SIGHUP, `sidekey reload`) ----------------------------------------------------

    async def reload(self, config: Config | None = None) -> dict[str, Any]:
        """Apply a new config (re-read from the same file unless given) without dropping
        what is open, and return what changed.

        Everything that can fail is built before anything is applied: a config that does not
        parse, or whose services cannot be built (`sidekey check` fails on it), raises
        ConfigError and the running config stays as it was. Then: services whose only
        changes are policy take the new rules at once; services with other changes are
        rebuilt (the old listener stops accepting and drains, the new one serves); removed
        services drain; the audit file is reopened (after logrotate, or a new path); a
        `policy` event records the new rules; and every live session or connection the new
        policy denies is closed with a `session_closed` event. One still allowed is untouched.
        """
        async with self._reload_lock:
            # The files of the broker's certificate and bundles, re-read whatever else changed.
            self.reload_identity()
            new = config if config is not None else load_config(self.config.path)
            old = self.config
            retarget: list[tuple[Service, ServiceConfig]] = []
            rebuilt: dict[str, Service] = {}
            for service in new.services:
                current = self.services.get(service.name)
                if current is not None and _same_but_policy(current.context.service, service):
                    retarget.append((current, service))
                else:
                    rebuilt[service.name] = self._build(new, service)
            removed = [n for n in self.services if n not in {s.name for s in new.services}]
            if self.worker is not None:
                # A worker's admin is its parent's private socket, never the file's.
                new = dataclasses.replace(new, admin=old.admin, workers=old.workers)
            restart = [k for k in RESTART_SECTIONS if getattr(old, k) != getattr(new, k)]
            for section in restart:
                log.warning("reload: the %s section changed; it takes effect at restart", section)
            if (old.audit.syslog, old.audit.otlp) != (new.audit.syslog, new.audit.otlp):
                log.warning("reload: audit sinks changed; they take effect at restart")
            new = dataclasses.replace(new, **{k: getattr(old, k) for k in restart})

            self.config = new
            for svc, service in retarget:
                svc.context.retarget(new, service)
            for name in [*removed, *rebuilt]:
                old_svc = self.services.pop(name, None)
                if old_svc is not None:
                    if name in rebuilt:
                        rebuilt[name].adapter.take_over(old_svc.adapter)
                    self._retire(old_svc)
            self._drop_inherited(new)
            await asyncio.sleep(0)  # the retiring listeners close their sockets first
            for name, svc in rebuilt.items():
                self.services[name] = svc
                try:
                    await self._start_service(svc)
                except OSError as exc:
                    svc.prime_error = f"cannot listen on {svc.context.service.listen}: {exc}"
                    log.error("reload: service=%s %s", name, svc.prime_error)
            if old.audit.file != new.audit.file or new.audit.file is not None:
                self.audit.reopen(new.audit.file)
            self.audit.required = new.audit.required
            self.refusals.lines_per_minute = new.audit.refusal_lines_per_minute
            self.audit.emit_record("policy", {"reason": "reload", **self._policy()})
            closed = self.enforce("policy reload")
            summary = {
                "config_sha256": new.digest,
                "updated": [svc.context.service.name for svc, _ in retarget],
                "rebuilt": sorted(rebuilt),
                "removed": removed,
                "restart_needed": restart,
                "sessions_closed": closed,
            }
            log.info("reloaded %s: %s", new.path, summary)
            return summary

    def _drop_inherited(self, config: Config) -> None:
        """Close the sockets inherited for services a reload removed or moved: the retiring
        listener's dup is then the last, and closing it stops the old address accepting."""
        now = {s.name: s.listen for s in config.services}
        for name in [n for n, at in self._socket_for.items() if now.get(n) != at]:
            del self._socket_for[name]
            sock = self.sockets.pop(name, None)
            if sock is not None:
                sock.close()

    def _policy(self) -> dict[str, Any]:
        return {**effective_policy(self.config), "denied": sorted(self.live.denied)}

    # -- the deny list (offboarding) ------------------------------------------------------------

    async def _deny_list_changed(self, entries: dict[str, DenyEntry]) -> None:
        """A new version of the deny list: deny the added identities everywhere at once,
        close their sessions and connections, revoke their leases; lift the removed."""
        before = self.live.denied
        self.live.set_denied(entries)
        self.metrics.offboarded.labels().value = len(entries)
        if not self._started:
            return  # read at start: nothing is open yet, the policy event lists them
        for spiffe_id in [i for i in entries if i not in before]:
            await self._offboard(entries[spiffe_id])
        for spiffe_id in [i for i in before if i not in entries]:
            log.info("onboarded %s: no longer on the deny list", spiffe_id)
            self.audit.emit_record("onboard", {"spiffe_id": spiffe_id})

    async def _offboard(self, entry: DenyEntry) -> None:
        closed = [
            e for e in self.live.of(entry.spiffe_id)
            if self.close_entry(e, f"offboarded: {entry.reason}", "offboard")
        ]  # fmt: skip
        revoked: dict[str, list[str]] = {}
        for name, svc in list(self.services.items()):
            try:
                leases = await svc.context.credentials.revoke_identity(entry.spiffe_id)
            except SidekeyError as exc:
                log.warning("offboarding %s: service=%s %s", entry.spiffe_id, name, exc)
                continue
            if leases:
                revoked[name] = leases
        log.warning(
            "offboarded %s: %d sessions closed, %d leases revoked (reason: %s)",
            entry.spiffe_id, len(closed), sum(map(len, revoked.values())), entry.reason,
        )  # fmt: skip
        self.audit.emit_record(
            "offboard",
            {"spiffe_id": entry.spiffe_id, "reason": entry.reason, "by": entry.by or None,
             "at": entry.at or None, "sessions_closed": len(closed),
             "sessions": [{"service": e.service, "peer": e.peer, "kind": e.kind} for e in closed],
             "leases_revoked": revoked},
        )  # fmt: skip

    def enforce(self, why: str) -> int:
        """Close every live session and connection that policy (and the deny list) now
        refuses, each with a `session_closed` event; returns how many."""
        closed = 0
        for entry in self.live:
            svc = self.services.get(entry.service)
            if svc is None or entry.closed is not None:
                continue  # its service is draining (rebuilt or removed): it ends with it
            decision = svc.context.decide(entry.identity, entry.peer)
            if not decision.allow:
                closed += self.close_entry(entry, f"{why}: {decision.reason}", "reload")
        return closed

    def close_entry(self, entry: Entry, reason: str, why: str) -> int:
        if not entry.close(reason):
            return 0
        self.metrics.sessions_closed.labels(entry.service, why).inc()
        self.audit.emit_record(
            "session_closed",
            {"service": entry.service, "spiffe_id": entry.identity.spiffe_id,
             "peer": entry.peer, "kind": entry.kind, "reason": reason},
        )  # fmt: skip
        return 1

    def _retire(self, svc: Service) -> None:
        """Stop a service in the background: no new connections, open ones drain."""
        if svc.stop_following is not None:
            svc.stop_following()

        async def retire() -> None:
            await svc.adapter.stop(self.drain_timeout)
            await svc.context.credentials.close()

        task = asyncio.create_task(retire(), name=f"retire-{svc.context.service.name}")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _probe_vault(self, vault: VaultClient) -> None:
        """Check the vault every VAULT_PROBE_SECONDS; keep /readyz and sidekey_vault_up true."""
        address = vault.address
        up = self.metrics.vault_up.labels(address)
        health = self.vault_health
        while True:
            if vault.address != address:  # moved to another node of the cluster
                up.value = 0.0
                address = vault.address
                up = self.metrics.vault_up.labels(address)
            error: str | None = None
            try:
                await vault.check()
            except SidekeyError as exc:
                error = str(exc)
            reachable = error is None
            now = time.monotonic()
            if reachable != health.reachable:
                health.since = now
                if reachable:
                    log.info("vault reachable again address=%s", vault.address)
                else:
                    log.warning("vault unreachable address=%s error=%s", vault.address, error)
            health.reachable, health.error, health.checked_at = reachable, error, now
            up.value = 1.0 if reachable else 0.0
            await asyncio.sleep(VAULT_PROBE_SECONDS)

    async def _prime(self, svc: Service) -> None:
        while True:
            try:
                await svc.context.credentials.prime()
            except SidekeyError as exc:
                svc.prime_error = str(exc)
                log.warning(
                    "credential not ready service=%s error=%s", svc.context.service.name, exc
                )
                await asyncio.sleep(PRIME_RETRY_SECONDS)
            else:
                svc.primed, svc.prime_error = True, None
                return

    async def stop(self, drain_timeout: float | None = None) -> None:
        """Drain: stop accepting, let open sessions and requests finish for up to
        `drain_timeout` (the broker's own by default), cut the rest, revoke every lease,
        and close the audit trail with a `stop` event."""
        drain_timeout = self.drain_timeout if drain_timeout is None else drain_timeout
        started = time.monotonic()
        for sock in self.sockets.values():
            # Each listener serves a dup: with these closed, closing the listeners below
            # closes the sockets, and new connections are refused while open ones drain.
            sock.close()
        for task in list(self._prime_tasks):
            task.cancel()
        if self.deny is not None:
            await self.deny.stop()
        await asyncio.gather(
            *(svc.adapter.stop(drain_timeout) for svc in self.services.values()),
            *self._retiring,
            return_exceptions=True,
        )
        for svc in self.services.values():
            try:
                await svc.context.credentials.close()
            except SidekeyError as exc:
                log.warning(
                    "closing credentials service=%s error=%s", svc.context.service.name, exc
                )
        if self.vault is not None:
            await self.vault.close()
        if self.tokens is not None:
            await self.tokens.stop()
        if self.siblings is not None:
            # After the drain: a session that drained until now could be cancelled from a
            # sibling until now.
            await self.siblings.stop()
        if self.admin is not None:
            await self.admin.stop()
        await self.identity.stop()
        took = time.monotonic() - started
        self.refusals.close()  # the counts of refusals not written yet
        self.audit.emit_record("stop", {"drained_seconds": round(took, 3)})
        self.audit.close()
        for sink in self._sinks:
            await asyncio.to_thread(sink.close)  # flushes what is queued, bounded
        log.info("stopped after draining for %.2fs", took)


def _same_but_policy(a: ServiceConfig, b: ServiceConfig) -> bool:
    """True when two configs of a service differ in policy fields only."""
    return dataclasses.replace(a, **POLICY_FIELDS) == dataclasses.replace(b, **POLICY_FIELDS)
