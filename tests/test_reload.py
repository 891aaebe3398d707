"""Config reload in-process (Broker.reload): HTTP keep-alive connections and services.

The subprocess side (SIGHUP, `sidekey reload`, PostgreSQL sessions, pgbench) is in
test_signals.py; here the same reload is driven directly to look at what it changed.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from broker.config import load_config
from broker.errors import ConfigError
from broker.runtime import Broker
from tests.brokers import base_config, write_config
from tests.pki import DEFAULT_CLIENT_ID, Pki, client_ssl_context

OTHER_ID = "spiffe://example.org/ns/prod/sa/billing"
TIMEOUT = 20.0


@asynccontextmanager
async def upstream() -> AsyncIterator[str]:
    async def handle(request: web.BaseRequest) -> web.Response:
        return web.Response(text=f"hello {request.path}")

    runner = web.ServerRunner(web.Server(handle, access_log=None))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    finally:
        await runner.cleanup()


def http_service(url: str, allow: list[Any], name: str = "orders-api") -> dict[str, Any]:
    return {
        "name": name,
        "adapter": "http",
        "listen": "127.0.0.1:0",
        "upstream": {"url": url},
        "credentials": {"from": "env", "fields": {"token": "SIDEKEY_TEST_TOKEN"}},
        "inject": {"headers": {"Authorization": "Bearer {token}"}},
        "allow": allow,
    }


class KeepAlive:
    """One raw HTTP/1.1 keep-alive connection over mTLS, so a test sees it close."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, address: str, pki: Pki, spiffe_id: str) -> KeepAlive:
        host, _, port = address.rpartition(":")
        ctx = client_ssl_context(pki, pki.client(spiffe_id))
        reader, writer = await asyncio.open_connection(
            host, int(port), ssl=ctx, server_hostname="localhost"
        )
        return cls(reader, writer)

    async def get(self, path: str) -> tuple[int, bytes]:
        self.writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), TIMEOUT)
        status = int(head.split(b" ", 2)[1])
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        return status, await self.reader.readexactly(length)

    async def closed(self) -> bool:
        try:
            return await asyncio.wait_for(self.reader.read(1), TIMEOUT) == b""
        except (ConnectionError, OSError):
            return True

    def close(self) -> None:
        self.writer.close()


@pytest.fixture(autouse=True)
def token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIDEKEY_TEST_TOKEN", "t0k3n-for-tests")


async def test_reload_closes_denied_keepalive_connections_only(tmp_path: Path, pki: Pki) -> None:
    audit = tmp_path / "audit.jsonl"
    async with upstream() as url:
        config = base_config(
            pki, services=[http_service(url, [DEFAULT_CLIENT_ID, OTHER_ID])], audit=audit
        )
        broker = Broker(load_config(write_config(tmp_path, config)))
        await broker.start()
        try:
            address = broker.address("orders-api")
            orders = await KeepAlive.open(address, pki, DEFAULT_CLIENT_ID)
            billing = await KeepAlive.open(address, pki, OTHER_ID)
            assert (await orders.get("/a"))[0] == 200
            assert (await billing.get("/a"))[0] == 200
            assert len(broker.live) == 2

            config["services"] = [http_service(url, [DEFAULT_CLIENT_ID])]
            write_config(tmp_path, config)
            summary = await broker.reload()
            assert summary["updated"] == ["orders-api"] and summary["rebuilt"] == []
            assert summary["sessions_closed"] == 1
            assert await billing.closed()
            # The allowed connection is the same socket, still served; same listener.
            assert await orders.get("/b") == (200, b"hello /b")
            assert broker.address("orders-api") == address
            orders.close()
        finally:
            await broker.stop(drain_timeout=2.0)
    events = [json.loads(line) for line in audit.read_text().splitlines()]
    closed = [e for e in events if e["event"] == "session_closed"]
    assert [(e["spiffe_id"], e["kind"]) for e in closed] == [(OTHER_ID, "connection")]
    assert closed[0]["reason"].startswith("policy reload: ")
    policies = [e for e in events if e["event"] == "policy"]
    assert [p["reason"] for p in policies] == ["start", "reload"]
    assert policies[1]["services"][0]["rules"] == [{"id": DEFAULT_CLIENT_ID}]
    assert policies[0]["config_sha256"] != policies[1]["config_sha256"]
    assert len(policies[1]["config_sha256"]) == 64


