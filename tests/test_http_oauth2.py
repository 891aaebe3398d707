"""OAuth2 client credentials through the HTTP adapter, against real servers end to end.

The authorization server is Node's oidc-provider (tests/oauth_server.py), the client's id
and secret (or private key) sit in the session's OpenBao KV, and the upstream is a resource
server that verifies every access token it gets (signature against the provider's JWKS,
issuer, audience, expiry, scope). Clients are curl and aiohttp with their X.509-SVIDs and no
secret of their own.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme

import broker.credentials.oauth2 as oauth2_module
from broker.runtime import Broker
from tests.brokers import audit_events, base_config, running_broker
from tests.oauth_server import (
    AUDIENCE,
    JWT_CLIENT,
    POST_CLIENT,
    SECRET_CLIENT,
    OAuthProvider,
    ResourceServer,
)
from tests.pki import Pki, client_ssl_context
from tests.servers import OpenBao, free_port
from tests.test_http_adapter import SERVICE, call, curl, curl_tls, poll, put_secret

pytestmark = pytest.mark.timeout(180)


@dataclass
class OAuthProxy:
    url: str
    audit_path: Path
    rs: ResourceServer
    broker: Broker

    def token_state(self) -> str:
        state: str = self.broker.services[SERVICE].context.credentials.status()["state"]
        return state

    def requests(self) -> list[dict[str, Any]]:
        return audit_events(self.audit_path, "request")


def oauth_service(
    upstream: str, kv_path: str, *, auth_method: str | None = None, **oauth: Any
) -> dict[str, Any]:
    credentials: dict[str, Any] = {
        "from": "oauth2",
        "client": {"from": "vault-kv", "path": kv_path},
        "scope": "orders.read",
        **oauth,
    }
    if auth_method:
        credentials["auth_method"] = auth_method
    return {
        "name": SERVICE,
        "adapter": "http",
        "listen": "127.0.0.1:0",
        "client_auth": "mtls",
        "upstream": {"url": upstream},
        "credentials": credentials,
        "inject": {"headers": {"Authorization": "Bearer {access_token}"}},
        "allow": ["spiffe://example.org/ns/prod/sa/orders"],
    }


def client_secret(openbao: OpenBao, provider: OAuthProvider, client_id: str) -> str:
    """A KV path holding `client_id`'s credentials for the broker."""
    path = f"sidekey-oauth/{uuid.uuid4().hex}"
    if client_id == JWT_CLIENT:
        put_secret(openbao, path, client_id=client_id, private_key=provider.client_key_pem,
                   kid="client-1")  # fmt: skip
    else:
        put_secret(openbao, path, client_id=client_id, client_secret=provider.secrets[client_id])
    return path


@dataclass
class Env:
    tmp_path: Path
    pki: Pki
    openbao: OpenBao
    monkeypatch: pytest.MonkeyPatch
    provider: Callable[..., OAuthProvider]

    def proxy(
        self, provider: OAuthProvider, kv_path: str, **oauth: Any
    ) -> AbstractAsyncContextManager[OAuthProxy]:
        return oauth_proxy(self, provider, kv_path, **oauth)


@pytest.fixture
def env(
    tmp_path: Path,
    pki: Pki,
    openbao: OpenBao,
    monkeypatch: pytest.MonkeyPatch,
    oauth_provider: Callable[..., OAuthProvider],
) -> Env:
    return Env(tmp_path, pki, openbao, monkeypatch, oauth_provider)


@asynccontextmanager
async def oauth_proxy(
    env: Env, provider: OAuthProvider, kv_path: str, **oauth: Any
) -> AsyncIterator[OAuthProxy]:
    tmp_path, pki, openbao, monkeypatch = env.tmp_path, env.pki, env.openbao, env.monkeypatch
    rs = ResourceServer(provider)
    await rs.start()
    audit = tmp_path / "audit.jsonl"
    oauth.setdefault("token_url", provider.token_url)
    if oauth.get("issuer"):
        del oauth["token_url"]
    config = base_config(pki, services=[oauth_service(rs.url, kv_path, **oauth)], vault=openbao,
                         audit=audit)  # fmt: skip
    try:
        async with running_broker(tmp_path, config, monkeypatch, vault=openbao) as broker:
            yield OAuthProxy(f"https://{broker.address(SERVICE)}", audit, rs, broker)
    finally:
        await rs.stop()


