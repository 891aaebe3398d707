"""HTTP/2 and gRPC through the HTTP adapter: real grpcio clients and servers, httpx, curl.

The gRPC upstream is a grpcio (``grpc.aio``) server with generic handlers on raw bytes (no
generated code): it records the metadata of every call and answers UNAUTHENTICATED unless
``authorization`` carries the current token from OpenBao. The broker listens with ALPN h2
and speaks HTTP/2 to it (``upstream.http2: true``): prior knowledge on http, ALPN on https.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import ssl
import time
import tracemalloc
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.events
import h2.settings
import httpx
import pytest

from tests.brokers import base_config, running_broker
from tests.loops import Run
from tests.pki import DEFAULT_CLIENT_ID, Pki, server_ssl_context
from tests.servers import OpenBao
from tests.test_http_adapter import (
    BIG_BODY_BYTES,
    MEMORY_BOUND_BYTES,
    OTHER_ID,
    SERVICE,
    Env,
    Proxy,
    Upstream,
    blocks,
    blocks_sha256,
    curl,
    curl_tls,
    env,
    http_service,
    new_secret,
    proxy,
    upstream,
)
from tests.tokens import ORDERS_ID, SigningIssuer

__all__ = ["env", "upstream"]  # fixtures, imported for pytest

DEADLINE_SECONDS = 20.0
POLL_SECONDS = 0.02
# Messages a streaming call carries each way.
STREAM_MESSAGES = 5


# --------------------------------------------------------------------------- the gRPC upstream


@dataclass
class GrpcUpstream:
    """A real gRPC server (grpcio) that insists on a bearer token in `authorization`."""

    tokens: set[str] = field(default_factory=set)
    metadata: list[dict[str, str]] = field(default_factory=list)
    remaining: list[float | None] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    server: grpc.aio.Server | None = None
    url: str = ""

    async def start(self, pki: Pki | None = None, options: tuple[Any, ...] = ()) -> str:
        self.server = grpc.aio.server(options=options)
        handlers = {
            "Unary": grpc.unary_unary_rpc_method_handler(self.unary),
            "Fail": grpc.unary_unary_rpc_method_handler(self.fail),
            "Slow": grpc.unary_unary_rpc_method_handler(self.slow),
            "Count": grpc.unary_stream_rpc_method_handler(self.count),
            "Chat": grpc.stream_stream_rpc_method_handler(self.chat),
            "Collect": grpc.stream_unary_rpc_method_handler(self.collect),
        }
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("test.Echo", handlers),)
        )
        if pki is None:
            port = self.server.add_insecure_port("127.0.0.1:0")
            self.url = f"http://127.0.0.1:{port}"
        else:
            creds = grpc.ssl_server_credentials(
                [(pki.server.key.read_bytes(), pki.server.cert.read_bytes())]
            )
            port = self.server.add_secure_port("127.0.0.1:0", creds)
            self.url = f"https://localhost:{port}"
        await self.server.start()
        return self.url

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(grace=None)

    async def _check(self, context: grpc.aio.ServicerContext) -> None:
        seen = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
        self.metadata.append(seen)
        self.remaining.append(context.time_remaining())
        if seen.get("authorization") not in {f"Bearer {t}" for t in self.tokens}:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "upstream: wrong token")

    async def unary(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await self._check(context)
        return b"echo:" + request

    async def fail(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await self._check(context)
        context.set_trailing_metadata((("x-order-detail", "gone since tuesday"),))
        await context.abort(grpc.StatusCode.NOT_FOUND, "no such order: " + request.decode())
        raise AssertionError("abort returns never")

    async def slow(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await self._check(context)
        try:
            await asyncio.sleep(DEADLINE_SECONDS)
        except asyncio.CancelledError:
            self.cancelled.append("Slow")
            raise
        return b"too late"

    async def count(
        self, request: bytes, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        await self._check(context)
        try:
            for i in range(int(request)):
                yield str(i).encode()
                if int(request) > STREAM_MESSAGES:
                    await asyncio.sleep(0.05)
        except asyncio.CancelledError:
            self.cancelled.append("Count")
            raise

    async def collect(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> bytes:
        await self._check(context)
        digest, size = hashlib.sha256(), 0
        async for message in requests:
            digest.update(message)
            size += len(message)
        return f"{size} {digest.hexdigest()}".encode()

    async def chat(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        await self._check(context)
        async for message in requests:
            yield message.upper()


@pytest.fixture
async def grpc_upstream() -> AsyncIterator[GrpcUpstream]:
    up = GrpcUpstream()
    await up.start()
    try:
        yield up
    finally:
        await up.stop()


@dataclass
class GrpcEnv:
    """The PKI, OpenBao, a gRPC upstream and a token it accepts."""

    tmp_path: Path
    pki: Pki
    openbao: OpenBao
    monkeypatch: pytest.MonkeyPatch
    upstream: GrpcUpstream
    kv_path: str
    token: str

    def service(self, **extra: Any) -> dict[str, Any]:
        service = http_service(
            self.upstream.url, self.kv_path, upstream_extra={"http2": True},
            inject={"authorization": "Bearer {token}"}, **extra,
        )  # fmt: skip
        return service

    def proxy(self, service: dict[str, Any] | None = None) -> Any:
        return proxy(self.tmp_path, self.pki, self.openbao, self.monkeypatch,
                     service or self.service())  # fmt: skip

    def channel(self, p: Proxy, spiffe_id: str = DEFAULT_CLIENT_ID) -> grpc.aio.Channel:
        issued = self.pki.client(spiffe_id)
        creds = grpc.ssl_channel_credentials(
            root_certificates=self.pki.bundle.read_bytes(),
            private_key=issued.key.read_bytes(),
            certificate_chain=issued.cert.read_bytes(),
        )
        port = p.broker.address(SERVICE).rsplit(":", 1)[1]
        return grpc.aio.secure_channel(f"localhost:{port}", creds)


@pytest.fixture
def genv(
    tmp_path: Path,
    pki: Pki,
    openbao: OpenBao,
    monkeypatch: pytest.MonkeyPatch,
    grpc_upstream: GrpcUpstream,
) -> GrpcEnv:
    holder = Upstream()
    secret = new_secret(openbao, holder)
    grpc_upstream.tokens |= holder.tokens
    return GrpcEnv(tmp_path, pki, openbao, monkeypatch, grpc_upstream, secret.path, secret.token)


async def poll(check: Any, what: str) -> Any:
    deadline = time.monotonic() + DEADLINE_SECONDS
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(POLL_SECONDS)


# --------------------------------------------------------------------------- gRPC


async def test_grpc_unary_streaming_and_bidi_calls_carry_the_injected_credential(
    genv: GrpcEnv,
) -> None:
    async with genv.proxy() as p, genv.channel(p) as channel:
        unary = channel.unary_unary("/test.Echo/Unary")
        assert await unary(b"hello", timeout=10) == b"echo:hello"
        # The client's own authorization never reaches the upstream: the broker's does.
        assert await unary(b"again", metadata=(("authorization", "Bearer mine"),)) == (
            b"echo:again"
        )
        count = channel.unary_stream("/test.Echo/Count")
        got = [m async for m in count(str(STREAM_MESSAGES).encode())]
        assert got == [str(i).encode() for i in range(STREAM_MESSAGES)]
        chat = channel.stream_stream("/test.Echo/Chat")
        call = chat()
        for word in (b"one", b"two", b"three"):
            await call.write(word)
            assert await call.read() == word.upper()  # answered while the call is open
        await call.done_writing()
        assert await call.read() == grpc.aio.EOF
        assert await call.code() == grpc.StatusCode.OK
        live = [e for e in p.broker.live if e.service == SERVICE]
    token = f"Bearer {genv.token}"
    assert [m["authorization"] for m in genv.upstream.metadata] == [token] * 4
    events = p.events("request")
    assert [e["path"] for e in events] == [
        "/test.Echo/Unary", "/test.Echo/Unary", "/test.Echo/Count", "/test.Echo/Chat",
    ]  # fmt: skip
    assert {(e["method"], e["status"], e["upstream_status"]) for e in events} == {
        ("POST", 200, 200)
    }
    assert all(e["spiffe_id"] == DEFAULT_CLIENT_ID and e["decision"] == "allow" for e in events)
    # One channel is one connection: its certificate was proven and registered once.
    assert len(live) == 1


async def test_grpc_status_message_and_trailing_metadata_pass_through(genv: GrpcEnv) -> None:
    async with genv.proxy() as p, genv.channel(p) as channel:
        fail = channel.unary_unary("/test.Echo/Fail")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await fail(b"42", timeout=10)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert caught.value.details() == "no such order: 42"
    assert ("x-order-detail", "gone since tuesday") in tuple(caught.value.trailing_metadata())


async def test_grpc_deadline_reaches_the_upstream_and_expires_as_deadline_exceeded(
    genv: GrpcEnv,
) -> None:
    async with genv.proxy() as p, genv.channel(p) as channel:
        slow = channel.unary_unary("/test.Echo/Slow")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await slow(b"", timeout=1.0)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # The upstream knew the client's deadline (grpc-timeout passed through) and its
        # handler was stopped when it ran out.
        [remaining] = genv.upstream.remaining
        assert remaining is not None and 0 < remaining <= 1.0
        await poll(lambda: "Slow" in genv.upstream.cancelled, "the upstream call to end")
        [event] = await poll(lambda: p.events("request"), "the audit line")
    assert event["path"] == "/test.Echo/Slow"


async def test_a_client_cancelling_a_stream_cancels_it_upstream(genv: GrpcEnv) -> None:
    async with genv.proxy() as p, genv.channel(p) as channel:
        count = channel.unary_stream("/test.Echo/Count")
        call = count(b"1000")
        assert await call.read() == b"0"
        call.cancel()
        await poll(lambda: "Count" in genv.upstream.cancelled, "the upstream stream to end")
        [event] = await poll(lambda: p.events("request"), "the audit line")
        # The channel still works: only that stream was reset.
        assert await channel.unary_unary("/test.Echo/Unary")(b"x", timeout=10) == b"echo:x"
    assert event["error"] == "client reset the stream"


async def test_a_denied_identity_gets_permission_denied_with_the_reason(genv: GrpcEnv) -> None:
    async with genv.proxy() as p, genv.channel(p, OTHER_ID) as channel:
        unary = channel.unary_unary("/test.Echo/Unary")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await unary(b"hello", timeout=10)
        [deny] = p.events("deny")
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert caught.value.details().startswith("sidekey: ") and OTHER_ID in caught.value.details()
    assert deny["spiffe_id"] == OTHER_ID
    assert genv.upstream.metadata == []  # the upstream never saw the call


async def test_grpc_upstream_unreachable_is_unavailable(genv: GrpcEnv) -> None:
    service = genv.service()
    service["upstream"]["url"] = "http://127.0.0.1:9"  # discard port: nothing listens
    async with genv.proxy(service) as p, genv.channel(p) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await channel.unary_unary("/test.Echo/Unary")(b"x", timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "unreachable" in caught.value.details()


async def test_grpc_over_tls_to_the_upstream_negotiates_h2_by_alpn(
    tmp_path: Path, pki: Pki, openbao: OpenBao, monkeypatch: pytest.MonkeyPatch
) -> None:
    up = GrpcUpstream()
    await up.start(pki)
    try:
        holder = Upstream()
        secret = new_secret(openbao, holder)
        up.tokens |= holder.tokens
        genv = GrpcEnv(tmp_path, pki, openbao, monkeypatch, up, secret.path, secret.token)
        service = genv.service()
        service["upstream"]["ca"] = str(pki.bundle)
        async with genv.proxy(service) as p, genv.channel(p) as channel:
            assert await channel.unary_unary("/test.Echo/Unary")(b"tls", timeout=10) == (
                b"echo:tls"
            )
    finally:
        await up.stop()
    assert up.metadata[0]["authorization"] == f"Bearer {secret.token}"


def test_grpc_calls_under_both_event_loops(
    run: Run, tmp_path: Path, pki: Pki, openbao: OpenBao, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The broker's default loop is uvloop, whose TLS transport reads into the broker's
    buffer and reports ALPN its own way; the rest of this file runs on asyncio's."""

    async def body() -> None:
        up = GrpcUpstream()
        await up.start()
        try:
            holder = Upstream()
            secret = new_secret(openbao, holder)
            up.tokens |= holder.tokens
            genv = GrpcEnv(tmp_path, pki, openbao, monkeypatch, up, secret.path, secret.token)
            async with genv.proxy() as p, genv.channel(p) as channel:
                assert await channel.unary_unary("/test.Echo/Unary")(b"u", timeout=10) == (
                    b"echo:u"
                )
                chat = channel.stream_stream("/test.Echo/Chat")()
                await chat.write(b"ping")
                assert await chat.read() == b"PING"
                await chat.done_writing()
                assert await chat.code() == grpc.StatusCode.OK
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await channel.unary_unary("/test.Echo/Slow")(b"", timeout=0.5)
                assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        finally:
            await up.stop()

    run(body())


