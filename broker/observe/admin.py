"""The admin HTTP server: health, readiness, Prometheus metrics, read-only inventory.

Bind it to loopback or a private interface: it reveals identities and credential references
(never values), which is operational information an attacker would like to have.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from aiohttp import web

from broker.config import ListenAddress

if TYPE_CHECKING:
    from broker.runtime import Broker

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class AdminServer:
    def __init__(self, broker: Broker, listen: ListenAddress) -> None:
        self.broker = broker
        self.listen = listen
        app = web.Application()
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/inventory", self.inventory)
        self._runner = web.AppRunner(app, access_log=None)
        self.address = ""

    async def start(self) -> None:
        await self._runner.setup()
        site: web.BaseSite
        if self.listen.path is not None:
            site = web.UnixSite(self._runner, str(self.listen.path))
        else:
            site = web.TCPSite(self._runner, self.listen.host, self.listen.port)
        await site.start()
        server = site._server  # aiohttp keeps the bound server here; port 0 needs it
        sockets = getattr(server, "sockets", None) or []
        if self.listen.path is not None:
            self.address = f"unix:{self.listen.path}"
        elif sockets:
            host, port = sockets[0].getsockname()[:2]
            self.address = f"{host}:{port}"

    async def stop(self) -> None:
        await self._runner.cleanup()

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        services = {
            name: {"primed": svc.primed, "error": svc.prime_error}
            for name, svc in self.broker.services.items()
        }
        ready = self.broker.ready
        return web.json_response(
            {"ready": ready, "services": services}, status=200 if ready else 503
        )

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(
            body=self.broker.metrics.render(), headers={"Content-Type": PROMETHEUS_CONTENT_TYPE}
        )

    async def inventory(self, request: web.Request) -> web.Response:
        services: list[dict[str, Any]] = []
        for name, svc in self.broker.services.items():
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
        body = {"trust_domain": self.broker.config.identity.trust_domain, "services": services}
        return web.Response(text=json.dumps(body, indent=2), content_type="application/json")
