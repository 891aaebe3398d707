"""End to end through the HTTP adapter: real OpenBao, a real upstream, curl and aiohttp clients.

The upstream is an aiohttp server started per test that records every request it receives
before it checks anything, and answers 401 unless the Authorization header carries the
current token from OpenBao; "the upstream got nothing" therefore means no request arrived.
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import json
import logging
import re
import secrets
import ssl
import tempfile
import time
import tracemalloc
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from adapters.http.adapter import _redact
from broker.runtime import Broker
from broker.session.context import ServiceContext
from tests.brokers import base_config, running_broker
from tests.pki import DEFAULT_CLIENT_ID, Pki, client_ssl_context
from tests.servers import OpenBao, free_port

SERVICE = "orders-api"
OTHER_ID = "spiffe://example.org/ns/prod/sa/billing"
# Every wait in these tests is a poll against a deadline, never a fixed sleep.
DEADLINE_SECONDS = 20.0
POLL_SECONDS = 0.05
# Body size for the streaming tests, as the issue asks.
BIG_BODY_BYTES = 50 * 1024 * 1024
BLOCK_BYTES = 64 * 1024
# Far below the 50 MB body: a hop that buffered a whole body would exceed it.
MEMORY_BOUND_BYTES = 20 * 1024 * 1024


# --------------------------------------------------------------------------- the upstream


@dataclass
class Seen:
    method: str
    raw_path: str
    headers: CIMultiDictProxy[str]


@dataclass
class Upstream:
    """A real HTTP(S) API that insists on a bearer token."""

    tokens: set[str] = field(default_factory=set)
    seen: list[Seen] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    url: str = ""
    runner: web.ServerRunner | None = None

    async def start(self, ssl_context: ssl.SSLContext | None = None) -> str:
        self.runner = web.ServerRunner(web.Server(self.handle, access_log=None))
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0, ssl_context=ssl_context)
        await site.start()
        scheme = "https" if ssl_context else "http"
        host = "localhost" if ssl_context else "127.0.0.1"
        self.url = f"{scheme}://{host}:{site.port}"
        return self.url

    async def stop(self) -> None:
        self.release.set()
        if self.runner is not None:
            await self.runner.cleanup()

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        self.seen.append(Seen(request.method, request.raw_path, request.headers))
        self.arrived.set()
        if request.headers.getall("Authorization", []) not in (
            [f"Bearer {t}"] for t in self.tokens
        ):
            return web.Response(status=401, text="upstream: missing or wrong token")
        path = request.path
        if path == "/upload":
            digest, size = hashlib.sha256(), 0
            async for chunk in request.content.iter_chunked(BLOCK_BYTES):
                digest.update(chunk)
                size += len(chunk)
            return web.json_response({"sha256": digest.hexdigest(), "size": size})
        if path == "/download":
            response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
            await response.prepare(request)
            for block in blocks(int(request.query["size"])):
                await response.write(block)
            await response.write_eof()
            return response
        if path == "/truncated":
            # Dies mid-body of a chunked response: only a cut connection can tell the client.
            response = web.StreamResponse()
            await response.prepare(request)
            await response.write(b"x" * 1000)
            assert request.transport is not None
            request.transport.abort()
            return response
        if path == "/slow":
            await self.release.wait()
            return web.Response(text="finally")
        if path == "/hop":
            return web.Response(
                text="hop",
                headers={
                    "Connection": "X-Upstream-Hop",
                    "X-Upstream-Hop": "must not reach the client",
                    "Keep-Alive": "timeout=5",
                    "Proxy-Authenticate": "Basic",
                    "Trailer": "X-Whatever",
                    "X-End-To-End": "kept",
                },
            )
        if path == "/echo-secret":
            # A careless upstream that reflects the credential in a response header.
            return web.Response(
                text="reflected", headers={"X-Debug-Auth": request.headers["Authorization"]}
            )
        body = await request.read()
        response = web.json_response(
            {
                "method": request.method,
                "raw_path": request.raw_path,
                "body": body.decode(),
            },
            status=201 if request.method == "PATCH" else 200,
        )
        response.headers["X-Upstream"] = "yes"
        response.headers.add("Set-Cookie", "a=1; Path=/")
        response.headers.add("Set-Cookie", "b=2; Path=/")
        return response


def blocks(size: int) -> Iterator[bytes]:
    """Deterministic, incompressible-looking content of `size` bytes in 64 KiB blocks."""
    sent = 0
    i = 0
    while sent < size:
        block = (hashlib.sha256(i.to_bytes(8, "big")).digest() * (BLOCK_BYTES // 32))[: size - sent]
        sent += len(block)
        i += 1
        yield block


def blocks_sha256(size: int) -> str:
    digest = hashlib.sha256()
    for block in blocks(size):
        digest.update(block)
    return digest.hexdigest()


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    up = Upstream()
    await up.start()
    try:
        yield up
    finally:
        await up.stop()


# --------------------------------------------------------------------------- the broker


@dataclass
class Secret:
    path: str
    token: str


def put_secret(bao: OpenBao, path: str, **fields: str) -> None:
    bao.client().secrets.kv.v2.create_or_update_secret(path=path, secret=fields)


def new_secret(openbao: OpenBao, upstream: Upstream) -> Secret:
    """A fresh KV secret whose token the upstream accepts."""
    secret = Secret(f"sidekey-http/{uuid.uuid4().hex}", "tok-" + secrets.token_urlsafe(24))
    put_secret(openbao, secret.path, token=secret.token)
    upstream.tokens.add(secret.token)
    return secret


def http_service(
    url: str,
    kv_path: str,
    *,
    ttl: float = 60,
    upstream_extra: dict[str, Any] | None = None,
    inject: dict[str, str] | None = None,
    allow: list[str] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    return {
        "name": SERVICE,
        "adapter": "http",
        "listen": "127.0.0.1:0",
        "client_auth": "mtls",
        "upstream": {"url": url, **(upstream_extra or {})},
        "credentials": {"from": "vault-kv", "path": kv_path, "ttl": ttl},
        "inject": {"headers": inject or {"Authorization": "Bearer {token}"}},
        "allow": allow or [DEFAULT_CLIENT_ID],
        **extra,
    }


@dataclass
class Proxy:
    broker: Broker
    url: str
    audit_path: Path

    def audit(self) -> list[dict[str, Any]]:
        if not self.audit_path.exists():
            return []
        return [json.loads(line) for line in self.audit_path.read_text().splitlines()]

    def events(self, event: str) -> list[dict[str, Any]]:
        return [e for e in self.audit() if e["event"] == event]

    def upstream_errors(self, kind: str) -> float:
        value = self.broker.metrics.registry.get_sample_value(
            "sidekey_upstream_errors_total", {"service": SERVICE, "kind": kind}
        )
        return value or 0.0


@dataclass
class Env:
    """Everything a test needs, as one fixture: the PKI, OpenBao, the upstream, a secret."""

    tmp_path: Path
    pki: Pki
    openbao: OpenBao
    monkeypatch: pytest.MonkeyPatch
    upstream: Upstream
    kv: Secret

    def service(self, **kwargs: Any) -> dict[str, Any]:
        return http_service(self.upstream.url, self.kv.path, **kwargs)

    def proxy(self, service: dict[str, Any] | None = None) -> AbstractAsyncContextManager[Proxy]:
        return proxy(self.tmp_path, self.pki, self.openbao, self.monkeypatch,
                     service or self.service())  # fmt: skip

    def client(self, spiffe_id: str = DEFAULT_CLIENT_ID) -> ssl.SSLContext:
        return client_ssl_context(self.pki, self.pki.client(spiffe_id))


@pytest.fixture
def env(
    tmp_path: Path, pki: Pki, openbao: OpenBao, monkeypatch: pytest.MonkeyPatch, upstream: Upstream
) -> Env:
    return Env(tmp_path, pki, openbao, monkeypatch, upstream, new_secret(openbao, upstream))


@asynccontextmanager
async def proxy(
    tmp_path: Path, pki: Pki, bao: OpenBao, monkeypatch: pytest.MonkeyPatch, service: dict[str, Any]
) -> AsyncIterator[Proxy]:
    audit = tmp_path / "audit.jsonl"
    config = base_config(pki, services=[service], vault=bao, audit=audit)
    async with running_broker(tmp_path, config, monkeypatch, vault=bao) as broker:
        yield Proxy(broker, f"https://{broker.address(SERVICE)}", audit)


@dataclass
class Reply:
    status: int | None
    headers: CIMultiDictProxy[str] | None = None
    body: bytes = b""
    error: str | None = None


async def call(ctx: ssl.SSLContext, url: str, method: str = "GET", **kwargs: Any) -> Reply:
    """One request with a fresh connection; a TLS or connection failure is a Reply too."""
    try:
        async with (
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as session,
            session.request(method, url, **kwargs) as resp,
        ):
            return Reply(resp.status, resp.headers, await resp.read())
    except (aiohttp.ClientError, ssl.SSLError, ConnectionError) as exc:
        return Reply(None, error=repr(exc))


async def curl(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sS", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def curl_tls(pki: Pki, issued: Any | None) -> list[str]:
    args = ["--cacert", str(pki.bundle)]
    if issued is not None:
        args += ["--cert", str(issued.cert), "--key", str(issued.key)]
    return args


async def poll(check: Callable[[], Any], what: str) -> Any:
    """Call async `check` until it returns something truthy, up to the deadline."""
    deadline = time.monotonic() + DEADLINE_SECONDS
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(POLL_SECONDS)


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize(("version", "status_line"), [
    ("--http1.1", "HTTP/1.1 201"), ("--http2", "HTTP/2 201"),
])  # fmt: skip
async def test_curl_call_gets_token_injected_and_passes_request_through(
    env: Env, version: str, status_line: str
) -> None:
    """The same request and the same checks over HTTP/1.1 and HTTP/2 (ALPN h2, curl's
    default over TLS)."""
    tmp_path, pki, upstream, kv = env.tmp_path, env.pki, env.upstream, env.kv
    async with env.proxy() as p:
        rc, out, err = await curl(
            *curl_tls(pki, pki.client()), version,
            "-X", "PATCH", "--data-binary", "hello",
            "-H", "X-Custom: 1",
            "-D", str(tmp_path / "headers.txt"),
            f"{p.url}/v1/items/42?x=1&y=%20z",
        )  # fmt: skip
        assert rc == 0, err
    reply = json.loads(out)
    assert reply == {"method": "PATCH", "raw_path": "/v1/items/42?x=1&y=%20z", "body": "hello"}
    head = (tmp_path / "headers.txt").read_text()
    assert head.startswith(status_line)
    assert "x-upstream: yes" in head.lower()
    assert head.lower().count("set-cookie:") == 2
    [seen] = upstream.seen
    assert seen.headers.getall("Authorization") == [f"Bearer {kv.token}"]
    assert seen.headers["X-Custom"] == "1"
    assert seen.headers["Host"] == upstream.url.removeprefix("http://")
    [event] = p.events("request")
    assert event["spiffe_id"] == DEFAULT_CLIENT_ID
    assert event["decision"] == "allow"
    assert event["method"] == "PATCH"
    assert event["path"] == "/v1/items/42"
    assert event["status"] == 201 and event["upstream_status"] == 201
    assert event["bytes_in"] == 5 and event["bytes_out"] > 0
    assert event["credential"]["provider"] == "vault-kv"
    assert kv.path in event["credential"]["path"]


async def test_client_supplied_authorization_is_replaced(env: Env) -> None:
    pki, kv = env.pki, env.kv
    upstream = env.upstream
    service = http_service(
        upstream.url, kv.path,
        inject={"Authorization": "Bearer {token}", "X-Api-Key": "{token}"},
    )  # fmt: skip
    headers = CIMultiDict(
        [("Authorization", "Bearer forged"), ("authorization", "Basic Zm9vOmJhcg=="),
         ("x-api-key", "forged")]
    )  # fmt: skip
    async with env.proxy(service) as p:
        reply = await call(client_ssl_context(pki, pki.client()), f"{p.url}/x", headers=headers)
    assert reply.status == 200, reply
    [seen] = upstream.seen
    assert seen.headers.getall("Authorization") == [f"Bearer {kv.token}"]
    assert seen.headers.getall("X-Api-Key") == [kv.token]


async def test_identity_is_proven_once_per_keep_alive_connection(env: Env) -> None:
    pki = env.pki
    upstream = env.upstream
    calls = 0
    original = ServiceContext.identify_tls

    def counting(self: ServiceContext, ssl_object: Any) -> Any:
        nonlocal calls
        calls += 1
        return original(self, ssl_object)

    env.monkeypatch.setattr(ServiceContext, "identify_tls", counting)
    async with env.proxy() as p:
        connector = aiohttp.TCPConnector(ssl=client_ssl_context(pki, pki.client()), limit=1)
        async with aiohttp.ClientSession(connector=connector) as session:
            for i in range(3):
                async with session.get(f"{p.url}/n/{i}") as resp:
                    assert resp.status == 200
    assert calls == 1
    assert [s.raw_path for s in upstream.seen] == ["/n/0", "/n/1", "/n/2"]


async def test_every_request_on_a_keep_alive_connection_is_injected_and_audited(
    env: Env,
) -> None:
    # The hot path reuses the rendered headers of a cached credential and a cached timestamp
    # prefix: neither may leak a forged header through or drop an audit line.
    pki, kv, upstream = env.pki, env.kv, env.upstream
    async with env.proxy() as p:
        connector = aiohttp.TCPConnector(ssl=client_ssl_context(pki, pki.client()), limit=1)
        async with aiohttp.ClientSession(connector=connector) as session:
            for i in range(4):
                forged = {"Authorization": f"Bearer forged-{i}"} if i % 2 else {}
                async with session.get(f"{p.url}/k/{i}?q=secret", headers=forged) as resp:
                    assert resp.status == 200
        events = p.events("request")
    assert [s.headers.getall("Authorization") for s in upstream.seen] == [
        [f"Bearer {kv.token}"]
    ] * 4
    assert [e["path"] for e in events] == [f"/k/{i}" for i in range(4)]
    stamps = [e["time"] for e in events]
    assert stamps == sorted(stamps)
    for event, stamp in zip(events, stamps, strict=True):
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", stamp), stamp
        assert None not in event.values()
        assert event["status"] == 200 and event["decision"] == "allow"


async def test_other_identity_is_denied_and_upstream_sees_nothing(env: Env) -> None:
    pki = env.pki
    upstream = env.upstream
    async with env.proxy() as p:
        rc, out, _ = await curl(
            *curl_tls(pki, pki.client(OTHER_ID)), "-w", "\n%{http_code}", f"{p.url}/x"
        )
        deny_events = p.events("deny")
    assert rc == 0
    body, status = out.rsplit("\n", 1)
    assert status == "403"
    assert OTHER_ID in body and SERVICE in body
    assert upstream.seen == []
    assert [e["spiffe_id"] for e in deny_events] == [OTHER_ID]


@pytest.mark.parametrize(
    ("kind", "expect_in_body"),
    [
        ("untrusted-ca", None),
        ("no-certificate", None),
        ("foreign-domain", "outside the trust domain"),
        ("two-uri-sans", "not a valid X.509-SVID"),
        ("ca-flag-leaf", None),
    ],
)
async def test_unproven_callers_are_refused_and_upstream_sees_nothing(
    env: Env, kind: str, expect_in_body: str | None
) -> None:
    pki = env.pki
    upstream = env.upstream
    issued = {
        "untrusted-ca": pki.other_ca_client(),
        "no-certificate": None,
        "foreign-domain": pki.foreign_domain_client(),
        "two-uri-sans": pki.two_uri_client(),
        "ca-flag-leaf": pki.ca_flag_client(),
    }[kind]
    async with env.proxy() as p:
        reply = await call(client_ssl_context(pki, issued), f"{p.url}/x")
        rc, out, _ = await curl(*curl_tls(pki, issued), "-w", "\n%{http_code}", f"{p.url}/x")
    # Refused at the TLS handshake (no reply), for want of a certificate (401, saying how to
    # present one) or by the SVID rules (403), never served.
    assert reply.status in ((401,) if issued is None else (None, 403)), reply
    assert rc != 0 or out.endswith("\n401" if issued is None else "\n403"), out
    if expect_in_body is not None:
        assert reply.status == 403
        assert expect_in_body in reply.body.decode()
    assert upstream.seen == []


async def test_rotated_secret_is_served_after_the_ttl(env: Env) -> None:
    pki, kv = env.pki, env.kv
    upstream = env.upstream
    service = http_service(upstream.url, kv.path, ttl=1)
    ctx = client_ssl_context(pki, pki.client())
    async with env.proxy(service) as p:
        assert (await call(ctx, f"{p.url}/before")).status == 200
        rotated = "tok-" + secrets.token_urlsafe(24)
        upstream.tokens.add(rotated)
        put_secret(env.openbao, kv.path, token=rotated)

        async def sees_rotated() -> bool:
            reply = await call(ctx, f"{p.url}/after")
            assert reply.status == 200, reply
            return bool(upstream.seen[-1].headers["Authorization"] == f"Bearer {rotated}")

        await poll(sees_rotated, "the rotated token to reach the upstream")
        versions = {e["credential"].get("version") for e in p.events("request")}
    assert len(versions) == 2


async def test_openbao_down_serves_cached_value_until_ttl_then_503(
    tmp_path: Path, pki: Pki, monkeypatch: pytest.MonkeyPatch,
    openbao_factory: Callable[[], OpenBao], upstream: Upstream,
) -> None:  # fmt: skip
    bao = openbao_factory()
    token = "tok-" + secrets.token_urlsafe(24)
    put_secret(bao, "down-test", token=token)
    upstream.tokens.add(token)
    # Long enough that the request right after stopping OpenBao is surely inside it.
    ttl = 6
    ctx = client_ssl_context(pki, pki.client())
    async with proxy(
        tmp_path, pki, bao, monkeypatch, http_service(upstream.url, "down-test", ttl=ttl)
    ) as p:
        assert (await call(ctx, f"{p.url}/warm")).status == 200
        fetched = time.monotonic()
        await asyncio.to_thread(bao.stop)
        if time.monotonic() - fetched < ttl - 1:
            cached = await call(ctx, f"{p.url}/cached")
            assert cached.status == 200, cached
        served = 0

        async def refused() -> Reply | None:
            nonlocal served
            reply = await call(ctx, f"{p.url}/after-ttl")
            if reply.status == 200:
                served += 1
            return reply if reply.status == 503 else None

        reply = await poll(refused, "503 once the cached credential expired")
        assert b"no credential is available" in reply.body
        failed = [e for e in p.events("request") if e.get("status") == 503]
    # Only the requests served from the cache reached the upstream; the 503 did not.
    assert [s.raw_path for s in upstream.seen].count("/after-ttl") == served
    assert failed and "credential unavailable" in failed[-1]["error"]
    assert failed[-1]["spiffe_id"] == DEFAULT_CLIENT_ID
    assert token not in json.dumps(failed)


async def test_upstream_down_is_502(env: Env) -> None:
    pki, kv = env.pki, env.kv
    dead = f"http://127.0.0.1:{free_port()}"
    async with env.proxy(http_service(dead, kv.path)) as p:
        reply = await call(client_ssl_context(pki, pki.client()), f"{p.url}/x")
        assert reply.status == 502
        assert b"unreachable" in reply.body
        assert p.upstream_errors("connect") == 1
        [event] = p.events("request")
    assert event["status"] == 502 and "upstream error" in event["error"]


async def test_upstream_too_slow_is_504(env: Env) -> None:
    pki, kv = env.pki, env.kv
    upstream = env.upstream
    service = http_service(upstream.url, kv.path, upstream_extra={"timeout": 0.5})
    async with env.proxy(service) as p:
        started = time.monotonic()
        reply = await call(client_ssl_context(pki, pki.client()), f"{p.url}/slow")
        elapsed = time.monotonic() - started
        assert reply.status == 504
        assert b"did not answer in time" in reply.body
        assert p.upstream_errors("timeout") == 1
        [event] = p.events("request")
    assert elapsed < 5
    assert event["status"] == 504 and "timeout" in event["error"]


async def test_missing_template_field_is_503_with_audit(env: Env) -> None:
    pki, kv = env.pki, env.kv
    upstream = env.upstream
    service = http_service(upstream.url, kv.path, inject={"X-Api-Key": "{api_key}"})
    async with env.proxy(service) as p:
        reply = await call(client_ssl_context(pki, pki.client()), f"{p.url}/x")
        [event] = p.events("request")
    assert reply.status == 503
    assert reply.body == b"sidekey: credential has no field api_key\n"
    assert event["status"] == 503 and event["error"] == "credential has no field api_key"
    assert upstream.seen == []


async def test_streams_50mb_both_ways_with_bounded_memory(env: Env) -> None:
    pki = env.pki
    expected = blocks_sha256(BIG_BODY_BYTES)

    async def body() -> AsyncIterator[bytes]:
        for block in blocks(BIG_BODY_BYTES):
            yield block

    ctx = client_ssl_context(pki, pki.client())
    async with env.proxy() as p:
        tracemalloc.start()
        try:
            tracemalloc.reset_peak()
            async with (
                aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as session,
            ):
                async with session.post(f"{p.url}/upload", data=body()) as resp:
                    assert resp.status == 200
                    assert await resp.json() == {"sha256": expected, "size": BIG_BODY_BYTES}
                upload_peak = tracemalloc.get_traced_memory()[1]
                tracemalloc.reset_peak()
                digest, size = hashlib.sha256(), 0
                async with session.get(f"{p.url}/download?size={BIG_BODY_BYTES}") as resp:
                    assert resp.status == 200
                    async for chunk in resp.content.iter_chunked(BLOCK_BYTES):
                        digest.update(chunk)
                        size += len(chunk)
                download_peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        events = p.events("request")
    assert (digest.hexdigest(), size) == (expected, BIG_BODY_BYTES)
    # Client, broker and upstream all run in this process: the bound covers all three.
    assert upload_peak < MEMORY_BOUND_BYTES, upload_peak
    assert download_peak < MEMORY_BOUND_BYTES, download_peak
    assert [e["bytes_in"] for e in events] == [BIG_BODY_BYTES, 0]
    assert events[1]["bytes_out"] == BIG_BODY_BYTES


async def raw_exchange(pki: Pki, address: str, request: bytes) -> bytes:
    host, port = address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(
        host, int(port), ssl=client_ssl_context(pki, pki.client()), server_hostname=host
    )
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), DEADLINE_SECONDS)
    finally:
        writer.close()


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET http://other.example/ HTTP/1.1\r\nHost: other.example\r\n\r\n", b"400"),
        (b"GET https://127.0.0.1:1/x HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", b"400"),
        (b"CONNECT other.example:443 HTTP/1.1\r\nHost: other.example:443\r\n\r\n", b"405"),
    ],
)
async def test_not_an_open_proxy(env: Env, request_bytes: bytes, status: bytes) -> None:
    pki = env.pki
    upstream = env.upstream
    async with env.proxy() as p:
        response = await raw_exchange(pki, p.broker.address(SERVICE), request_bytes)
    assert response.split(b"\r\n", 1)[0].split(b" ")[1] == status, response
    assert b"sidekey:" in response
    assert upstream.seen == []


async def test_hop_by_hop_headers_are_dropped_both_ways(env: Env) -> None:
    pki = env.pki
    upstream = env.upstream
    headers = {
        "Connection": "keep-alive, X-Client-Hop",
        "X-Client-Hop": "1",
        "Keep-Alive": "timeout=30",
        "TE": "trailers",
        "Proxy-Authorization": "Basic Zm9vOmJhcg==",
        "Upgrade": "h2c",
        "X-End-To-End": "kept",
    }
    async with env.proxy() as p:
        reply = await call(client_ssl_context(pki, pki.client()), f"{p.url}/hop", headers=headers)
    assert reply.status == 200 and reply.headers is not None, reply
    [seen] = upstream.seen
    for name in ("X-Client-Hop", "Keep-Alive", "TE", "Proxy-Authorization", "Upgrade"):
        assert name not in seen.headers, name
    assert "x-client-hop" not in seen.headers.get("Connection", "").lower()
    assert seen.headers["X-End-To-End"] == "kept"
    for name in ("X-Upstream-Hop", "Keep-Alive", "Proxy-Authenticate", "Trailer"):
        assert name not in reply.headers, name
    assert "x-upstream-hop" not in reply.headers.get("Connection", "").lower()
    assert reply.body == b"hop"


async def test_a_response_without_date_gets_one_and_a_dated_one_keeps_its_own(
    env: Env,
) -> None:
    """RFC 9110 6.6.1: a recipient with a clock that forwards a response without Date must
    add one. aiohttp's server always sends Date, so this upstream speaks raw HTTP/1.1."""
    dates = {"/undated": "", "/dated": "Date: Mon, 01 Jan 2024 00:00:00 GMT\r\n"}

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                date = dates[head.split(b" ", 2)[1].decode()]
                writer.write(f"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n{date}\r\nok".encode())
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the broker closed its upstream connection
        finally:
            writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        async with env.proxy(http_service(url, env.kv.path)) as p:
            undated = await call(env.client(), f"{p.url}/undated")
            dated = await call(env.client(), f"{p.url}/dated")
    finally:
        server.close()
        await server.wait_closed()
    assert undated.status == 200 and undated.headers is not None, undated
    [date] = undated.headers.getall("Date")
    assert abs(email.utils.parsedate_to_datetime(date).timestamp() - time.time()) < 60, date
    assert dated.status == 200 and dated.headers is not None, dated
    assert dated.headers.getall("Date") == ["Mon, 01 Jan 2024 00:00:00 GMT"]
    assert undated.body == dated.body == b"ok"


