"""TLS session resumption (issue 18.5): callers resume TLS 1.3 (tickets) and TLS 1.2 sessions
with the broker and are identified as on their full handshake; an upstream context resumes
the session of its last connection, under asyncio and uvloop.

Clients: `openssl s_client -sess_out/-sess_in` and Python's ssl with a saved session.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import re
import ssl
import struct
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest
import trustme

from broker.identity.ca import init_ca, issue
from broker.identity.tls import ResumingContext, client_context
from tests import test_http_adapter as http_tests
from tests.brokers import base_config, running_broker
from tests.loops import Run
from tests.loops import server_context as trustme_server_context
from tests.pki import DEFAULT_CLIENT_ID, Pki, client_ssl_context
from tests.servers import Postgres
from tests.servers_mysql_redis import RedisServer, VaultEngine
from tests.test_http_adapter import SERVICE, Env

# The HTTP adapter tests' fixtures: a real aiohttp upstream, OpenBao, a secret.
env = http_tests.env
upstream = http_tests.upstream

OPENSSL_SECONDS = 30
REQUEST = b"GET /resume HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"


def s_client(pki: Pki, address: str, *args: str) -> str:
    """One request through `openssl s_client` with the default client's SVID; its output."""
    host, _, port = address.rpartition(":")
    client = pki.client()
    done = subprocess.run(
        ["openssl", "s_client", "-connect", f"{host}:{port}", "-servername", "localhost",
         "-CAfile", str(pki.bundle), "-cert", str(client.cert), "-key", str(client.key),
         "-ign_eof", *args],
        input=REQUEST, capture_output=True, timeout=OPENSSL_SECONDS, check=False,
    )  # fmt: skip
    return done.stdout.decode(errors="replace")


def statuses(out: str) -> list[str]:
    # s_client's own lines and the reply interleave on stdout.
    return re.findall(r"HTTP/1\.1 (\d{3}) ", out)


@pytest.mark.parametrize("version", ["-tls1_3", "-tls1_2"])
async def test_openssl_client_resumes_and_is_identified(
    env: Env, tmp_path: Path, version: str
) -> None:
    sess = tmp_path / "session.pem"
    async with env.proxy() as p:
        address = p.broker.address(SERVICE)
        first = await asyncio.to_thread(s_client, env.pki, address, version, "-sess_out", str(sess))
        second = await asyncio.to_thread(s_client, env.pki, address, version, "-sess_in", str(sess))
        events = p.events("request")
    assert "New, TLSv1." in first and statuses(first) == ["200"], first
    assert "Reused, TLSv1." in second and statuses(second) == ["200"], second
    assert [e["spiffe_id"] for e in events] == [DEFAULT_CLIENT_ID] * 2
    assert events[0]["auth_method"] == events[1]["auth_method"] == "x509-svid"


async def test_resumption_off_means_a_full_handshake_every_time(env: Env, tmp_path: Path) -> None:
    sess = tmp_path / "session.pem"
    async with env.proxy(env.service(tls_resumption=False)) as p:
        address = p.broker.address(SERVICE)
        first = await asyncio.to_thread(
            s_client, env.pki, address, "-tls1_3", "-sess_out", str(sess)
        )
        assert statuses(first) == ["200"] and "TLS session ticket:" not in first, first
        if sess.exists():  # s_client writes a session only if the server sent a ticket
            second = await asyncio.to_thread(
                s_client, env.pki, address, "-tls1_3", "-sess_in", str(sess)
            )
            assert "New, TLSv1.3" in second and statuses(second) == ["200"], second


