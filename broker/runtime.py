"""The runtime: builds every service from a parsed config, runs them, drains on shutdown.

`Broker(config)` does no IO, so `sidekey check` can build one to validate a config and the
files it references. `start()` binds listeners and primes credentials; `stop()` drains
in-flight work, revokes leases and closes the audit trail.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from broker.config import DEFAULT_DRAIN_SECONDS, Config
from broker.credentials import CredentialSource
from broker.credentials.factory import make_source
from broker.credentials.vault import VaultClient
from broker.errors import SidekeyError
from broker.identity.tls import server_context
from broker.observe.admin import AdminServer
from broker.observe.audit import AuditLog
from broker.observe.metrics import Metrics
from broker.session.adapter import Adapter, load_adapter
from broker.session.context import ServiceContext

log = logging.getLogger("sidekey")

# Retry priming a credential this often while it fails, so readiness recovers by itself.
PRIME_RETRY_SECONDS = 2.0


@dataclass
class Service:
    context: ServiceContext
    adapter: Adapter
    primed: bool = False
    prime_error: str | None = None


@dataclass
class Broker:
    """All services of one config, plus the admin server and shared vault client."""

    config: Config
    metrics: Metrics = field(default_factory=Metrics)
    services: dict[str, Service] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        cfg = self.config
        self.audit = AuditLog(cfg.audit.file)
        self.vault = VaultClient.from_config(cfg.vault) if cfg.vault else None
        self._prime_tasks: set[asyncio.Task[None]] = set()
        self.admin: AdminServer | None = None
        self._started = False
        for service in cfg.services:
            adapter_cls = load_adapter(service.adapter, f"{service.where}.adapter")
            server_ssl = (
                server_context(cfg.tls.cert, cfg.tls.key, cfg.identity.x509_bundle)
                if service.client_auth == "mtls"
                else None
            )
            source: CredentialSource = make_source(service, self.vault, self.metrics)
            ctx = ServiceContext(
                config=cfg,
                service=service,
                server_ssl=server_ssl,
                credentials=source,
                audit=self.audit,
                metrics=self.metrics,
                log=logging.getLogger(f"sidekey.{service.adapter}"),
            )
            self.services[service.name] = Service(ctx, adapter_cls(ctx))

    @property
    def ready(self) -> bool:
        """Every listener bound and every service's credential fetched at least once."""
        return self._started and all(s.primed for s in self.services.values())

    # -- what the admin server shows (broker.observe.admin.AdminView) -------------------------

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        services = {
            name: {"primed": svc.primed, "error": svc.prime_error}
            for name, svc in self.services.items()
        }
        return self.ready, {"ready": self.ready, "services": services}

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
                    "allow": list(cfg.allow),
                    "credentials": cfg.credentials.describe(),
                    "credential_source": svc.context.credentials.describe(),
                }
            )
        return {"trust_domain": self.config.identity.trust_domain, "services": services}

    def address(self, service_name: str) -> str:
        return self.services[service_name].adapter.address

    async def start(self) -> None:
        if self.config.admin is not None:
            self.admin = AdminServer(self, self.config.admin.listen)
            await self.admin.start()
        for svc in self.services.values():
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
        self._started = True

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

    async def stop(self, drain_timeout: float = DEFAULT_DRAIN_SECONDS) -> None:
        started = time.monotonic()
        for task in list(self._prime_tasks):
            task.cancel()
        await asyncio.gather(
            *(svc.adapter.stop(drain_timeout) for svc in self.services.values()),
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
        if self.admin is not None:
            await self.admin.stop()
        self.audit.close()
        log.info("stopped after draining for %.2fs", time.monotonic() - started)
