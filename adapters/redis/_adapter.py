"""The Redis adapter: the broker as a Redis server to the client, and as a client (with a
just-in-time ACL user) to the real server. These are the protocol steps of the core's
session life cycle (`broker.session.lifecycle`).

1. Hello: none. Redis has no opening message; under ``client_auth: mtls`` the listener does
   the TLS handshake (``tls_first``) and the client's certificate is its identity.
2. Login: connect (TLS per ``upstream.tls.mode``), ``AUTH <user> <password>`` with the
   credential, before the client's first command reaches the server. The session stays in
   RESP2 until the client's own HELLO asks otherwise.
3. Greet: nothing to say; the client's commands, already waiting, go upstream.
4. Splice, through `SessionFilter`: the client's AUTH and HELLO ... AUTH are answered with
   the broker's user, RESET is refused (see `_filter`).

Token callers (``client_auth: jwt`` / ``mtls+jwt``, over TLS, no certificate needed): the
token is the client's password: its first command must be ``AUTH [user] <token>`` or
``HELLO <proto> AUTH <user> <token>``. The broker reads the token from it and puts the
command back, so the splice's filter answers it with the broker's user, in order; the token
never goes upstream.

A refused client gets a RESP error naming the identity and the service, as the answer to
each command it sends for a few seconds (`deliver_refusal`): clients send a command or two
on connect whose errors they ignore (redis-py's CLIENT SETINFO).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from broker.codecs.resp import (
    Command,
    CommandScanner,
    ErrorReply,
    ProtocolError,
    ReplyParser,
    SimpleString,
    encode,
    encode_command,
)
from broker.config import Section
from broker.credentials import Credential
from broker.errors import ClientError, ConfigError, UpstreamError, UpstreamTimeout
from broker.identity import IdentityError
from broker.session.context import ServiceContext
from broker.session.lifecycle import Refusal, Session, Step, TcpAdapter, Upstream
from broker.session.net import Conduit, connect
from broker.session.splice import StreamFilter
from broker.session.upstream import UpstreamTarget

from ._config import parse_upstream
from ._filter import SessionFilter, hello_auth_pairs

# A refused client is answered for this long, or this many commands, then disconnected.
REFUSAL_LINGER_SECONDS = 5.0
MAX_REFUSED_COMMANDS = 16
# The user an AUTH with only a password logs in as (Redis's own rule).
DEFAULT_USER = "default"
# Error codes of the broker's replies: NOPERM is what Redis answers an ACL denial with.
CODE_OF_STEP: dict[Step, str] = {
    "identity": "NOPERM",
    "policy": "NOPERM",
    "request": "NOPERM",
    "credential": "ERR",
    "upstream_connect": "ERR",
    "upstream_login": "ERR",
    "audit": "ERR",
}
TLS_REQUIRED_JWT = (
    "this service requires TLS: use redis-cli --tls --cacert and your token as the password "
    "(-a, or AUTH <token>)"
)
# Told to a token caller whose first command carries no token (not a secret: S105 is wrong).
NO_TOKEN_SENT = (
    "this service takes a token: send AUTH <token> (or HELLO 3 AUTH <user> <token>) first"  # noqa: S105
)
MTLS_REQUIRED = (
    "this service requires TLS with a client certificate: use redis-cli --tls --cert --key --cacert"
)


@dataclass(slots=True)
class Hello:
    """Redis has no opening message: nothing to keep."""


class RedisAdapter(TcpAdapter[Hello]):
    """One redis service."""

    tls_first = True
    tls_required_message = MTLS_REQUIRED
    certificate_hint = (
        "use redis-cli --tls --cert --key --cacert (redis-py: ssl_certfile, ssl_keyfile)"
    )
    tls_required_jwt_message = TLS_REQUIRED_JWT
    # A server with only requirepass has no user names; an ACL user has both.
    credential_fields = ("password",)

    def __init__(self, ctx: ServiceContext) -> None:
        super().__init__(ctx)
        service = ctx.service
        section = Section(service.upstream, f"{service.where}.upstream")
        self.upstream: UpstreamTarget = parse_upstream(section, ctx.config.base_dir)
        if service.inject:
            raise ConfigError(f"{service.where}.inject: not used by the redis adapter")

    # -- protocol steps ----------------------------------------------------------------------

    async def hello(self, client: Conduit, deadline: float) -> Hello | None:
        return Hello()

    async def ask_token(self, client: Conduit, hello: Hello, deadline: float) -> str | None:
        """The token from the client's first command (AUTH, or HELLO ... AUTH), which goes
        back into the conduit for the splice's filter to answer with the broker's user."""
        loop = asyncio.get_running_loop()
        scanner = CommandScanner(frozenset({b"auth", b"hello"}))
        received = b""
        try:
            while True:
                data = await client.receive(max(deadline - loop.time(), 0.001))
                if not data:
                    raise ClientError("client closed the connection before sending its token")
                received += data
                for segment in scanner.feed(data):
                    if not isinstance(segment, Command):
                        raise IdentityError(NO_TOKEN_SENT)
                    token = _token_of(segment)
                    if token is None:
                        raise IdentityError(NO_TOKEN_SENT)
                    return token
        finally:
            # Whatever happens the command stays the client's: the filter answers it after
            # login, or deliver_refusal answers it with the refusal.
            client.unread(received)

    async def login(
        self, session: Session[Hello], credential: Credential, deadline: float
    ) -> Upstream:
        name, target = self.ctx.service.name, self.upstream
        user = credential.fields.get("username") or ""
        password = credential.fields["password"]
        loop = asyncio.get_running_loop()
        try:
            conduit = await connect(
                target.host,
                target.port,
                timeout=min(target.connect_timeout, max(deadline - loop.time(), 0.001)),
                ssl_context=target.ssl_context,
                server_hostname=target.server_name,
            )
        except UpstreamError as exc:
            raise Refusal(
                "upstream_connect", f"cannot reach the server of service {name}: {exc}",
                metric="connect",
            ) from None  # fmt: skip
        try:
            auth = ("AUTH", user, password) if user else ("AUTH", password)
            conduit.write(encode_command(*auth))
            parser = ReplyParser()
            while (reply := parser.next_reply()) is None:
                data = await conduit.receive(max(deadline - loop.time(), 0.001))
                if not data:
                    raise UpstreamError(f"upstream {target.address} closed the connection")
                parser.feed(data)
        except UpstreamTimeout:
            conduit.abort()
            raise Refusal(
                "upstream_login",
                f"the server of service {name} did not answer AUTH in time",
                metric="auth",
            ) from None
        except UpstreamError as exc:
            conduit.abort()
            raise Refusal(
                "upstream_login", f"cannot log in to the server of service {name}: {exc}",
                metric="auth",
            ) from None  # fmt: skip
        except BaseException:
            conduit.abort()
            raise
        if isinstance(reply, ErrorReply):
            conduit.abort()
            raise Refusal(
                "upstream_login",
                f"upstream {target.address} refused the login: {reply.message}",
                reply=encode(reply),
                metric="refused",
                audit={"upstream_error": reply.code},
                # The user of a leased credential is gone or has another password (a server
                # restarted without its ACL file, or a workload's ACL SETUSER): the core
                # replaces the lease and retries once.
                credential_rejected=reply.code == "WRONGPASS",
            )
        if reply != SimpleString("OK"):
            conduit.abort()
            raise Refusal(
                "upstream_login",
                f"upstream {target.address} answered AUTH with {type(reply).__name__}",
                metric="auth",
            )
        conduit.unread(parser.leftover())
        return Upstream(conduit, user or DEFAULT_USER, target.address, credential)

    def greet(self, session: Session[Hello], upstream: Upstream) -> None:
        return None

    def client_filter(self, session: Session[Hello], upstream: Upstream) -> StreamFilter:
        credential: Credential = upstream.state
        return SessionFilter(
            credential.fields.get("username") or DEFAULT_USER, credential.fields["password"]
        )

    def refusal_reply(self, refusal: Refusal, hello: Hello) -> bytes:
        return encode(ErrorReply(f"{CODE_OF_STEP[refusal.step]} {refusal.message}"))

    def protocol_error_reply(self, message: str) -> bytes:
        return encode(ErrorReply(f"ERR Protocol error: {message}"))

    def overload_reply(self, max_connections: int) -> bytes:
        # Redis's own words for its maxclients, with the broker's limit.
        return encode(
            ErrorReply(
                f"ERR max number of clients reached (service {self.ctx.service.name} allows "
                f"{max_connections})"
            )
        )

    async def deliver_refusal(self, client: Conduit, hello: Hello, reply: bytes) -> None:
        """Answer each command the client sends with `reply`, for a bounded time."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + REFUSAL_LINGER_SECONDS
        scanner = CommandScanner(frozenset())
        answered = 0
        try:
            while answered < MAX_REFUSED_COMMANDS and not client.is_closed:
                data = await client.receive(max(deadline - loop.time(), 0.001))
                if not data:
                    return
                scanner.feed(data)
                due = min(scanner.commands, MAX_REFUSED_COMMANDS) - answered
                if due > 0:
                    client.write(reply * due)
                    answered += due
        except (ClientError, ProtocolError):
            return


def _token_of(command: Command) -> str | None:
    """The password of an AUTH, or of HELLO's AUTH pair; None if the command has none."""
    raw: bytes | None = None
    if command.name == b"auth":
        raw = command.args[-1] if len(command.args) in (2, 3) else None
    elif pairs := hello_auth_pairs(command.args):
        raw = command.args[pairs[-1] + 1]
    if raw is None:
        return None
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError:
        raise IdentityError("the password is not a token (JWTs are ASCII)") from None