@pytest.mark.parametrize(
    ("client_id", "oauth"),
    [
        (SECRET_CLIENT, {"audience": AUDIENCE}),
        (POST_CLIENT, {"auth_method": "client_secret_post", "resource": AUDIENCE, "issuer": True}),
        (JWT_CLIENT, {"auth_method": "private_key_jwt", "audience": AUDIENCE, "issuer": True}),
    ],
    ids=["client_secret_basic+token_url", "client_secret_post+discovery", "private_key_jwt"],
)
async def test_access_token_fetched_injected_and_accepted(
    env: Env, caplog: pytest.LogCaptureFixture, client_id: str, oauth: dict[str, Any]
) -> None:
    caplog.set_level(logging.DEBUG)
    provider = env.provider()
    if oauth.get("issuer"):
        oauth["issuer"] = provider.issuer
    kv = client_secret(env.openbao, provider, client_id)
    async with env.proxy(provider, kv, **oauth) as p:
        rc, out, err = await curl(*curl_tls(env.pki, env.pki.client()), f"{p.url}/orders")
        assert rc == 0, err
        answer = json.loads(out)
        assert answer["client_id"] == client_id, out
        # Concurrent requests share the one token the broker already has.
        ctx = client_ssl_context(env.pki, env.pki.client())
        replies = await asyncio.gather(*(call(ctx, f"{p.url}/orders/{i}") for i in range(20)))
        assert [r.status for r in replies] == [200] * 20
        assert provider.issued() == [answer["jti"]]
        assert {s.jti for s in p.rs.seen} == {answer["jti"]}
        assert [s.status for s in p.rs.seen] == [200] * 21
        request = p.requests()[0]
        assert request["credential"]["provider"] == "oauth2"
        assert request["credential"]["path"] == provider.token_url
        trail = p.audit_path.read_text()
        tokens = set(p.rs.tokens)
    assert tokens
    secret = provider.secrets.get(client_id, provider.client_key_pem)
    basic = base64.b64encode(f"{client_id}:{secret}".encode()).decode()  # as Basic auth sends it
    for text in (trail, caplog.text):
        assert secret not in text
        assert basic not in text
        assert answer["jti"] not in text  # nothing of the token either
        assert not any(token in text for token in tokens)


async def test_concurrent_first_requests_share_one_token_fetch(env: Env) -> None:
    provider = env.provider()
    kv = client_secret(env.openbao, provider, SECRET_CLIENT)
    # The broker primes its credential at start: drop that token so the burst finds none.
    async with env.proxy(provider, kv,
                           audience=AUDIENCE, ttl=1) as p:  # fmt: skip
        await poll(_async(lambda: p.token_state() == "valid"), "the start-up token")
        await poll(_async(lambda: p.token_state() != "valid"), "the start-up token to age out")
        before = len(provider.issued())
        ctx = client_ssl_context(env.pki, env.pki.client())
        replies = await asyncio.gather(*(call(ctx, f"{p.url}/burst/{i}") for i in range(30)))
        assert [r.status for r in replies] == [200] * 30
        assert len(provider.issued()) == before + 1


def _async(check: Any) -> Any:
    async def run() -> Any:
        return check()

    return run


async def test_token_expiry_during_a_run_fetches_a_new_one_before_the_old_expires(env: Env) -> None:
    # 8 s tokens: dropped 0.8 s before they expire (a tenth of their life), more than a
    # request takes from the broker to the resource server even on a loaded CI box.
    provider = env.provider(token_ttl=8)
    kv = client_secret(env.openbao, provider, SECRET_CLIENT)
    async with env.proxy(provider, kv,
                           audience=AUDIENCE) as p:  # fmt: skip
        ctx = client_ssl_context(env.pki, env.pki.client())
        statuses: list[int | None] = []

        async def three_tokens() -> bool:
            statuses.append((await call(ctx, f"{p.url}/tick")).status)
            await asyncio.sleep(0.05)
            return len(provider.issued()) >= 3

        await poll(three_tokens, "three tokens in turn")
        assert set(statuses) == {200}
        # The resource server never saw an expired token: the broker had replaced each one
        # before its expires_in ran out (a refusal would be retried and hide it from the
        # client, so the upstream's own record is what counts).
        assert p.rs.refusals() == []
        assert len({s.jti for s in p.rs.seen}) >= 2