# --------------------------------------------------------------------------- plain HTTP/2


def h2_client(env: Env) -> httpx.AsyncClient:
    issued = env.pki.client()
    ctx = ssl.create_default_context(cafile=str(env.pki.bundle))
    ctx.load_cert_chain(issued.cert, issued.key)
    return httpx.AsyncClient(http2=True, verify=ctx, timeout=DEADLINE_SECONDS)


async def test_httpx_http2_requests_multiplex_on_one_connection(env: Env) -> None:
    async with env.proxy() as p, h2_client(env) as client:
        replies = await asyncio.gather(*(client.get(f"{p.url}/item/{i}?q={i}") for i in range(20)))
        live = [e for e in p.broker.live if e.service == SERVICE]
    assert {r.http_version for r in replies} == {"HTTP/2"}
    assert [r.json()["raw_path"] for r in replies] == [f"/item/{i}?q={i}" for i in range(20)]
    assert all(r.headers["x-upstream"] == "yes" for r in replies)
    # Two Set-Cookie fields stay two fields on HTTP/2.
    assert replies[0].headers.get_list("set-cookie") == ["a=1; Path=/", "b=2; Path=/"]
    assert len(live) == 1
    # The HTTP/1.1 upstream got the broker's credential on every request, and no HTTP/2
    # pseudo-header or connection-specific field.
    assert len(env.upstream.seen) == 20
    for seen in env.upstream.seen:
        assert seen.headers.getall("Authorization") == [f"Bearer {env.kv.token}"]
        assert not any(name.startswith(":") for name in seen.headers)
    events = p.events("request")
    assert len(events) == 20 and {e["status"] for e in events} == {200}


