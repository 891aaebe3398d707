"""The runtime and admin server: readiness, metrics, inventory, and `sidekey run` draining on
SIGTERM, against a real upstream and real clients."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import ssl
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.brokers import base_config, running_broker, write_config
from tests.pki import client_ssl_context

ORDERS = "spiffe://example.org/ns/prod/sa/orders"
SECRET = "s3cr3t-" + "x" * 24
# Generous: a loaded 2-core CI box starts a Python process in a few seconds.
DEADLINE_SECONDS = 30.0


class SlowUpstream:
    """A real HTTP upstream; /slow answers after `release` is set (or a deadline passes)."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.started = asyncio.Event()
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/fast", self.fast)
        app.router.add_get("/slow", self.slow)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = self.runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"

    async def fast(self, request: web.Request) -> web.Response:
        return web.Response(text="authorized" if request.headers.get("Authorization") else "no")

    async def slow(self, request: web.Request) -> web.Response:
        self.started.set()
        await asyncio.wait_for(self.release.wait(), DEADLINE_SECONDS)
        return web.Response(text="finished after drain began")


@pytest.fixture
async def upstream() -> AsyncIterator[SlowUpstream]:
    server = SlowUpstream()
    await server.start()
    yield server
    server.release.set()
    assert server.runner is not None
    await server.runner.cleanup()


def service(upstream: SlowUpstream, **changes: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "name": "orders-api",
        "adapter": "http",
        "listen": "127.0.0.1:0",
        "upstream": {"url": upstream.url},
        "credentials": {"from": "env", "fields": {"token": "SIDEKEY_TEST_API_TOKEN"}},
        "inject": {"headers": {"Authorization": "Bearer {token}"}},
        "allow": [ORDERS],
    }
    config.update(changes)
    return config


async def poll_ready(admin: str, want: int = 200) -> dict[str, Any]:
    deadline = time.monotonic() + DEADLINE_SECONDS
    async with aiohttp.ClientSession() as session:
        while True:
            async with session.get(f"http://{admin}/readyz") as resp:
                body: dict[str, Any] = await resp.json()
                if resp.status == want:
                    return body
            assert time.monotonic() < deadline, f"readyz never answered {want}: {body}"
            await asyncio.sleep(0.05)


async def test_admin_health_ready_metrics_inventory(
    tmp_path: Path, pki: Any, upstream: SlowUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SIDEKEY_TEST_API_TOKEN", SECRET)
    config = base_config(pki, services=[service(upstream)], audit=tmp_path / "audit.jsonl")
    async with running_broker(tmp_path, config) as broker:
        assert broker.admin is not None
        admin = broker.admin.address
        ready = await poll_ready(admin)
        assert ready["services"]["orders-api"]["primed"] is True
        ctx = client_ssl_context(pki, pki.client(ORDERS))
        async with aiohttp.ClientSession() as session:
            url = f"https://{broker.address('orders-api')}/fast"
            async with session.get(url, ssl=ctx) as resp:
                assert resp.status == 200 and await resp.text() == "authorized"
            async with session.get(f"http://{admin}/healthz") as resp:
                assert resp.status == 200
            async with session.get(f"http://{admin}/metrics") as resp:
                metrics = await resp.text()
            async with session.get(f"http://{admin}/inventory") as resp:
                inventory = await resp.text()
        assert 'sidekey_requests_total{decision="allow",service="orders-api"} 1.0' in metrics
        assert "sidekey_credential_fetches_total" in metrics
        assert f'openssl="{ssl.OPENSSL_VERSION}"' in metrics  # sidekey_build_info
        listed = json.loads(inventory)["services"][0]
        assert listed["name"] == "orders-api"
        assert listed["allow"] == [ORDERS]
        assert listed["credentials"] == "env:token"
        assert SECRET not in metrics + inventory


async def test_not_ready_until_the_credential_can_be_had(
    tmp_path: Path, pki: Any, upstream: SlowUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SIDEKEY_TEST_API_TOKEN", raising=False)
    config = base_config(pki, services=[service(upstream)])
    async with running_broker(tmp_path, config) as broker:
        assert broker.admin is not None
        body = await poll_ready(broker.admin.address, want=503)
        assert body["ready"] is False
        error = body["services"]["orders-api"]["error"]
        assert "SIDEKEY_TEST_API_TOKEN" in error
        # The broker retries priming: once the variable exists, it becomes ready by itself.
        monkeypatch.setenv("SIDEKEY_TEST_API_TOKEN", SECRET)
        await poll_ready(broker.admin.address, want=200)


async def read_listening(stream: asyncio.StreamReader) -> dict[str, str]:
    """Parse the JSON log lines of `sidekey run` until the service and admin are bound."""
    found: dict[str, str] = {}
    async with asyncio.timeout(DEADLINE_SECONDS):
        while "orders-api" not in found:
            line = await stream.readline()
            assert line, "sidekey run exited before listening"
            entry = json.loads(line)
            msg = entry["msg"]
            if msg.startswith("listening service="):
                fields = dict(part.split("=", 1) for part in msg.split()[1:])
                found[fields["service"]] = fields["address"]
    return found


async def test_sidekey_run_drains_in_flight_requests_on_sigterm(
    tmp_path: Path, pki: Any, upstream: SlowUpstream
) -> None:
    config = base_config(pki, services=[service(upstream)], admin=False)
    path = write_config(tmp_path, config)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "broker", "run", "--config", str(path), "--drain-timeout", "20",
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "SIDEKEY_TEST_API_TOKEN": SECRET},
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        address = (await read_listening(proc.stderr))["orders-api"]
        ctx = client_ssl_context(pki, pki.client(ORDERS))
        async with aiohttp.ClientSession() as session:
            request = asyncio.create_task(
                session.get(f"https://{address}/slow", ssl=ctx).__aenter__()
            )
            await asyncio.wait_for(upstream.started.wait(), DEADLINE_SECONDS)
            proc.send_signal(signal.SIGTERM)
            # Draining: the listener no longer accepts new connections...
            await _wait_refused(address)
            # ...while the request in flight completes once the upstream answers.
            upstream.release.set()
            resp = await asyncio.wait_for(request, DEADLINE_SECONDS)
            assert resp.status == 200
            assert await resp.text() == "finished after drain began"
            resp.release()
        assert await asyncio.wait_for(proc.wait(), DEADLINE_SECONDS) == 0
        logs = (await proc.stderr.read()).decode()
        assert "draining" in logs
        assert SECRET not in logs
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def _wait_refused(address: str) -> None:
    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + DEADLINE_SECONDS
    while time.monotonic() < deadline:
        try:
            _, writer = await asyncio.open_connection(host, int(port))
        except OSError:
            return
        writer.close()
        await asyncio.sleep(0.05)
    raise AssertionError("listener still accepting after SIGTERM")
