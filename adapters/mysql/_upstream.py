"""The broker as a MySQL client: connect, TLS, authenticate with the credential.

Every wait is bounded by the deadline the caller passes; errors are UpstreamError (or
UpstreamTimeout) with messages that name the upstream and never a secret. The password is
only ever written to this connection, and in the clear (cleartext plugin, caching_sha2's
full authentication) only over TLS.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from broker.codecs.mysql import (
    AuthData,
    AuthMoreData,
    AuthSwitchRequest,
    ErrPacket,
    HandshakeResponse41,
    HandshakeV10,
    OkPacket,
    ServerMessage,
    ServerParser,
    SSLRequest,
    encode,
    payload,
)
from broker.codecs.mysql import constants as c
from broker.credentials import Credential
from broker.errors import UpstreamError
from broker.session.net import Conduit, connect
from broker.session.upstream import LoginStream, UpstreamTarget

from ._auth import (
    CACHING_SHA2,
    CLEAR,
    ED25519,
    NATIVE,
    SUPPORTED,
    caching_sha2_password,
    ed25519_password,
    native_password,
    rsa_encrypted_password,
)

# What the broker offers its clients, and so at most what a client can ask of the upstream:
# what MariaDB 10.2+ and MySQL 5.7+ all support. Not compression (it would change the
# framing the broker watches), not CLIENT_QUERY_ATTRIBUTES (MySQL 8.0.23+ only).
BROKER_CAPABILITIES = (
    c.CLIENT_LONG_PASSWORD | c.CLIENT_FOUND_ROWS | c.CLIENT_LONG_FLAG | c.CLIENT_CONNECT_WITH_DB
    | c.CLIENT_LOCAL_FILES | c.CLIENT_IGNORE_SPACE | c.CLIENT_PROTOCOL_41 | c.CLIENT_INTERACTIVE
    | c.CLIENT_TRANSACTIONS | c.CLIENT_SECURE_CONNECTION | c.CLIENT_MULTI_STATEMENTS
    | c.CLIENT_MULTI_RESULTS | c.CLIENT_PS_MULTI_RESULTS | c.CLIENT_PLUGIN_AUTH
    | c.CLIENT_CONNECT_ATTRS | c.CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA
    | c.CLIENT_CAN_HANDLE_EXPIRED_PASSWORDS | c.CLIENT_SESSION_TRACK | c.CLIENT_DEPRECATE_EOF
)  # fmt: skip
# Flags that change what the server sends after login: a client that asked for one the
# upstream lacks would misread the session.
SHAPING_CAPABILITIES = {
    c.CLIENT_DEPRECATE_EOF: "CLIENT_DEPRECATE_EOF",
    c.CLIENT_SESSION_TRACK: "CLIENT_SESSION_TRACK",
    c.CLIENT_MULTI_RESULTS: "CLIENT_MULTI_RESULTS",
    c.CLIENT_PS_MULTI_RESULTS: "CLIENT_PS_MULTI_RESULTS",
    c.CLIENT_MULTI_STATEMENTS: "CLIENT_MULTI_STATEMENTS",
}
# Round trips of one authentication (switch, more data, RSA key): three at most in
# practice; a server that keeps asking is not behaving like one.
MAX_AUTH_ROUNDS = 8
# What the broker tells the upstream it accepts; the client's own value is passed on.
DEFAULT_MAX_PACKET = 16 * 1024 * 1024


class ConnectFailed(UpstreamError):
    """The upstream could not be reached (TCP connect, refused, unresolvable)."""


class UpstreamRefused(UpstreamError):
    """The server answered the login with an ERR packet: relay it to the client."""

    def __init__(self, err: ErrPacket, upstream: str) -> None:
        super().__init__(
            f"upstream {upstream} refused the login: {err.code} ({err.sqlstate}) {err.message}"
        )
        self.err = err


@dataclass(slots=True)
class Authenticated:
    conduit: Conduit
    greeting: HandshakeV10
    ok: OkPacket
    leftover: bytes
    # The credential it logged in with, to KILL QUERY what a vanished client left running
    # (its repr shows no secret).
    credential: Credential | None = None


class _Stream(LoginStream[ServerMessage]):
    def __init__(self, conduit: Conduit, deadline: float, where: str) -> None:
        self.server = ServerParser()
        super().__init__(conduit, self.server, deadline, where, "the login")

    def send(self, message: SSLRequest | HandshakeResponse41 | AuthData) -> None:
        self.conduit.write(encode(message, self.server.next_seq()))


def upstream_capabilities(client: int, server: int, where: str) -> int:
    """The flags the broker asks of the upstream for a client that asked for `client`."""
    missing = [
        name for flag, name in SHAPING_CAPABILITIES.items() if client & flag and not server & flag
    ]
    if missing:
        raise UpstreamError(f"upstream {where} does not support {', '.join(missing)}")
    wanted = (client & BROKER_CAPABILITIES) | c.CLIENT_PROTOCOL_41 | c.CLIENT_SECURE_CONNECTION
    wanted |= c.CLIENT_CONNECT_WITH_DB | c.CLIENT_PLUGIN_AUTH
    return wanted & (server | c.CLIENT_CONNECT_WITH_DB) & ~c.CLIENT_SSL


async def login(  # noqa: PLR0917 - one call site, each argument named there
    target: UpstreamTarget,
    client: HandshakeResponse41,
    user: str,
    password: str,
    database: str,
    deadline: float,
) -> Authenticated:
    """Connect, upgrade to TLS per the target's mode, and log in as `user`."""
    loop = asyncio.get_running_loop()
    timeout = min(target.connect_timeout, max(deadline - loop.time(), 0.001))
    try:
        conduit = await connect(target.host, target.port, timeout=timeout)
    except UpstreamError as exc:
        raise ConnectFailed(str(exc)) from None
    stream = _Stream(conduit, deadline, target.address)
    try:
        greeting = await stream.next()
        if isinstance(greeting, ErrPacket):
            raise UpstreamRefused(greeting, target.address)
        assert isinstance(greeting, HandshakeV10)
        caps = upstream_capabilities(client.capabilities, greeting.capabilities, target.address)
        if target.ssl_context is not None:
            if not greeting.capabilities & c.CLIENT_SSL:
                raise UpstreamError(
                    f"upstream {target.address} does not offer TLS "
                    f"(upstream.tls.mode is {target.tls_mode})"
                )
            caps |= c.CLIENT_SSL
            stream.send(SSLRequest(caps, client.max_packet or DEFAULT_MAX_PACKET, client.charset))
            await conduit.start_tls(
                target.ssl_context,
                server_side=False,
                server_hostname=target.server_name,
                timeout=stream.remaining(),
            )
        plugin = greeting.auth_plugin or NATIVE
        if plugin not in SUPPORTED or (plugin == CLEAR and not conduit.is_tls):
            plugin = NATIVE  # the server switches us to what it wants, if anything else
        response = HandshakeResponse41(
            capabilities=caps,
            max_packet=client.max_packet or DEFAULT_MAX_PACKET,
            charset=client.charset,
            user=user,
            auth_response=_respond(plugin, password, greeting.scramble, conduit, target.address),
            database=database,
            auth_plugin=plugin,
            attributes=client.attributes if caps & c.CLIENT_CONNECT_ATTRS else (),
        )
        if len(response.auth_response) > 250 and not caps & c.CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA:
            raise UpstreamError(f"upstream {target.address} cannot take this auth response")
        stream.send(response)
        ok = await _authenticate(stream, plugin, password, greeting.scramble)
    except BaseException:
        conduit.abort()
        raise
    return Authenticated(conduit, greeting, ok, stream.parser.leftover())


