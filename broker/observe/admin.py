"""The admin HTTP server: health, readiness, Prometheus metrics, read-only inventory.

Bind it to loopback or a private interface: it reveals identities and credential references
(never values), which is operational information an attacker would like to have.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Awaitable
from typing import Any, Protocol, TypeVar

from aiohttp import web

from broker.config import ListenAddress
from broker.errors import SidekeyError

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


T = TypeVar("T")


class AdminView(Protocol):
    """What the admin server shows, handed to it by the runtime (it never imports one), or
    by the parent of several workers (broker.supervisor), which asks them: its answers are
    awaitables."""

    def readiness(self) -> tuple[bool, dict[str, Any]] | Awaitable[tuple[bool, dict[str, Any]]]:
        """Whether the broker is ready, and a JSON-able body that says why (not)."""

    def metrics_text(self) -> bytes | Awaitable[bytes]:
        """The Prometheus text exposition."""

    def inventory(self) -> dict[str, Any] | Awaitable[dict[str, Any]]:
        """Services, listeners, rules and credential references (never a value)."""

    async def reload(self) -> dict[str, Any]:
        """Re-read and apply the config file; raises SidekeyError (the old config stays)."""


class AdminServer:
    def __init__(self, view: AdminView, listen: ListenAddress) -> None:
        self.view = view
        self.listen = listen
        app = web.Application()
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/inventory", self.inventory)
        # The one write: re-read the config file the broker was started with (no argument
        # names another file), as SIGHUP does; `sidekey reload` calls it to show the outcome.
        app.router.add_post("/reload", self.reload)
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
        ready, body = await _answer(self.view.readiness())
        return web.json_response(body, status=200 if ready else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(
            body=await _answer(self.view.metrics_text()),
            headers={"Content-Type": PROMETHEUS_CONTENT_TYPE},
        )

    async def reload(self, request: web.Request) -> web.Response:
        try:
            summary = await self.view.reload()
        except SidekeyError as exc:
            return web.json_response({"ok": False, "error": str(exc)}, status=422)
        return web.json_response({"ok": True, **summary})

    async def inventory(self, request: web.Request) -> web.Response:
        try:
            inventory = await _answer(self.view.inventory())
        except SidekeyError as exc:
            return web.json_response({"error": str(exc)}, status=503)
        body = json.dumps(inventory, indent=2)
        return web.Response(text=body, content_type="application/json")


async def _answer(value: T | Awaitable[T]) -> T:
    if inspect.isawaitable(value):
        return await value
    return value