async def test_refused_token_refreshed_once_and_idempotent_request_retried(env: Env) -> None:
    env.monkeypatch.setattr(oauth2_module, "REFUSED_REFETCH_SECONDS", 0.0)
    provider = env.provider()
    kv = client_secret(env.openbao, provider, SECRET_CLIENT)
    async with env.proxy(provider, kv,
                           audience=AUDIENCE) as p:  # fmt: skip
        ctx = client_ssl_context(env.pki, env.pki.client())
        first = await call(ctx, f"{p.url}/a")
        assert first.status == 200
        old = json.loads(first.body)["jti"]
        p.rs.revoked.add(old)  # still valid by its claims, but the API no longer takes it
        again = await call(ctx, f"{p.url}/a")
        assert again.status == 200, again.body
        new = json.loads(again.body)["jti"]
        assert new != old
        assert [(s.jti, s.status) for s in p.rs.seen] == [(old, 200), (old, 401), (new, 200)]

        # A request with a body is not sent twice: its 401 reaches the client, and the
        # token is still replaced for the next request.
        p.rs.revoked.add(new)
        posted = await call(ctx, f"{p.url}/orders", "POST", data=b'{"n": 1}')
        assert posted.status == 401
        assert [s.method for s in p.rs.seen].count("POST") == 1
        after = await call(ctx, f"{p.url}/a")
        assert after.status == 200
        assert json.loads(after.body)["jti"] not in (old, new)
        assert len(provider.issued()) == 3


async def test_upstream_refusing_every_token_does_not_flood_the_token_endpoint(env: Env) -> None:
    provider = env.provider()
    kv = client_secret(env.openbao, provider, SECRET_CLIENT)
    async with env.proxy(provider, kv,
                           audience=AUDIENCE) as p:  # fmt: skip
        p.rs.scope = "orders.admin"  # no token this client gets carries it
        ctx = client_ssl_context(env.pki, env.pki.client())
        replies = [await call(ctx, f"{p.url}/x") for _ in range(10)]
        assert {r.status for r in replies} == {401}
        # The start-up token, and one more after the first refusal; then the broker waits
        # REFUSED_REFETCH_SECONDS before dropping the next.
        assert len(provider.issued()) == 2