def _respond(plugin: str, password: str, scramble: bytes, conduit: Conduit, where: str) -> bytes:
    if plugin == NATIVE:
        return native_password(password, scramble)
    if plugin == CACHING_SHA2:
        return caching_sha2_password(password, scramble)
    if plugin == ED25519:
        return ed25519_password(password, scramble)
    if plugin == CLEAR:
        if not conduit.is_tls:
            raise UpstreamError(
                f"upstream {where} asked for a cleartext password over a connection without "
                "TLS; refusing to send it (set upstream.tls.mode)"
            )
        return password.encode() + b"\0"
    raise UpstreamError(
        f"upstream {where} asked for authentication method {plugin!r}; supported: "
        f"{', '.join(SUPPORTED)}"
    )


async def _authenticate(stream: _Stream, plugin: str, password: str, scramble: bytes) -> OkPacket:
    where = stream.where
    for _ in range(MAX_AUTH_ROUNDS):
        message = await stream.next()
        if isinstance(message, OkPacket):
            return message
        if isinstance(message, ErrPacket):
            raise UpstreamRefused(message, where)
        if isinstance(message, AuthSwitchRequest):
            plugin = message.plugin
            scramble = message.data[:-1] if message.data.endswith(b"\0") else message.data
            stream.send(AuthData(_respond(plugin, password, scramble, stream.conduit, where)))
        elif isinstance(message, AuthMoreData) and plugin == CACHING_SHA2:
            code = message.data[:1]
            if code == bytes([c.CACHING_SHA2_FAST_AUTH_SUCCESS]):
                continue  # the server's OK follows
            if code == bytes([c.CACHING_SHA2_PERFORM_FULL_AUTH]):
                if stream.conduit.is_tls:
                    stream.send(AuthData(password.encode() + b"\0"))
                else:
                    stream.send(AuthData(bytes([c.CACHING_SHA2_REQUEST_PUBLIC_KEY])))
                    key = await stream.next()
                    if not isinstance(key, AuthMoreData):
                        raise UpstreamError(f"upstream {where} sent no public key")
                    try:
                        encrypted = rsa_encrypted_password(password, scramble, key.data)
                    except ValueError as exc:
                        raise UpstreamError(f"upstream {where}: bad public key: {exc}") from None
                    stream.send(AuthData(encrypted))
            else:
                raise UpstreamError(f"upstream {where} sent unexpected caching_sha2 data")
        else:
            raise UpstreamError(
                f"upstream {where} sent {type(message).__name__} during authentication"
            )
    raise UpstreamError(f"upstream {where} asked for over {MAX_AUTH_ROUNDS} auth round trips")


def ok_payload(ok: OkPacket) -> bytes:
    """The upstream's OK as its payload, to relay to the client with the client's sequence."""
    return payload(ok)