async def test_http2_bodies_stream_both_ways_under_flow_control(env: Env) -> None:
    size = 20 * 1024 * 1024

    async def upload() -> AsyncIterator[bytes]:
        for block in blocks(size):
            yield block

    async with env.proxy() as p, h2_client(env) as client:
        sent = await client.post(f"{p.url}/upload", content=upload())
        digest, got = hashlib.sha256(), 0
        async with client.stream("GET", f"{p.url}/download?size={size}") as reply:
            assert reply.http_version == "HTTP/2"
            async for chunk in reply.aiter_raw():
                digest.update(chunk)
                got += len(chunk)
    assert sent.json() == {"sha256": blocks_sha256(size), "size": size}
    assert got == size and digest.hexdigest() == blocks_sha256(size)


async def test_an_upstream_failing_mid_response_resets_the_client_stream(env: Env) -> None:
    async with env.proxy() as p, h2_client(env) as client:
        with pytest.raises(httpx.HTTPError):
            async with client.stream("GET", f"{p.url}/truncated") as reply:
                async for _ in reply.aiter_raw():
                    pass
        # Only that stream: the connection carries the next request.
        assert (await client.get(f"{p.url}/after")).status_code == 200


async def test_curl_http2_negotiates_h2(env: Env) -> None:
    async with env.proxy() as p:
        code, out, err = await curl(
            *curl_tls(env.pki, env.pki.client()), "--http2", "-w", "\n%{http_version}",
            f"{p.url}/via-curl",
        )  # fmt: skip
    assert code == 0, err
    body, version = out.rsplit("\n", 1)
    assert version == "2"
    assert '"raw_path": "/via-curl"' in body


