"""The broker as a PostgreSQL client, against scripted servers: what it refuses to do.

A real PostgreSQL never misbehaves on cue, so these servers speak the codec's messages from a
script: ask for a cleartext password without TLS, fake a SCRAM signature, skip SASLFinal.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from scramp import ScramMechanism

from adapters.postgres._config import parse_upstream
from adapters.postgres._scram import ScramKeyCache
from adapters.postgres._upstream import (
    UpstreamRefused,
    authenticate,
    open_connection,
    send_cancel,
    startup_for_upstream,
)
from broker.codecs.postgres import (
    PROTOCOL_VERSION_3_0,
    AuthenticationCleartextPassword,
    AuthenticationMD5Password,
    AuthenticationOk,
    AuthenticationOther,
    AuthenticationSASL,
    AuthenticationSASLContinue,
    AuthenticationSASLFinal,
    BackendKeyData,
    CancelRequest,
    ErrorResponse,
    FrontendMessage,
    FrontendParser,
    NegotiateProtocolVersion,
    ParameterStatus,
    PasswordMessage,
    ReadyForQuery,
    SASLInitialResponse,
    SASLResponse,
    StartupMessage,
    encode,
    md5_password,
)
from broker.config import Section
from broker.errors import ConfigError, UpstreamError, UpstreamTimeout
from broker.session.upstream import UpstreamTarget

PASSWORD = "s3cret-Password"
USER = "app"
# A scripted exchange finishes in milliseconds; this bounds a test that went wrong.
DEADLINE = 5.0


class Peer:
    """The scripted server's view of the broker: read its messages, write ours."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.parser = FrontendParser()
        self.received = bytearray()

    async def read(self) -> FrontendMessage | None:
        while (message := self.parser.next_message()) is None:
            data = await self.reader.read(65536)
            if not data:
                return None
            self.received += data
            self.parser.feed(data)
        return message

    def send(self, *messages: Any) -> None:
        self.writer.write(b"".join(encode(m) for m in messages))


Script = Callable[[Peer], Awaitable[None]]


@pytest.fixture(autouse=True)
def scram_user_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """The broker sends an empty SCRAM user name, as libpq does (PostgreSQL ignores it);
    scramp's server insists on one."""
    import functools

    from adapters.postgres import _upstream
    from adapters.postgres._scram import ScramClient

    monkeypatch.setattr(_upstream, "ScramClient", functools.partial(ScramClient, username="x"))


@asynccontextmanager
async def scripted_server(script: Script) -> AsyncIterator[tuple[UpstreamTarget, list[Peer]]]:
    peers: list[Peer] = []
    tasks: set[asyncio.Task[None]] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = Peer(reader, writer)
        peers.append(peer)
        try:
            await script(peer)
        finally:
            writer.close()

    def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.create_task(handle(reader, writer))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    config = parse_upstream(
        Section(
            {"address": f"127.0.0.1:{port}", "database": "appdb", "tls": {"mode": "disable"}},
            "upstream",
        ),
        Path("."),
    ).target
    try:
        yield config, peers
    finally:
        server.close()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()


async def login(config: UpstreamTarget, cache: ScramKeyCache | None = None) -> Any:
    deadline = asyncio.get_running_loop().time() + DEADLINE
    conduit, stream = await open_connection(config, deadline)
    try:
        startup = StartupMessage(PROTOCOL_VERSION_3_0, (("user", USER), ("database", "appdb")))
        return await authenticate(
            stream, startup, PASSWORD, ScramKeyCache() if cache is None else cache
        )
    finally:
        conduit.close()


async def expect_startup(peer: Peer) -> StartupMessage:
    message = await peer.read()
    assert isinstance(message, StartupMessage)
    return message


def ready(peer: Peer) -> None:
    peer.send(
        AuthenticationOk(),
        ParameterStatus("server_version", "15.0"),
        BackendKeyData(77, b"\1\2\3\4"),
        ReadyForQuery("I"),
    )