async def python_request(
    address: str, ctx: ssl.SSLContext, session: ssl.SSLSession | None
) -> tuple[bytes, ssl.SSLObject]:
    host, _, port = address.rpartition(":")
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    protocol = asyncio.StreamReaderProtocol(reader)
    sslobj: dict[str, Any] = {}

    # asyncio's create_connection takes no session: hand it over where the SSLObject is made.
    original = ctx.wrap_bio

    def wrap_bio(*args: Any, **kwargs: Any) -> ssl.SSLObject:
        obj = original(*args, **kwargs, session=session)
        sslobj["obj"] = obj
        return obj

    ctx.wrap_bio = wrap_bio  # type: ignore[method-assign]
    try:
        transport, _ = await loop.create_connection(
            lambda: protocol, host, int(port), ssl=ctx, server_hostname="localhost"
        )
    finally:
        del ctx.wrap_bio
    writer = asyncio.StreamWriter(transport, protocol, reader, loop)
    writer.write(REQUEST)
    reply = await asyncio.wait_for(reader.read(), OPENSSL_SECONDS)
    writer.close()
    return reply, sslobj["obj"]


async def test_python_client_resumes_and_a_forgotten_certificate_is_refused(env: Env) -> None:
    ctx = client_ssl_context(env.pki, env.pki.client())
    async with env.proxy() as p:
        address = p.broker.address(SERVICE)
        reply, first = await python_request(address, ctx, None)
        assert reply.startswith(b"HTTP/1.1 200") and not first.session_reused
        session = first.session
        assert session is not None and session.has_ticket
        reply, second = await python_request(address, ctx, session)
        assert reply.startswith(b"HTTP/1.1 200") and second.session_reused
        # The broker identifies a resumed session only by what a full handshake verified:
        # once it no longer remembers the certificate, the resumed caller is refused.
        p.broker.services[SERVICE].context.svids._anchors.clear()
        reply, third = await python_request(address, ctx, second.session or session)
        assert third.session_reused and reply.startswith(b"HTTP/1.1 403"), reply
        assert b"resumed TLS session" in reply
        # A full handshake is identified again.
        reply, fourth = await python_request(address, ctx, None)
        assert reply.startswith(b"HTTP/1.1 200") and not fourth.session_reused
        events = p.events("request") + p.events("deny")
    assert sum(e.get("spiffe_id") == DEFAULT_CLIENT_ID for e in events) >= 3


# --------------------------------------------------------------------------- upstream side


def test_upstream_context_resumes_the_last_session(run: Run, ca: trustme.CA) -> None:
    async def body() -> list[bool]:
        server_ctx = trustme_server_context(ca)  # OpenSSL's defaults: two TLS 1.3 tickets

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read(5)
            writer.write(b"pong\n")
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=server_ctx)
        port = server.sockets[0].getsockname()[1]
        ctx = client_context(verify=True)
        assert isinstance(ctx, ResumingContext)
        ca.configure_trust(ctx)
        reused = []
        for _ in range(3):
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=ctx, server_hostname="127.0.0.1"
            )
            writer.write(b"ping\n")
            assert await reader.readline() == b"pong\n"
            reused.append(writer.get_extra_info("ssl_object").session_reused)
            writer.close()
            await writer.wait_closed()
        server.close()
        await server.wait_closed()
        return reused

    assert run(body()) == [False, True, True]