async def test_authorization_server_down_fails_closed_without_secrets(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    provider = env.provider()
    kv = client_secret(env.openbao, provider, SECRET_CLIENT)
    provider.stop()
    async with env.proxy(provider, kv,
                           audience=AUDIENCE) as p:  # fmt: skip
        rc, out, err = await curl(*curl_tls(env.pki, env.pki.client()), "-i", f"{p.url}/orders")
        assert rc == 0, err
        assert out.split(None, 2)[1] == "503", out  # HTTP/2 or HTTP/1.1, as curl chose
        assert "fails closed" in out
        assert p.rs.seen == []  # nothing reached the upstream without a token
        [request] = p.requests()
        assert f"token endpoint {provider.token_url}: unreachable" in request["error"]
        trail = p.audit_path.read_text()
    secret = provider.secrets[SECRET_CLIENT]
    for text in (out, trail, caplog.text):
        assert secret not in text
    assert f"token endpoint {provider.token_url}: unreachable" in caplog.text


async def test_wrong_client_secret_is_named_not_quoted(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    provider = env.provider()
    kv = f"sidekey-oauth/{uuid.uuid4().hex}"
    wrong = "not-the-secret-" + uuid.uuid4().hex
    put_secret(env.openbao, kv, client_id=SECRET_CLIENT, client_secret=wrong)
    async with env.proxy(provider, kv,
                           audience=AUDIENCE) as p:  # fmt: skip
        reply = await call(client_ssl_context(env.pki, env.pki.client()), f"{p.url}/orders")
        assert reply.status == 503
        [request] = p.requests()
        assert f"refused the client {SECRET_CLIENT}: invalid_client" in request["error"]
        trail = p.audit_path.read_text()
    for text in (trail, caplog.text, reply.body.decode()):
        assert wrong not in text


async def _trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers one byte of a response head every 0.1 s, for ever (a slowloris server)."""
    writer.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
    try:
        while True:
            await asyncio.sleep(0.1)
            writer.write(b"x")
            await writer.drain()
    except (ConnectionError, asyncio.CancelledError):
        writer.close()


async def _silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Accepts and never answers (a hung server)."""
    await reader.read()
    writer.close()


@pytest.mark.parametrize("server", [_silent, _trickle], ids=["silent", "trickling"])
async def test_token_endpoint_that_never_answers_times_out(env: Env, server: Any) -> None:
    provider = env.provider()
    kv = client_secret(env.openbao, provider, SECRET_CLIENT)
    hung = await asyncio.start_server(server, "127.0.0.1", free_port())
    port = hung.sockets[0].getsockname()[1]
    try:
        async with env.proxy(provider, kv,
                               token_url=f"http://127.0.0.1:{port}/token", timeout=0.5,
                               audience=AUDIENCE) as p:  # fmt: skip
            reply = await call(client_ssl_context(env.pki, env.pki.client()), f"{p.url}/orders")
            assert reply.status == 503
            [request] = p.requests()
            assert "no answer in 0.5s" in request["error"]
    finally:
        hung.close()


async def test_an_error_code_echoing_the_secret_is_shortened_and_redacted(env: Env) -> None:
    """A token endpoint whose error code is 20 KB of text with the client secret and line
    breaks in it (a fake: a real authorization server answers a registered code). The
    audit and the client see one short line, without the secret."""
    provider = env.provider()
    kv = client_secret(env.openbao, provider, SECRET_CLIENT)
    secret = provider.secrets[SECRET_CLIENT]
    code = "\n".join(["bad_client " + secret] * 400)
    body = json.dumps({"error": code}).encode()

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
        )
        await writer.drain()
        writer.close()

    odd = await asyncio.start_server(answer, "127.0.0.1", free_port())
    port = odd.sockets[0].getsockname()[1]
    try:
        async with env.proxy(provider, kv, token_url=f"http://127.0.0.1:{port}/token",
                             audience=AUDIENCE) as p:  # fmt: skip
            reply = await call(client_ssl_context(env.pki, env.pki.client()), f"{p.url}/orders")
            assert reply.status == 503
            [request] = p.requests()
            trail = p.audit_path.read_text()
    finally:
        odd.close()
    assert f"refused the client {SECRET_CLIENT}: bad_client [redacted]" in request["error"]
    assert len(request["error"]) < 500 and "\n" not in request["error"]
    for text in (trail, reply.body.decode()):
        assert secret not in text


async def test_https_token_endpoint_verified_against_its_ca(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    """An https authorization server: trusted through `ca:`; without it (the system store)
    the fetch fails closed and says it is the certificate, not an outage."""
    ca = trustme.CA()
    provider = env.provider(tls=ca)
    ca_file = env.tmp_path / "auth-ca.pem"
    ca.cert_pem.write_to_path(ca_file)
    kv = client_secret(env.openbao, provider, SECRET_CLIENT)
    async with env.proxy(provider, kv, issuer=provider.issuer, audience=AUDIENCE,
                         ca=str(ca_file)) as p:  # fmt: skip
        reply = await call(client_ssl_context(env.pki, env.pki.client()), f"{p.url}/orders")
        assert reply.status == 200, reply.body
    env.tmp_path.joinpath("audit.jsonl").unlink()
    async with env.proxy(provider, kv, issuer=provider.issuer, audience=AUDIENCE) as p:
        reply = await call(client_ssl_context(env.pki, env.pki.client()), f"{p.url}/orders")
        assert reply.status == 503
        [request] = p.requests()
        assert "TLS certificate verification failed (set ca:" in request["error"]
