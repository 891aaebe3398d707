"""The broker as a PostgreSQL client: connect, negotiate TLS, authenticate, send cancels.

Every wait is bounded by the deadline the caller passes; errors are UpstreamError (or
UpstreamTimeout) with messages that name the upstream and never a secret.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

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
    BackendMessage,
    BackendParser,
    CancelRequest,
    ErrorResponse,
    NegotiateProtocolVersion,
    NoticeResponse,
    ParameterStatus,
    PasswordMessage,
    ReadyForQuery,
    SASLInitialResponse,
    SASLResponse,
    SSLAnswer,
    SSLRequest,
    StartupMessage,
    Unknown,
    encode,
    md5_password,
)
from broker.errors import UpstreamError, UpstreamTimeout
from broker.session.net import Conduit, connect
from broker.session.upstream import LoginStream, UpstreamTarget

from ._scram import MECHANISM, ScramClient, ScramError, ScramKeyCache

# A server that has received our CancelRequest closes the connection at once; waiting this
# long for that close lets the cancel reach it before we hang up, without pinning the task.
CANCEL_CLOSE_WAIT = 2.0
# Messages a server may send between AuthenticationOk and ReadyForQuery (ParameterStatus,
# notices, BackendKeyData). PostgreSQL 15 sends about 15; a server that sends thousands is
# not behaving like one, and the client would get them all in one burst.
MAX_STARTUP_MESSAGES = 1000


class UpstreamRefused(UpstreamError):
    """The upstream answered with an ErrorResponse during startup; pass it to the client."""

    def __init__(self, response: ErrorResponse, upstream: str) -> None:
        super().__init__(
            f"upstream {upstream} refused the session: {response.sqlstate} {response.message}"
        )
        self.response = response


@dataclass(slots=True)
class Authenticated:
    """What the upstream said from authentication to ReadyForQuery, for the client."""

    # Sent by the server before authenticating: forward to the client first.
    negotiate: NegotiateProtocolVersion | None
    # ParameterStatus, NoticeResponse, BackendKeyData, ... in order, ending with ReadyForQuery.
    messages: list[BackendMessage] = field(default_factory=list)

    @property
    def backend_key(self) -> BackendKeyData | None:
        for message in self.messages:
            if isinstance(message, BackendKeyData):
                return message
        return None


async def open_connection(
    config: UpstreamTarget, deadline: float
) -> tuple[Conduit, LoginStream[BackendMessage]]:
    """Connect and, unless tls.mode is disable, negotiate TLS with an SSLRequest."""
    loop = asyncio.get_running_loop()
    timeout = min(config.connect_timeout, max(deadline - loop.time(), 0.001))
    conduit = await connect(config.host, config.port, timeout=timeout)
    parser = BackendParser()
    stream: LoginStream[BackendMessage] = LoginStream(
        conduit, parser, deadline, config.address, "startup"
    )
    try:
        if config.ssl_context is not None:
            conduit.write(encode(SSLRequest()))
            parser.expect_ssl_answer()
            answer = await stream.next()
            if not (isinstance(answer, SSLAnswer) and answer.accepted):
                raise UpstreamError(
                    f"upstream {config.address} does not offer TLS "
                    f"(upstream.tls.mode is {config.tls_mode})"
                )
            await conduit.start_tls(
                config.ssl_context,
                server_side=False,
                server_hostname=config.server_name,
                timeout=stream.remaining(),
            )
    except BaseException:
        conduit.abort()
        raise
    return conduit, stream


async def authenticate(
    stream: LoginStream[BackendMessage],
    startup: StartupMessage,
    password: str,
    scram_keys: ScramKeyCache,
) -> Authenticated:
    """Send `startup` and answer the server's authentication requests with `password`.

    Returns everything up to ReadyForQuery. Raises UpstreamRefused for the server's
    ErrorResponse, UpstreamError for anything else that goes wrong. The password is only ever
    written to this connection, and only as the method the server asked for allows: in
    cleartext only over TLS; SCRAM only as SCRAM-SHA-256 and the server must prove itself.
    """
    conduit, where = stream.conduit, stream.where
    user = startup.user
    conduit.write(encode(startup))
    result = Authenticated(negotiate=None)
    scram: ScramClient | None = None
    scram_verified = False
    while True:
        message = await stream.next()
        if isinstance(message, AuthenticationOk):
            if scram is not None and not scram_verified:
                # Skipping SASLFinal would skip the server's proof: a man in the middle (with
                # tls.mode require) could pose as the server.
                raise UpstreamError(f"upstream {where} ended SCRAM without proving its identity")
            break
        if isinstance(message, AuthenticationCleartextPassword):
            if not conduit.is_tls:
                raise UpstreamError(
                    f"upstream {where} asked for a cleartext password over a connection "
                    "without TLS; refusing to send it (set upstream.tls.mode)"
                )
            conduit.write(encode(PasswordMessage(password.encode("utf-8"))))
        elif isinstance(message, AuthenticationMD5Password):
            conduit.write(encode(PasswordMessage(md5_password(user, password, message.salt))))
        elif isinstance(message, AuthenticationSASL):
            if scram is not None:
                raise UpstreamError(f"upstream {where} restarted SASL authentication")
            if MECHANISM not in message.mechanisms:
                offered = ", ".join(message.mechanisms)
                raise UpstreamError(
                    f"upstream {where} offers SASL mechanisms {offered}; only {MECHANISM} "
                    "is supported"
                )
            scram = ScramClient(password, scram_keys)
            conduit.write(encode(SASLInitialResponse(MECHANISM, scram.client_first())))
        elif isinstance(message, AuthenticationSASLContinue):
            if scram is None:
                raise UpstreamError(f"upstream {where} sent SASLContinue before SASL")
            try:
                conduit.write(encode(SASLResponse(scram.client_final(message.data))))
            except ScramError as exc:
                raise UpstreamError(f"upstream {where}: SCRAM failed: {exc}") from None
        elif isinstance(message, AuthenticationSASLFinal):
            if scram is None:
                raise UpstreamError(f"upstream {where} sent SASLFinal before SASL")
            try:
                scram.verify_server_final(message.data)
            except ScramError as exc:
                raise UpstreamError(f"upstream {where}: SCRAM failed: {exc}") from None
            scram_verified = True
        elif isinstance(message, AuthenticationOther):
            raise UpstreamError(
                f"upstream {where} asked for an unsupported authentication method "
                f"(code {message.code}); use scram-sha-256, md5 or password in pg_hba.conf"
            )
        elif isinstance(message, ErrorResponse):
            raise UpstreamRefused(message, where)
        elif isinstance(message, NegotiateProtocolVersion):
            result.negotiate = message
        elif isinstance(message, NoticeResponse):
            result.messages.append(message)
        else:
            raise UpstreamError(
                f"upstream {where} sent {type(message).__name__} during authentication"
            )

    while True:
        message = await stream.next()
        if isinstance(message, ErrorResponse):
            raise UpstreamRefused(message, where)
        if not isinstance(message, ParameterStatus | NoticeResponse | BackendKeyData):
            if not isinstance(message, ReadyForQuery):
                raise UpstreamError(
                    f"upstream {where} sent {type(message).__name__} before ReadyForQuery"
                )
            result.messages.append(message)
            return result
        result.messages.append(message)
        if len(result.messages) > MAX_STARTUP_MESSAGES:
            raise UpstreamError(f"upstream {where} sent over {MAX_STARTUP_MESSAGES} messages")


async def send_cancel(
    config: UpstreamTarget, process_id: int, secret_key: bytes, deadline: float
) -> None:
    """Open a new connection (same TLS mode as sessions) and send one CancelRequest."""
    conduit, _ = await open_connection(config, deadline)
    try:
        conduit.write(encode(CancelRequest(process_id, secret_key)))
        # The server closes without answering; wait for that, so the request is delivered.
        loop = asyncio.get_running_loop()
        timeout = max(min(CANCEL_CLOSE_WAIT, deadline - loop.time()), 0.001)
        try:
            while await conduit.receive(timeout):
                pass
        except UpstreamTimeout:
            pass
    finally:
        conduit.close()


def startup_for_upstream(client: StartupMessage, user: str, database: str) -> StartupMessage:
    """The client's StartupMessage with the credential's user and the chosen database.

    Every other parameter (application_name, options, client_encoding, _pq_.*) and the
    protocol version pass through unchanged, so the server negotiates with what the client
    asked for.
    """
    rest = tuple((k, v) for k, v in client.parameters if k not in ("user", "database"))
    version = client.protocol_version if client.protocol_major == 3 else PROTOCOL_VERSION_3_0
    return StartupMessage(version, (("user", user), ("database", database), *rest))


def set_role_query(role: str) -> bytes:
    """The simple Query ``SET ROLE "role"`` (the name quoted as an identifier)."""
    quoted = '"' + role.replace('"', '""') + '"'
    return encode(Unknown(b"Q", f"SET ROLE {quoted}".encode() + b"\0"))


async def set_role(stream: LoginStream[BackendMessage], role: str) -> list[BackendMessage]:
    """Switch the logged-in session to `role` before the client says anything, so what it
    creates belongs to that stable group role and not to the lease's short-lived user.

    Returns what the server said on the way that the client should see too (ParameterStatus,
    NoticeResponse), followed by its ReadyForQuery. Raises UpstreamRefused with the server's
    error (the dynamic user is not a member of the role, or it does not exist)."""
    leftover = stream.parser.leftover()
    stream.conduit.write(set_role_query(role))
    parser = BackendParser()
    parser.feed(leftover)
    stream.parser = parser
    stream.phase = f"SET ROLE {role}"
    said: list[BackendMessage] = []
    error: ErrorResponse | None = None
    while True:
        message = await stream.next()
        if isinstance(message, ErrorResponse):
            error = message
        elif isinstance(message, ReadyForQuery):
            if error is not None:
                raise UpstreamRefused(error, stream.where)
            said.append(message)
            return said
        elif isinstance(message, ParameterStatus | NoticeResponse):
            said.append(message)
        elif not (isinstance(message, Unknown) and message.type == b"C"):
            raise UpstreamError(
                f"upstream {stream.where} answered SET ROLE with {type(message).__name__}"
            )
        if len(said) > MAX_STARTUP_MESSAGES:
            raise UpstreamError(
                f"upstream {stream.where} sent over {MAX_STARTUP_MESSAGES} messages"
            )