async def test_curl_prior_knowledge_h2_on_a_unix_socket(env: Env) -> None:
    service = env.service(
        listen="unix:broker.sock", client_auth="local", local_identity=DEFAULT_CLIENT_ID
    )
    async with env.proxy(service) as p:
        sock = p.broker.address(SERVICE).removeprefix("unix:")
        code, out, err = await curl(
            "--unix-socket", sock, "--http2-prior-knowledge", "-w", "\n%{http_version}",
            "http://localhost/prior",
        )  # fmt: skip
        code1, out1, _ = await curl("--unix-socket", sock, "http://localhost/plain")
    assert code == 0, err
    assert out.rsplit("\n", 1)[1] == "2" and '"raw_path": "/prior"' in out
    assert code1 == 0 and '"raw_path": "/plain"' in out1  # HTTP/1.1 still served there


async def test_http2_upstream_that_offers_only_http11_is_used_over_http11(
    tmp_path: Path, pki: Pki, openbao: OpenBao, monkeypatch: pytest.MonkeyPatch
) -> None:
    up = Upstream()
    await up.start(server_ssl_context(pki, require_client_cert=False))
    try:
        kv = new_secret(openbao, up)
        service = http_service(
            up.url, kv.path, upstream_extra={"http2": True, "ca": str(pki.bundle)}
        )
        env = Env(tmp_path, pki, openbao, monkeypatch, up, kv)
        async with env.proxy(service) as p, h2_client(env) as client:
            replies = [await client.get(f"{p.url}/n/{i}") for i in range(3)]
    finally:
        await up.stop()
    assert [r.status_code for r in replies] == [200, 200, 200]
    assert [s.headers["Authorization"] for s in up.seen] == [f"Bearer {kv.token}"] * 3