async def test_https_upstream_with_custom_ca(env: Env) -> None:
    tmp_path, pki, kv = env.tmp_path, env.pki, env.kv
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server_ctx)
    ca_file = tmp_path / "upstream-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    secure = Upstream(tokens={kv.token})
    await secure.start(server_ctx)
    ctx = client_ssl_context(pki, pki.client())
    try:
        # ca is relative to the config file's directory.
        verified = http_service(secure.url, kv.path, upstream_extra={"ca": "upstream-ca.pem"})
        async with env.proxy(verified) as p:
            assert (await call(ctx, f"{p.url}/x")).status == 200
        # Without the CA the upstream's certificate does not verify: 502, nothing sent.
        before = len(secure.seen)
        async with env.proxy(http_service(secure.url, kv.path)) as p:
            reply = await call(ctx, f"{p.url}/x")
            assert reply.status == 502 and b"TLS" in reply.body
            assert p.upstream_errors("tls") == 1
        assert len(secure.seen) == before
    finally:
        await secure.stop()


async def test_stop_drains_in_flight_requests(env: Env) -> None:
    pki = env.pki
    upstream = env.upstream
    ctx = client_ssl_context(pki, pki.client())
    async with env.proxy() as p:
        in_flight = asyncio.create_task(call(ctx, f"{p.url}/slow"))
        await asyncio.wait_for(upstream.arrived.wait(), DEADLINE_SECONDS)
        stopping = asyncio.create_task(p.broker.services[SERVICE].adapter.stop(5.0))
        # The listener closes at once; the in-flight request is still being served.
        await poll(lambda: _refused(p.broker.address(SERVICE)), "the listener to stop accepting")
        assert not in_flight.done()
        upstream.release.set()
        reply = await asyncio.wait_for(in_flight, DEADLINE_SECONDS)
        await asyncio.wait_for(stopping, DEADLINE_SECONDS)
    assert reply.status == 200 and reply.body == b"finally"