async def test_cleartext_password_is_refused_without_tls() -> None:
    async def script(peer: Peer) -> None:
        await expect_startup(peer)
        peer.send(AuthenticationCleartextPassword())
        assert await peer.read() is None

    async with scripted_server(script) as (config, peers):
        with pytest.raises(UpstreamError, match="cleartext password over a connection without TLS"):
            await login(config)
    assert PASSWORD.encode() not in peers[0].received


async def test_md5_answer() -> None:
    async def script(peer: Peer) -> None:
        await expect_startup(peer)
        peer.send(AuthenticationMD5Password(b"salt"))
        answer = await peer.read()
        assert answer == PasswordMessage(md5_password(USER, PASSWORD, b"salt"))
        ready(peer)

    async with scripted_server(script) as (config, peers):
        result = await login(config)
    assert result.backend_key == BackendKeyData(77, b"\1\2\3\4")
    assert isinstance(result.messages[-1], ReadyForQuery)
    assert PASSWORD.encode() not in peers[0].received


def scram_script(
    *,
    forge_final: bool = False,
    skip_final: bool = False,
    mechanisms: tuple[str, ...] = ("SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"),
) -> Script:
    mechanism = ScramMechanism()
    auth_info = mechanism.make_auth_info(PASSWORD, iteration_count=4096)

    async def script(peer: Peer) -> None:
        await expect_startup(peer)
        server = mechanism.make_server(lambda _user: auth_info)
        peer.send(AuthenticationSASL(mechanisms))
        peer.parser.expect_password(SASLInitialResponse)
        first = await peer.read()
        if first is None:
            return
        assert isinstance(first, SASLInitialResponse)
        assert first.mechanism == "SCRAM-SHA-256", "plain SCRAM even when -PLUS is offered"
        assert first.data is not None
        server.set_client_first(first.data.decode())
        peer.send(AuthenticationSASLContinue(server.get_server_first().encode()))
        peer.parser.expect_password(SASLResponse)
        final = await peer.read()
        assert isinstance(final, SASLResponse)
        server.set_client_final(final.data.decode())
        if skip_final:
            ready(peer)
            return
        signature = server.get_server_final()
        if forge_final:
            signature = "v=" + "A" * 43 + "="
        peer.send(AuthenticationSASLFinal(signature.encode()))
        ready(peer)

    return script


async def test_scram_login_and_key_cache() -> None:
    cache = ScramKeyCache()
    async with scripted_server(scram_script()) as (config, peers):
        await login(config, cache)
        await login(config, cache)
    assert cache.derivations == 1, "the second login reuses the derived keys"
    assert all(PASSWORD.encode() not in p.received for p in peers)


async def test_scram_server_must_prove_itself() -> None:
    async with scripted_server(scram_script(forge_final=True)) as (config, _):
        with pytest.raises(UpstreamError, match="server signature does not match"):
            await login(config)
    async with scripted_server(scram_script(skip_final=True)) as (config, _):
        with pytest.raises(UpstreamError, match="without proving its identity"):
            await login(config)


async def test_only_channel_binding_offered_is_refused() -> None:
    async with scripted_server(scram_script(mechanisms=("SCRAM-SHA-256-PLUS",))) as (config, _):
        with pytest.raises(UpstreamError, match="only SCRAM-SHA-256 is supported"):
            await login(config)


async def test_unsupported_method_is_named() -> None:
    async def script(peer: Peer) -> None:
        await expect_startup(peer)
        peer.send(AuthenticationOther(7, b""))
        await peer.read()

    async with scripted_server(script) as (config, _):
        with pytest.raises(UpstreamError, match="unsupported authentication method"):
            await login(config)


async def test_error_response_is_passed_on() -> None:
    async def script(peer: Peer) -> None:
        await expect_startup(peer)
        peer.send(ErrorResponse.make("FATAL", "53300", "sorry, too many clients already"))

    async with scripted_server(script) as (config, _):
        with pytest.raises(UpstreamRefused) as raised:
            await login(config)
    assert raised.value.response.sqlstate == "53300"


async def test_negotiate_protocol_version_is_kept_for_the_client() -> None:
    async def script(peer: Peer) -> None:
        await expect_startup(peer)
        peer.send(NegotiateProtocolVersion(0, ("_pq_.x",)), AuthenticationMD5Password(b"salt"))
        await peer.read()
        ready(peer)

    async with scripted_server(script) as (config, _):
        result = await login(config)
    assert result.negotiate == NegotiateProtocolVersion(0, ("_pq_.x",))