async def test_the_listener_announces_stream_and_header_limits(env: Env) -> None:
    async with env.proxy() as p:
        ctx = env.client()
        ctx.set_alpn_protocols(["h2"])
        host, port = p.broker.address(SERVICE).rsplit(":", 1)
        reader, writer = await asyncio.open_connection(
            host, int(port), ssl=ctx, server_hostname="localhost"
        )
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        writer.write(conn.data_to_send())
        settings: dict[int, int] = {}
        async with asyncio.timeout(DEADLINE_SECONDS):
            while not settings:
                for event in conn.receive_data(await reader.read(65536)):
                    if isinstance(event, h2.events.RemoteSettingsChanged):
                        settings = {k: v.new_value for k, v in event.changed_settings.items()}
        writer.close()
    codes = h2.settings.SettingCodes
    assert settings[codes.MAX_CONCURRENT_STREAMS] == 100
    assert settings[codes.MAX_HEADER_LIST_SIZE] == 2 * 64 * 1024  # limits.max_head_bytes x 2
    assert settings[codes.INITIAL_WINDOW_SIZE] == 64 * 1024


async def test_http2_header_limits_are_the_services_head_limit(env: Env) -> None:
    """A header list over limits.max_head_bytes (RFC 9113's size: bytes + 32 per field) is a
    431 on its stream, as on HTTP/1.1, and so is one over 128 fields; the connection goes on.
    SETTINGS_MAX_HEADER_LIST_SIZE is twice the limit: a larger list ends the connection
    (the HPACK decoder refuses it). None of them reaches the upstream."""
    service = env.service(limits={"max_head_bytes": 8192})
    async with env.proxy(service) as p:
        async with h2_client(env) as client:
            ok = await client.get(f"{p.url}/small", headers={"x-pad": "a" * 1000})
            many = await client.get(f"{p.url}/many", headers=[(f"x-f{i}", "v") for i in range(130)])
            big = await client.get(f"{p.url}/big", headers={"x-pad": "a" * 9000})
            after = await client.get(f"{p.url}/after")
        async with h2_client(env) as client:
            with pytest.raises(httpx.HTTPError):
                await client.get(f"{p.url}/huge", headers={"x-pad": "a" * 17000})
    assert ok.status_code == 200 and ok.http_version == "HTTP/2"
    assert many.status_code == 431 and b"header fields" in many.content
    assert big.status_code == 431 and b"limits.max_head_bytes" in big.content, big.content
    assert after.status_code == 200, "the same connection serves on"
    assert [s.raw_path for s in env.upstream.seen] == ["/small", "/after"]