async def _refused(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    try:
        _, writer = await asyncio.open_connection(host, int(port))
    except OSError:  # refused, or reset by a listener closing mid-accept
        return True
    writer.close()
    return False


async def test_secret_value_never_reaches_logs_audit_or_client(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    tmp_path, pki, upstream, kv = env.tmp_path, env.pki, env.upstream, env.kv
    caplog.set_level(logging.DEBUG)
    good = client_ssl_context(pki, pki.client())
    replies: list[Reply] = []
    service = http_service(upstream.url, kv.path, upstream_extra={"timeout": 0.5})
    async with env.proxy(service) as p:
        replies.append(await call(good, f"{p.url}/ok", method="POST", data=b"payload"))
        replies.append(await call(good, f"{p.url}/echo-secret"))
        replies.append(await call(good, f"{p.url}/slow"))
        replies.append(await call(client_ssl_context(pki, pki.client(OTHER_ID)), f"{p.url}/x"))
        replies.append(await call(client_ssl_context(pki, pki.two_uri_client()), f"{p.url}/x"))
    dead = http_service(f"http://127.0.0.1:{free_port()}", kv.path, inject={
        "Authorization": "Bearer {token}", "X-Missing": "{nope}"})  # fmt: skip
    async with env.proxy(dead) as p:
        replies.append(await call(good, f"{p.url}/missing-field"))
    dead["inject"] = {"headers": {"Authorization": "Bearer {token}"}}
    async with env.proxy(dead) as p:
        replies.append(await call(good, f"{p.url}/down"))
    audit_text = (tmp_path / "audit.jsonl").read_text()
    assert [r.status for r in replies] == [200, 200, 504, 403, 403, 503, 502]
    # The upstream did receive it: the check below is not vacuous.
    assert upstream.seen[0].headers["Authorization"] == f"Bearer {kv.token}"
    assert "X-Debug-Auth" not in (replies[1].headers or {})
    for reply in replies:
        assert kv.token not in reply.body.decode()
        assert reply.headers is not None
        for name, value in reply.headers.items():
            assert kv.token not in name and kv.token not in value
    assert kv.token not in audit_text
    assert kv.token not in caplog.text
    assert any(r.name.startswith("sidekey") for r in caplog.records)


async def test_upstream_dying_mid_body_cuts_the_client_connection(env: Env) -> None:
    async with env.proxy() as p:
        reply = await call(env.client(), f"{p.url}/truncated")
        [event] = p.events("request")
        assert p.upstream_errors("protocol") == 1
    # Not a complete-looking 200: the client sees the response break off.
    assert reply.status is None, reply
    assert event["status"] == 200 and event["upstream_status"] == 200
    assert "mid-response" in event["error"]


async def test_connections_over_max_connections_get_503(env: Env) -> None:
    ctx = env.client()
    async with env.proxy(env.service(max_connections=1)) as p:
        first = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx, limit=1))
        try:
            async with first.get(f"{p.url}/a") as resp:
                assert resp.status == 200
            # `first` keeps its connection open: the service is at its cap of one.
            over = await call(ctx, f"{p.url}/b")
            assert over.status == 503 and b"connection limit" in over.body
        finally:
            await first.close()

        async def admitted() -> bool:
            return (await call(ctx, f"{p.url}/c")).status == 200

        await poll(admitted, "a connection slot to free up")
        rejected = p.broker.metrics.registry.get_sample_value(
            "sidekey_connections_rejected_total", {"service": SERVICE}
        )
    assert rejected is not None and rejected >= 1
    assert "/b" not in [s.raw_path for s in env.upstream.seen]


