"""Audit lines to a real rsyslogd (UDP and TCP, RFC 5424) and to an OTLP/HTTP receiver whose
requests are parsed with OpenTelemetry's own protobuf schema (opentelemetry-proto)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from broker.config import load_config
from broker.governance.verify import verify
from broker.runtime import Broker
from tests.brokers import base_config, write_config
from tests.syslog import Rsyslog


def service() -> dict[str, Any]:
    return {
        "name": "api", "adapter": "http", "listen": "127.0.0.1:0",
        "upstream": {"url": "http://127.0.0.1:9"},
        "credentials": {"from": "env", "fields": {"token": "SIDEKEY_TEST_TOKEN"}},
        "inject": {"headers": {"Authorization": "Bearer {token}"}},
        "allow": ["spiffe://example.org/ns/prod/sa/orders"],
    }  # fmt: skip


async def run_broker(tmp_path: Path, pki: Any, audit: dict[str, Any]) -> Path:
    path = tmp_path / "audit.jsonl"
    config = base_config(pki, services=[service()], audit=path)
    config["audit"].update(audit)
    broker = Broker(load_config(write_config(tmp_path, config)))
    await broker.start()
    broker.audit.emit("deny", service="api", spiffe_id="spiffe://example.org/x", reason="test")
    await broker.stop(drain_timeout=1.0)
    return path


@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_lines_reach_rsyslog(
    tmp_path: Path, pki: Any, rsyslog: Rsyslog, transport: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SIDEKEY_TEST_TOKEN", "t")
    port = rsyslog.udp if transport == "udp" else rsyslog.tcp
    path = await run_broker(tmp_path, pki, {"syslog": {
        "address": f"{transport}://127.0.0.1:{port}", "facility": "local3"}})  # fmt: skip
    written = path.read_text().splitlines()
    got = rsyslog.wait_for(len(written))
    assert [g[0] for g in got] == [json.loads(w)["event"] for w in written]  # MSGID
    for (msgid, app, pid, facility, severity, stamp, msg), line in zip(got, written, strict=True):
        assert app == "sidekey" and pid.isdigit() and facility == "local3"
        assert severity == ("notice" if msgid == "deny" else "info")
        assert msg.strip() == line  # the whole line, hash chain included
        assert stamp[:19] == json.loads(line)["time"][:19]
    assert verify([path]).ok


@asynccontextmanager
async def otlp_receiver() -> AsyncIterator[tuple[str, list[Any]]]:
    from google.protobuf import json_format
    from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest

    received: list[Any] = []

    async def handle(request: web.Request) -> web.Response:
        assert request.content_type == "application/json"
        message = json_format.Parse(await request.text(), ExportLogsServiceRequest())
        received.append(message)
        return web.json_response({})

    app = web.Application()
    app.router.add_post("/v1/logs", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}/v1/logs", received
    finally:
        await runner.cleanup()


async def test_lines_reach_an_otlp_receiver(
    tmp_path: Path, pki: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("opentelemetry.proto")
    monkeypatch.setenv("SIDEKEY_TEST_TOKEN", "t")
    async with otlp_receiver() as (url, received):
        otlp = {"endpoint": url, "headers": {"x-tenant": "ops"}}
        path = await run_broker(tmp_path, pki, {"otlp": otlp})
    written = path.read_text().splitlines()
    records = [r for req in received for rl in req.resource_logs for sl in rl.scope_logs
               for r in sl.log_records]  # fmt: skip
    assert [r.body.string_value for r in records] == written
    resource = received[0].resource_logs[0].resource.attributes
    assert {a.key: a.value.string_value for a in resource}["service.name"] == "sidekey"
    events = [json.loads(w)["event"] for w in written]
    assert [r.attributes[0].value.string_value for r in records] == events
    deny = records[events.index("deny")]
    assert deny.severity_text == "NOTICE" and deny.time_unix_nano > 0