async def test_a_silent_grpc_upstream_is_deadline_exceeded_from_the_broker(
    genv: GrpcEnv,
) -> None:
    """No client deadline: the broker's own upstream.timeout ends the call, in gRPC's terms."""
    service = genv.service()
    service["upstream"]["timeout"] = 0.5
    async with genv.proxy(service) as p, genv.channel(p) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await channel.unary_unary("/test.Echo/Slow")(b"")
        [event] = await poll(lambda: p.events("request"), "the audit line")
        await poll(lambda: "Slow" in genv.upstream.cancelled, "the upstream call to be reset")
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "did not answer in time" in caught.value.details()
    assert event["status"] == 504 and "upstream.timeout" in event["error"]


async def test_an_upstream_that_goes_away_mid_stream_fails_the_call_not_the_connection(
    genv: GrpcEnv,
) -> None:
    async with genv.proxy() as p, genv.channel(p) as channel:
        call = channel.unary_stream("/test.Echo/Count")(b"1000")
        assert await call.read() == b"0"
        await genv.upstream.stop()  # the gRPC server dies with the stream open
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            while await call.read() != grpc.aio.EOF:
                pass
        assert caught.value.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE)
        # The client's connection to the broker is intact: the next call is refused by the
        # broker in gRPC's terms (the upstream is gone), on the same channel.
        with pytest.raises(grpc.aio.AioRpcError) as again:
            await channel.unary_unary("/test.Echo/Unary")(b"x", timeout=10)
        [first, *_] = await poll(lambda: p.events("request"), "the audit lines")
    assert again.value.code() == grpc.StatusCode.UNAVAILABLE
    assert again.value.details().startswith("sidekey: ")
    # grpcio ends its calls with a status as it stops (GOAWAY, then trailers or a reset);
    # either way that call's audit line is there, and only that call failed upstream.
    assert first["path"] == "/test.Echo/Count"


async def test_shutdown_lets_an_open_call_finish_and_refuses_new_ones(genv: GrpcEnv) -> None:
    async with genv.proxy() as p, genv.channel(p) as channel:
        call = channel.unary_stream("/test.Echo/Count")(b"20")  # 20 messages, 50 ms apart
        assert await call.read() == b"0"
        stopping = asyncio.create_task(p.broker.stop(drain_timeout=10.0))
        got = [b"0"]
        while (message := await call.read()) != grpc.aio.EOF:
            got.append(message)
        await stopping
    assert got == [str(i).encode() for i in range(20)]
    assert await call.code() == grpc.StatusCode.OK