async def test_curl_upload_with_expect_100_continue(env: Env) -> None:
    size = 2 * 1024 * 1024
    upload = env.tmp_path / "upload.bin"
    with upload.open("wb") as f:
        for block in blocks(size):
            f.write(block)
    async with env.proxy() as p:
        started = time.monotonic()
        rc, out, err = await curl(
            *curl_tls(env.pki, env.pki.client()),
            "-H", "Expect: 100-continue", "--expect100-timeout", "30",
            "--data-binary", f"@{upload}", f"{p.url}/upload",
        )  # fmt: skip
        elapsed = time.monotonic() - started
    assert rc == 0, err
    assert json.loads(out) == {"sha256": blocks_sha256(size), "size": size}
    # The broker answered the Expect itself; curl did not sit out its 30 s timeout.
    assert elapsed < 15
    assert "Expect" not in env.upstream.seen[-1].headers


async def test_client_vanishing_mid_upload_is_not_an_upstream_error(env: Env) -> None:
    async with env.proxy() as p:
        host, port = p.broker.address(SERVICE).rsplit(":", 1)
        _, writer = await asyncio.open_connection(
            host, int(port), ssl=env.client(), server_hostname=host
        )
        writer.write(
            b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n\r\n" + b"y" * 100_000
        )
        await writer.drain()
        await asyncio.wait_for(env.upstream.arrived.wait(), DEADLINE_SECONDS)
        writer.transport.abort()

        async def recorded() -> list[dict[str, Any]]:
            return p.events("request")

        [event] = await poll(recorded, "the request's audit event")
    assert event["error"] == "client disconnected mid-request"
    assert 0 < event["bytes_in"] < 10_000_000
    for kind in ("connect", "timeout", "tls", "protocol"):
        assert p.upstream_errors(kind) == 0