async def test_silent_upstream_times_out() -> None:
    async def script(peer: Peer) -> None:
        await expect_startup(peer)
        await asyncio.Event().wait()

    async with scripted_server(script) as (config, _):
        deadline = asyncio.get_running_loop().time() + 0.3
        conduit, stream = await open_connection(config, deadline)
        try:
            startup = StartupMessage(PROTOCOL_VERSION_3_0, (("user", USER),))
            with pytest.raises(UpstreamTimeout):
                await authenticate(stream, startup, PASSWORD, ScramKeyCache())
        finally:
            conduit.close()


async def test_tls_required_but_not_offered() -> None:
    async def script(peer: Peer) -> None:
        await peer.reader.readexactly(8)
        peer.writer.write(b"N")
        await peer.reader.read()

    async with scripted_server(script) as (config, _):
        section = Section(
            {
                "address": f"{config.host}:{config.port}",
                "database": "d",
                "tls": {"mode": "require"},
            },
            "upstream",
        )
        tls_config = parse_upstream(section, Path(".")).target
        deadline = asyncio.get_running_loop().time() + DEADLINE
        with pytest.raises(UpstreamError, match="does not offer TLS"):
            await open_connection(tls_config, deadline)


async def test_send_cancel_writes_the_upstream_key() -> None:
    async def script(peer: Peer) -> None:
        message = await peer.read()
        assert message == CancelRequest(77, b"\1\2\3\4")

    async with scripted_server(script) as (config, peers):
        deadline = asyncio.get_running_loop().time() + DEADLINE
        await send_cancel(config, 77, b"\1\2\3\4", deadline)
    assert len(peers) == 1


def test_startup_for_upstream_replaces_user_and_database() -> None:
    client = StartupMessage(
        PROTOCOL_VERSION_3_0,
        (("user", "mallory"), ("database", "appdb"), ("application_name", "app"),
         ("options", "-c work_mem=4MB")),
    )  # fmt: skip
    upstream = startup_for_upstream(client, "v-user", "appdb")
    assert upstream.parameters == (
        ("user", "v-user"),
        ("database", "appdb"),
        ("application_name", "app"),
        ("options", "-c work_mem=4MB"),
    )


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        ({"database": "d"}, "upstream.address: required"),
        ({"address": "db:0", "database": "d"}, "upstream.address: must be HOST:PORT"),
        ({"address": "db:x", "database": "d"}, "upstream.address: must be HOST:PORT"),
        ({"address": "db:5432"}, "upstream.database: required"),
        ({"address": "db:5432", "database": []}, "upstream.database: must name at least one"),
        ({"address": "db:5432", "database": "d", "tls": {"mode": "prefer"}},
         "upstream.tls.mode: must be one of"),
        ({"address": "db:5432", "database": "d", "tls": {"mode": "require", "ca": __file__}},
         "upstream.tls.ca: only used with mode verify-ca or verify-full"),
        ({"address": "db:5432", "database": "d", "tls": {"mode": "verify-full", "ca": "/nope"}},
         "upstream.tls.ca: file not found"),
        ({"address": "db:5432", "database": "d", "port": 1}, "upstream.port: unknown key"),
        ({"address": "db:5432", "database": "d", "connect_timeout": 0},
         "upstream.connect_timeout: must be a number"),
    ],
)  # fmt: skip
def test_config_errors_are_located(raw: dict[str, Any], error: str) -> None:
    with pytest.raises(ConfigError, match=error.replace(".", r"\.")):
        parse_upstream(Section(raw, "upstream"), Path("."))


def test_config_defaults() -> None:
    parsed = parse_upstream(
        Section({"address": "db.internal", "database": ["a", "b"]}, "upstream"), Path(".")
    )
    config = parsed.target
    assert (config.host, config.port, parsed.databases) == ("db.internal", 5432, ("a", "b"))
    assert config.tls_mode == "verify-full" and config.server_name == "db.internal"
    assert config.ssl_context is not None and config.ssl_context.check_hostname