async def test_a_client_that_reads_nothing_holds_the_upstream_back(env: Env) -> None:
    """A raw h2 client asks for 50 MB and acknowledges none of it for 2 s: the broker sends
    no more than the client's window, holds no more than a bounded buffer, and the stream
    resumes to its end once the client reads. Client, broker and upstream all run in this
    process, so the memory bound covers all three."""
    size = BIG_BODY_BYTES
    async with env.proxy() as p:
        ctx = env.client()
        ctx.set_alpn_protocols(["h2"])
        host, port = p.broker.address(SERVICE).rsplit(":", 1)
        reader, writer = await asyncio.open_connection(
            host, int(port), ssl=ctx, server_hostname="localhost"
        )
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        stream_id = conn.get_next_available_stream_id()
        conn.send_headers(
            stream_id,
            [(":method", "GET"), (":scheme", "https"), (":authority", "localhost"),
             (":path", f"/download?size={size}")],
            end_stream=True,
        )  # fmt: skip
        writer.write(conn.data_to_send())
        loop = asyncio.get_running_loop()
        received, unacked, ended = 0, 0, False
        digest = hashlib.sha256()

        def take(data: bytes) -> None:
            nonlocal received, unacked, ended
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.DataReceived):
                    received += len(event.data or b"")
                    unacked += event.flow_controlled_length or 0
                    digest.update(event.data or b"")
                elif isinstance(event, h2.events.StreamEnded):
                    ended = True

        tracemalloc.start()
        try:
            tracemalloc.reset_peak()
            stalled_until = loop.time() + 2.0
            while (left := stalled_until - loop.time()) > 0:
                try:
                    data = await asyncio.wait_for(reader.read(65536), left)
                except TimeoutError:
                    break
                take(data)
                writer.write(conn.data_to_send())  # SETTINGS acks, never a WINDOW_UPDATE
            stalled, peak = received, tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        # Reading now, with windows wide enough not to make it one round trip per 64 KiB.
        conn.increment_flow_control_window(4 * 1024 * 1024)
        conn.increment_flow_control_window(4 * 1024 * 1024, stream_id)
        async with asyncio.timeout(DEADLINE_SECONDS * 3):
            while not ended:
                if unacked:
                    conn.acknowledge_received_data(unacked, stream_id)
                    unacked = 0
                writer.write(conn.data_to_send())
                take(await reader.read(65536))
        writer.close()
    assert stalled <= 65_535  # the client's stream window, all the broker may send
    assert peak < MEMORY_BOUND_BYTES, peak
    assert received == size and digest.hexdigest() == blocks_sha256(size)


async def test_a_client_stream_of_20_mb_reaches_the_upstream_under_its_windows(
    genv: GrpcEnv,
) -> None:
    """Twenty 1 MiB messages: the broker sends them on as the gRPC server's windows open."""
    messages = list(blocks(20 * 1024 * 1024))
    expected = hashlib.sha256(b"".join(messages)).hexdigest()

    async def requests() -> AsyncIterator[bytes]:
        for i in range(0, len(messages), 16):
            yield b"".join(messages[i : i + 16])  # 16 x 64 KiB = 1 MiB per message

    async with genv.proxy() as p, genv.channel(p) as channel:
        reply = await channel.stream_unary("/test.Echo/Collect")(requests(), timeout=60)
        [event] = await poll(lambda: p.events("request"), "the audit line")
    assert reply.decode() == f"{20 * 1024 * 1024} {expected}"
    assert event["bytes_in"] > 20 * 1024 * 1024  # the messages and their gRPC framing


async def test_curl_http2_upload_with_expect_100_continue(env: Env) -> None:
    body = env.tmp_path / "body.bin"
    with body.open("wb") as f:
        for block in blocks(3 * 1024 * 1024):
            f.write(block)
    async with env.proxy() as p:
        code, out, err = await curl(
            *curl_tls(env.pki, env.pki.client()), "-v", "--http2", "-H", "Expect: 100-continue",
            "--data-binary", f"@{body}", "-w", "\n%{http_version}", f"{p.url}/upload",
        )  # fmt: skip
    assert code == 0, err
    reply, version = out.rsplit("\n", 1)
    assert version == "2"
    # The broker answered the Expect itself, after policy and credential, on the stream.
    assert "< HTTP/2 100" in err
    assert json.loads(reply) == {"sha256": blocks_sha256(3 * 1024 * 1024), "size": 3 * 1024 * 1024}


