"""WebSocket through the HTTP adapter: real clients against a real echo upstream.

The upstream is the `websockets` package's server, answering 401 to a handshake without the
injected token and echoing every message; `close-me` makes it close with code 4002. The
clients are `websockets` and Node's `ws` (installed once by scripts/install-node-ws.sh into
~/.cache/sidekey). Frames pass through the broker unparsed, so ping/pong, close codes and a
10 MB message prove the splice, and the upstream's own handshake checks prove the injection.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from websockets.asyncio.client import connect
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.http11 import Request, Response

from tests.brokers import base_config, write_config
from tests.pki import Pki
from tests.servers import OpenBao
from tests.test_http_adapter import (  # the adapter's end-to-end helpers
    DEADLINE_SECONDS,
    OTHER_ID,
    Env,
    Proxy,
    Upstream,
    http_service,
    new_secret,
    poll,
)

REPO = Path(__file__).resolve().parent.parent
BIG_MESSAGE_BYTES = 10 * 1024 * 1024


@pytest.fixture
def env(tmp_path: Path, pki: Pki, openbao: OpenBao, monkeypatch: pytest.MonkeyPatch) -> Env:
    """The adapter tests' Env with a KV secret; each test starts its own echo upstream."""
    unused = Upstream()  # only its token set is used, by new_secret
    return Env(tmp_path, pki, openbao, monkeypatch, unused, new_secret(openbao, unused))


@dataclass
class Echo:
    """A WebSocket echo server that insists on the injected bearer token."""

    token: str
    handshakes: list[Headers] = field(default_factory=list)
    url: str = ""
    server: Server | None = None

    def check(self, connection: ServerConnection, request: Request) -> Response | None:
        self.handshakes.append(request.headers)
        if request.headers.get_all("Authorization") != [f"Bearer {self.token}"]:
            return connection.respond(401, "upstream: missing or wrong token\n")
        return None

    async def echo(self, ws: ServerConnection) -> None:
        async for message in ws:
            if message == "close-me":
                await ws.close(4002, "done")
                return
            await ws.send(message)

    async def start(self) -> None:
        self.server = await serve(
            self.echo, "127.0.0.1", 0, process_request=self.check, max_size=None
        )
        port = next(iter(self.server.sockets)).getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@asynccontextmanager
async def echo_proxy(env: Env, **extra: Any) -> AsyncIterator[tuple[Echo, Proxy, str]]:
    """The echo upstream and a broker in front of it; yields them and the broker's wss URL."""
    echo = Echo(env.kv.token)
    await echo.start()
    try:
        async with env.proxy(http_service(echo.url, env.kv.path, **extra)) as p:
            yield echo, p, p.url.replace("https://", "wss://", 1)
    finally:
        await echo.stop()


async def audited(p: Proxy) -> dict[str, Any]:
    """The one request event, once the spliced session has ended and been audited."""

    async def check() -> list[dict[str, Any]]:
        return p.events("request")

    [event] = await poll(check, "the WebSocket's request event")
    return event


# --------------------------------------------------------------------------- websockets


async def test_websockets_echo_ping_10mb_and_close_code(env: Env) -> None:
    async with echo_proxy(env) as (echo, p, url):
        async with connect(
            f"{url}/chat?room=1",
            ssl=env.client(),
            max_size=None,
            additional_headers={"Authorization": "Bearer forged"},
            open_timeout=DEADLINE_SECONDS,
        ) as ws:
            await ws.send("hello")
            assert await ws.recv() == "hello"
            pong = await ws.ping(b"are you there")
            await asyncio.wait_for(pong, DEADLINE_SECONDS)
            big = os.urandom(BIG_MESSAGE_BYTES)
            await ws.send(big)
            echoed = await asyncio.wait_for(ws.recv(), DEADLINE_SECONDS)
            assert hashlib.sha256(echoed).digest() == hashlib.sha256(big).digest()
            await ws.close(4001, "bye")
        assert ws.close_code == 4001 and ws.close_reason == "bye"
        event = await audited(p)
        trail = p.audit_path.read_text()
    [handshake] = echo.handshakes
    assert env.kv.token not in trail, "the injected credential is nowhere in the audit trail"
    # The client's own Authorization never reaches the upstream; the injected one does, and
    # the WebSocket fields pass through.
    assert handshake.get_all("Authorization") == [f"Bearer {env.kv.token}"]
    assert handshake["Upgrade"].lower() == "websocket"
    assert "Sec-WebSocket-Key" in handshake
    assert event["status"] == 101 and event["upstream_status"] == 101
    assert event["path"] == "/chat" and "error" not in event
    assert event["bytes_in"] > BIG_MESSAGE_BYTES and event["bytes_out"] > BIG_MESSAGE_BYTES