async def test_the_broker_resumes_its_tls_session_to_a_redis_upstream(
    tmp_path: Path,
    pki: Pki,
    redis_server: RedisServer,
    vault_redis: VaultEngine,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two sessions one after the other: the second upstream handshake resumes the first's
    session (redis-server keeps a TLS session cache by default)."""
    sock_dir = Path(tempfile.mkdtemp(prefix="sk-"))
    svc = {
        "name": "cache", "adapter": "redis", "listen": f"unix:{sock_dir}/redis.sock",
        "client_auth": "local", "local_identity": DEFAULT_CLIENT_ID,
        "upstream": {"address": f"127.0.0.1:{redis_server.tls_port}",
                     "tls": {"mode": "verify-full", "ca": str(redis_server.ca_path)}},
        "credentials": {"from": "vault-database", "mount": vault_redis.mount,
                        "role": vault_redis.role},
        "allow": [DEFAULT_CLIENT_ID],
    }  # fmt: skip
    config = base_config(pki, services=[svc], vault=vault_redis.openbao, admin=False)
    try:
        async with running_broker(tmp_path, config, monkeypatch, vault_redis.openbao) as b:
            upstream_ctx = b.services["cache"].adapter.upstream.ssl_context  # type: ignore[attr-defined]
            assert isinstance(upstream_ctx, ResumingContext)
            reused = []
            for _ in range(2):
                proc = await asyncio.create_subprocess_exec(
                    "redis-cli", "-s", f"{sock_dir}/redis.sock", "PING",
                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                )  # fmt: skip
                out, err = await asyncio.wait_for(proc.communicate(), OPENSSL_SECONDS)
                assert out.strip() == b"PONG", err
                last = upstream_ctx._servers["127.0.0.1"].last
                assert last is not None
                reused.append(last.session_reused)
    finally:
        for child in sock_dir.iterdir():
            child.unlink()
        sock_dir.rmdir()
    assert reused == [False, True]


async def test_a_ca_removed_from_the_bundle_ends_the_sessions_it_vouched_for(
    env: Env, tmp_path: Path
) -> None:
    """The client's CA is in the bundle, then taken out (a reload): its saved session, resumed,
    is refused, since a resumed session counts only while its trust anchor is in the bundle."""
    ca2 = tmp_path / "ca2"
    init_ca(ca2, env.pki.trust_domain)
    client = issue(ca2, DEFAULT_CLIENT_ID, tmp_path / "client")
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(env.pki.bundle.read_bytes() + (ca2 / "bundle.pem").read_bytes())
    audit = tmp_path / "audit.jsonl"
    config = base_config(env.pki, services=[env.service()], vault=env.openbao, audit=audit)
    config["identity"]["x509_bundle"] = str(bundle)
    ctx = ssl.create_default_context(cafile=str(env.pki.bundle))  # the broker's own CA
    ctx.load_cert_chain(client.cert, client.key)
    async with running_broker(tmp_path, config, env.monkeypatch, vault=env.openbao) as b:
        address = b.address(SERVICE)
        reply, first = await python_request(address, ctx, None)
        assert reply.startswith(b"HTTP/1.1 200"), reply
        reply, second = await python_request(address, ctx, first.session)
        assert reply.startswith(b"HTTP/1.1 200") and second.session_reused
        bundle.write_bytes(env.pki.bundle.read_bytes())
        b.identity.reload()
        reply, third = await python_request(address, ctx, second.session or first.session)
        assert third.session_reused, "the listener's session cache outlives a bundle change"
        assert reply.startswith(b"HTTP/1.1 403") and b"chains to a CA outside" in reply, reply


# Connections for the memory check below, and the growth allowed per connection once warm.
# On Python 3.11 every read of `SSLObject.session` leaks the copy of the session it makes
# first (CPython gh-116810, fixed in 3.12 and 3.13 only): ~6 KB a connection, the soak's
# climb of ~7 MB a minute under pgbench -C. Reads now happen only when a session is new.
LEAK_CONNECTIONS, LEAK_WARM_UP = 2000, 300
MAX_BYTES_PER_CONNECTION = 1024


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.timeout(300)
def test_upstream_reconnects_to_a_server_that_does_not_resume_hold_no_memory(
    run: Run, postgres: Postgres
) -> None:
    """PostgreSQL issues neither tickets nor session IDs: thousands of TLS connections to it
    through one upstream context leave the process's memory where it was."""

    async def connect(ctx: ssl.SSLContext) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", postgres.port)
        writer.write(struct.pack("!ii", 8, 80877103))  # SSLRequest
        assert await reader.readexactly(1) == b"S"
        await writer.start_tls(ctx, server_hostname="localhost")
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()

    async def body() -> tuple[int, int]:
        ctx = client_context(ca=postgres.ca_path)
        for _ in range(LEAK_WARM_UP):
            await connect(ctx)
        gc.collect()
        before = _rss()
        for _ in range(LEAK_CONNECTIONS):
            await connect(ctx)
        gc.collect()
        return before, _rss()

    before, after = run(body())
    per_connection = (after - before) / LEAK_CONNECTIONS
    assert per_connection < MAX_BYTES_PER_CONNECTION, (
        f"RSS {before / 2**20:.1f} -> {after / 2**20:.1f} MB: "
        f"{per_connection:.0f} bytes per connection"
    )