async def test_calls_go_on_while_the_upstream_recycles_its_connections(
    tmp_path: Path, pki: Pki, openbao: OpenBao, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A gRPC server with a maximum connection age (what sits behind load balancers) sends
    GOAWAY every 300 ms: calls it had not taken are sent again on a new connection, none
    fails."""
    up = GrpcUpstream()
    await up.start(options=(("grpc.max_connection_age_ms", 300),
                            ("grpc.max_connection_age_grace_ms", 5000)))  # fmt: skip
    try:
        holder = Upstream()
        secret = new_secret(openbao, holder)
        up.tokens |= holder.tokens
        genv = GrpcEnv(tmp_path, pki, openbao, monkeypatch, up, secret.path, secret.token)
        async with genv.proxy() as p, genv.channel(p) as channel:
            pool = p.broker.services[SERVICE].adapter._pool  # type: ignore[attr-defined]
            unary = channel.unary_unary("/test.Echo/Unary")
            replies = []
            deadline = time.monotonic() + DEADLINE_SECONDS
            while pool.opened < 4 and time.monotonic() < deadline:
                replies += await asyncio.gather(*(unary(b"%d" % i, timeout=10) for i in range(8)))
    finally:
        await up.stop()
    assert pool.opened >= 4, "the upstream never recycled its connection"
    assert replies == [b"echo:%d" % i for i in range(8)] * (len(replies) // 8)


async def test_over_max_connections_a_grpc_channel_is_unavailable_with_the_reason(
    genv: GrpcEnv,
) -> None:
    service = genv.service(max_connections=1)
    async with genv.proxy(service) as p, genv.channel(p) as first:
        assert await first.unary_unary("/test.Echo/Unary")(b"1", timeout=10) == b"echo:1"
        issued = genv.pki.client()
        creds = grpc.ssl_channel_credentials(
            genv.pki.bundle.read_bytes(), issued.key.read_bytes(), issued.cert.read_bytes()
        )
        port = p.broker.address(SERVICE).rsplit(":", 1)[1]
        options = (("grpc.use_local_subchannel_pool", 1),)  # its own TCP connection
        async with grpc.aio.secure_channel(f"localhost:{port}", creds, options) as second:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await second.unary_unary("/test.Echo/Unary")(b"2", timeout=10)
        # The first connection is untouched.
        assert await first.unary_unary("/test.Echo/Unary")(b"3", timeout=10) == b"echo:3"
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "connection limit" in caught.value.details()


async def test_a_grpc_caller_proven_by_a_jwt_svid_in_its_metadata(
    genv: GrpcEnv, signing_issuer: SigningIssuer
) -> None:
    """client_auth: jwt over HTTP/2: the token comes as the call's authorization metadata
    (server-authenticated TLS, no client certificate), proves that call only, and never
    reaches the upstream, which gets the injected credential instead."""
    service = genv.service(client_auth="jwt", allow=[ORDERS_ID])
    audit = genv.tmp_path / "audit.jsonl"
    config = base_config(genv.pki, services=[service], vault=genv.openbao, audit=audit)
    config["identity"]["jwt"] = {
        "issuers": [{"name": "spire", "jwks": str(signing_issuer.jwks_path)}]
    }
    token = signing_issuer.mint(sub=ORDERS_ID, aud=SERVICE)
    async with running_broker(genv.tmp_path, config, genv.monkeypatch, vault=genv.openbao) as b:
        port = b.address(SERVICE).rsplit(":", 1)[1]
        creds = grpc.ssl_channel_credentials(genv.pki.bundle.read_bytes())
        async with grpc.aio.secure_channel(f"localhost:{port}", creds) as channel:
            unary = channel.unary_unary("/test.Echo/Unary")
            reply = await unary(b"jwt", metadata=(("authorization", f"Bearer {token}"),))
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await unary(b"none", timeout=10)  # the next call without a token
    assert reply == b"echo:jwt"
    assert genv.upstream.metadata[0]["authorization"] == f"Bearer {genv.token}"
    assert token not in audit.read_text()
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert caught.value.details().startswith("sidekey: identity refused")