async def test_the_upstream_closing_with_a_code_reaches_the_client(env: Env) -> None:
    async with echo_proxy(env) as (_echo, p, url):
        async with connect(url + "/", ssl=env.client(), open_timeout=DEADLINE_SECONDS) as ws:
            await ws.send("close-me")
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), DEADLINE_SECONDS)
        assert closed.value.rcvd is not None
        assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4002, "done")
        assert (await audited(p))["status"] == 101


async def test_websocket_false_is_a_403_naming_the_setting(env: Env) -> None:
    async with echo_proxy(env, websocket=False) as (echo, p, url):
        with pytest.raises(InvalidStatus) as refused:
            await connect(url + "/", ssl=env.client(), open_timeout=DEADLINE_SECONDS)
        [event] = p.events("request")
    response = refused.value.response
    assert response.status_code == 403
    assert b"websocket: false" in response.body
    assert echo.handshakes == []  # refused before any upstream contact
    assert event["status"] == 403 and "websocket: false" in event["error"]


async def test_an_upstream_that_refuses_the_upgrade_is_answered_as_sent(env: Env) -> None:
    # The credential goes into another header, so the upstream sees no token and says 401.
    async with echo_proxy(env, inject={"X-Api-Key": "{token}"}) as (echo, _p, url):
        with pytest.raises(InvalidStatus) as refused:
            await connect(url + "/", ssl=env.client(), open_timeout=DEADLINE_SECONDS)
    assert refused.value.response.status_code == 401
    assert b"missing or wrong token" in refused.value.response.body
    assert len(echo.handshakes) == 1


async def test_plain_requests_still_work_beside_websockets(env: Env) -> None:
    async with echo_proxy(env) as (_echo, _p, url):
        async with connect(url + "/", ssl=env.client(), open_timeout=DEADLINE_SECONDS) as ws:
            await ws.send(b"\x00binary\xff")
            assert await ws.recv() == b"\x00binary\xff"
        # A second connection after the first ended: nothing was left half taken over.
        async with connect(url + "/", ssl=env.client(), open_timeout=DEADLINE_SECONDS) as ws:
            await ws.send("again")
            assert await ws.recv() == "again"


async def test_aiohttp_websocket_client(env: Env) -> None:
    async with echo_proxy(env) as (_echo, p, url):
        connector = aiohttp.TCPConnector(ssl=env.client())
        async with (
            aiohttp.ClientSession(connector=connector) as session,
            session.ws_connect(url + "/aio", max_msg_size=0, autoping=True) as ws,
        ):
            await ws.send_str("from aiohttp")
            assert (await ws.receive(timeout=DEADLINE_SECONDS)).data == "from aiohttp"
            await ws.send_bytes(b"\x01" * 100_000)
            assert (await ws.receive(timeout=DEADLINE_SECONDS)).data == b"\x01" * 100_000
            await ws.close(code=4003, message=b"aio bye")
        assert ws.close_code == 4003
        assert (await audited(p))["status"] == 101


def masked_text_frame(text: str) -> bytes:
    """One client text frame (RFC 6455 section 5.2: FIN, opcode 1, masked, short length)."""
    payload = text.encode()
    mask = b"\x11\x22\x33\x44"
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([0x81, 0x80 | len(payload)]) + mask + masked