async def test_local_client_auth_over_a_unix_socket(env: Env) -> None:
    service = env.service(
        listen="unix:broker.sock", client_auth="local", local_identity=DEFAULT_CLIENT_ID
    )
    async with env.proxy(service) as p:
        address = p.broker.address(SERVICE)
        assert address == f"unix:{env.tmp_path / 'broker.sock'}"
        connector = aiohttp.UnixConnector(path=address.removeprefix("unix:"))
        async with (
            aiohttp.ClientSession(connector=connector) as session,
            session.get("http://localhost/local") as resp,
        ):
            assert resp.status == 200
        [event] = p.events("request")
    assert env.upstream.seen[-1].headers["Authorization"] == f"Bearer {env.kv.token}"
    assert event["spiffe_id"] == DEFAULT_CLIENT_ID and event["auth_method"] == "local"


async def test_local_rules_attest_curl_by_uid_over_a_unix_socket(env: Env) -> None:
    """`local:` rules (issue 18.2): curl as uid 41000 is the first rule's ID; as another
    uid it is answered 403, naming the uid. The socket gets its socket_mode."""
    sock_dir = Path(tempfile.mkdtemp(prefix="sk-"))  # traversable by the test's uids
    sock_dir.chmod(0o755)
    other = "spiffe://example.org/ns/prod/sa/other"
    service = env.service(
        listen=f"unix:{sock_dir}/api.sock", client_auth="local", socket_mode="0666",
        local=[{"uid": 41000, "id": DEFAULT_CLIENT_ID}, {"uid": 41001, "id": other}],
    )  # fmt: skip
    try:
        async with env.proxy(service) as p:
            assert (sock_dir / "api.sock").stat().st_mode & 0o777 == 0o666
            statuses = []
            for uid in (41000, 41001, 43000):
                proc = await asyncio.create_subprocess_exec(
                    "setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--",
                    "curl", "-sS", "--unix-socket", f"{sock_dir}/api.sock",
                    "-w", "\\n%{http_code}", "http://localhost/local",
                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                )  # fmt: skip
                out, err = await asyncio.wait_for(proc.communicate(), DEADLINE_SECONDS)
                body, _, status = out.decode().rpartition("\n")
                statuses.append(status)
                if uid == 43000:
                    assert "uid 43000" in body, (body, err)
            assert statuses == ["200", "403", "403"]  # 41001's ID is not in `allow`
            events = p.events("request") + p.events("deny")
    finally:
        for child in sock_dir.iterdir():
            child.unlink()
        sock_dir.rmdir()
    assert env.upstream.seen[-1].headers["Authorization"] == f"Bearer {env.kv.token}"
    ids = {e.get("spiffe_id") for e in events}
    assert DEFAULT_CLIENT_ID in ids and other in ids


def test_upstream_error_text_is_redacted_before_log_and_audit() -> None:
    """An upstream can echo the request; error text quoting it must not carry the credential."""
    text = "malformed response: 'Authorization: Bearer tok-1234567890' and again tok-1234567890"
    redacted = _redact(text, ("tok-1234567890", "other-secret"))
    assert "tok-1234567890" not in redacted
    assert redacted.count("[redacted]") == 2 and redacted.startswith("malformed response")