async def test_reload_adds_rebuilds_and_removes_services(tmp_path: Path, pki: Pki) -> None:
    async with upstream() as url, upstream() as url2:
        first = http_service(url, [DEFAULT_CLIENT_ID], name="a")
        config = base_config(pki, services=[first, http_service(url, [DEFAULT_CLIENT_ID], "b")])
        broker = Broker(load_config(write_config(tmp_path, config)))
        await broker.start()
        try:
            old_a = broker.address("a")
            kept = await KeepAlive.open(old_a, pki, DEFAULT_CLIENT_ID)
            assert (await kept.get("/x"))[0] == 200
            # a: new upstream (rebuilt, same address); b: removed; c: new.
            config["services"] = [
                {**first, "upstream": {"url": url2}, "listen": old_a},
                http_service(url2, [DEFAULT_CLIENT_ID], "c"),
            ]
            write_config(tmp_path, config)
            summary = await broker.reload()
            assert summary["rebuilt"] == ["a", "c"] and summary["removed"] == ["b"]
            assert set(broker.services) == {"a", "c"}
            fresh = await KeepAlive.open(broker.address("a"), pki, DEFAULT_CLIENT_ID)
            assert (await fresh.get("/y"))[0] == 200
            fresh.close()
            kept.close()
        finally:
            await broker.stop(drain_timeout=2.0)


async def test_reload_refuses_what_check_refuses(tmp_path: Path, pki: Pki) -> None:
    async with upstream() as url:
        config = base_config(pki, services=[http_service(url, [DEFAULT_CLIENT_ID])])
        path = write_config(tmp_path, config)
        broker = Broker(load_config(path))
        await broker.start()
        try:
            before = broker.config
            cases = [
                ({"adapter": "ftp"}, "services[0].adapter: unknown adapter 'ftp'"),
                ({"inject": {"headers": {}}}, "services[0].inject.headers: name at least one"),
                ({"allow": ["spiffe://other.org/x"]}, "outside trust domain"),
            ]
            for change, message in cases:
                config["services"] = [{**http_service(url, [DEFAULT_CLIENT_ID]), **change}]
                write_config(tmp_path, config)
                with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
                    await broker.reload()
                assert broker.config is before
            path.write_text("version: 1\nservices: [")
            with pytest.raises(ConfigError, match="not valid YAML"):
                await broker.reload()
            assert broker.config is before
        finally:
            await broker.stop(drain_timeout=2.0)


async def test_conditions_apply_to_live_callers(tmp_path: Path, pki: Pki) -> None:
    """`from` sees the real peer; a reload that narrows it closes the connection."""
    async with upstream() as url:
        rule = {"id": DEFAULT_CLIENT_ID, "from": ["127.0.0.0/8"]}
        config = base_config(pki, services=[http_service(url, [rule])])
        broker = Broker(load_config(write_config(tmp_path, config)))
        await broker.start()
        try:
            conn = await KeepAlive.open(broker.address("orders-api"), pki, DEFAULT_CLIENT_ID)
            assert (await conn.get("/a"))[0] == 200
            config["services"] = [http_service(url, [{**rule, "from": ["10.0.0.0/8"]}])]
            write_config(tmp_path, config)
            assert (await broker.reload())["sessions_closed"] == 1
            assert await conn.closed()
            again = await KeepAlive.open(broker.address("orders-api"), pki, DEFAULT_CLIENT_ID)
            status, body = await again.get("/a")
            assert status == 403 and b"only when the source address is in 10.0.0.0/8" in body
            again.close()
        finally:
            await broker.stop(drain_timeout=2.0)


def test_governance_config() -> None:
    from broker.config.governance import parse_governance
    from broker.config.section import Section
    from broker.governance.denylist import DenyEntry, decode, encode

    assert parse_governance(Section({}, "")).deny_list.path == "sidekey/deny"
    off = parse_governance(Section({"governance": {"deny_list": False}}, ""))
    assert not off.deny_list.enabled
    custom = parse_governance(
        Section({"governance": {"deny_list": {"path": "x/y"}, "watch_interval": 5}}, "")
    )
    assert (custom.deny_list.mount, custom.deny_list.path, custom.watch_interval) == (
        "secret", "x/y", 5.0,
    )  # fmt: skip
    with pytest.raises(ConfigError, match=r"governance\.deny_list\.colour: unknown key"):
        parse_governance(Section({"governance": {"deny_list": {"colour": 1}}}, ""))
    entry = DenyEntry("spiffe://example.org/a", "why", "2026-12-01T00:00:00+00:00", "me@host")
    assert decode({entry.spiffe_id: encode(entry)}) == {entry.spiffe_id: entry}
    # A hand-edited value that is not JSON still denies, its text the reason.
    assert decode({"spiffe://example.org/b": "leaked"})["spiffe://example.org/b"].reason == "leaked"