async def test_a_frame_sent_with_the_handshake_is_not_lost(env: Env) -> None:
    # A client may send its first frame right behind its handshake, before the 101: those
    # bytes arrive with the request head and must reach the upstream after the switch.
    async with echo_proxy(env) as (_echo, p, url):
        host, port = url.removeprefix("wss://").rsplit(":", 1)
        reader, writer = await asyncio.open_connection(
            host, int(port), ssl=env.client(), server_hostname="localhost"
        )
        handshake = (
            b"GET /eager HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        writer.write(handshake + masked_text_frame("eager"))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), DEADLINE_SECONDS)
        assert head.startswith(b"HTTP/1.1 101 ")
        # RFC 6455 section 1.3's example key and its accept value.
        assert b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in head
        frame = await asyncio.wait_for(reader.readexactly(2 + 5), DEADLINE_SECONDS)
        assert frame == b"\x81\x05eager"  # the server's echo: unmasked
        writer.transport.abort()
        assert (await audited(p))["status"] == 101


async def test_a_reload_that_denies_the_caller_cuts_its_websocket(env: Env) -> None:
    async with echo_proxy(env) as (echo, p, url):
        async with connect(url + "/", ssl=env.client(), open_timeout=DEADLINE_SECONDS) as ws:
            await ws.send("before")
            assert await ws.recv() == "before"
            service = http_service(echo.url, env.kv.path, allow=[OTHER_ID])
            config = base_config(env.pki, services=[service], vault=env.openbao, audit=p.audit_path)
            write_config(env.tmp_path, config)
            summary = await p.broker.reload()
            assert summary["sessions_closed"] == 1
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), DEADLINE_SECONDS)
        [closed] = p.events("session_closed")
        assert closed["kind"] == "connection" and closed["reason"].startswith("policy reload")
        assert (await audited(p))["status"] == 101


# --------------------------------------------------------------------------- Node's ws


@pytest.fixture(scope="session")
def node_ws() -> Path:
    """Node's ws package, installed once into the cache (scripts/install-node-ws.sh)."""
    out = subprocess.run(
        [str(REPO / "scripts" / "install-node-ws.sh")],
        check=True, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    return Path(out.stdout.strip().splitlines()[-1]) / "node_modules"


async def run_node(node_ws: Path, env: Env, url: str) -> list[dict[str, Any]]:
    client = env.pki.client()
    proc = await asyncio.create_subprocess_exec(
        "node", str(REPO / "tests" / "node" / "ws_client.mjs"), str(node_ws), url,
        str(client.cert), str(client.key), str(env.pki.bundle),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        async with asyncio.timeout(DEADLINE_SECONDS * 2):
            out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()
    return [json.loads(line) for line in out.decode().splitlines()]


async def test_node_ws_echo_ping_10mb_and_close_code(env: Env, node_ws: Path) -> None:
    async with echo_proxy(env) as (echo, p, url):
        steps = await run_node(node_ws, env, f"{url}/node")
        event = await audited(p)
    by_step = {s["step"]: s for s in steps}
    assert [s["step"] for s in steps] == ["open", "text", "pong", "binary", "close"], steps
    assert by_step["text"] == {"step": "text", "data": "hello from ws", "isBinary": False}
    assert by_step["pong"]["data"] == "are you there"
    binary = by_step["binary"]
    assert binary["size"] == BIG_MESSAGE_BYTES and binary["sha256"] == binary["sent"]
    assert (by_step["close"]["code"], by_step["close"]["reason"]) == (4001, "bye")
    assert echo.handshakes[0].get_all("Authorization") == [f"Bearer {env.kv.token}"]
    assert event["status"] == 101 and event["bytes_in"] > BIG_MESSAGE_BYTES


async def test_node_ws_gets_the_403_of_websocket_false(env: Env, node_ws: Path) -> None:
    async with echo_proxy(env, websocket=False) as (_echo, _p, url):
        [step] = await run_node(node_ws, env, f"{url}/node")
    assert step["step"] == "refused" and step["status"] == 403
    assert "websocket: false" in step["body"]
