"""The MySQL adapter: the broker as a MySQL server to the client, and as a client (with a
just-in-time credential) to the real MySQL or MariaDB. These are the protocol steps of the
core's session life cycle (`broker.session.lifecycle`).

1. Hello: the broker speaks first, with a greeting of its own offering ``CLIENT_SSL``
   (under ``client_auth: mtls``); the client's SSLRequest upgrades the connection to TLS with
   a required client certificate, then its HandshakeResponse41 arrives. Its user and
   password are ignored.
2. Request: the database the client names must be one of ``upstream.database``.
3. Login: connect, TLS per ``upstream.tls.mode``, log in with the credential
   (mysql_native_password, caching_sha2_password, client_ed25519, cleartext over TLS).
4. Greet: the client gets the upstream's OK packet with its own sequence number; then the
   core splices, through `CommandFilter` (COM_CHANGE_USER and other databases refused).

Token callers (``client_auth: jwt`` / ``mtls+jwt``, over TLS, no certificate needed): the
token is the password. The broker switches the client to ``mysql_clear_password``
(AuthSwitchRequest) unless it already answered with that method, and takes the token from
its reply, which never goes upstream.

Every refusal reaches the client as an ERR packet; the credential is only ever written to
the upstream connection.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
import string
from dataclasses import dataclass

from broker.codecs.mysql import (
    AuthData,
    AuthSwitchRequest,
    ClientParser,
    ErrPacket,
    HandshakeResponse41,
    HandshakeV10,
    ProtocolError,
    SSLRequest,
    encode,
    frame,
)
from broker.codecs.mysql import constants as c
from broker.config import Section
from broker.credentials import Credential
from broker.errors import ClientError, ConfigError, UpstreamError
from broker.identity import IdentityError
from broker.session.context import ServiceContext
from broker.session.lifecycle import Refusal, Session, Step, TcpAdapter, Upstream
from broker.session.net import Conduit
from broker.session.splice import StreamFilter

from ._auth import CLEAR, NATIVE
from ._config import UpstreamConfig, parse_upstream
from ._filter import CommandFilter
from ._upstream import (
    BROKER_CAPABILITIES,
    Authenticated,
    ConnectFailed,
    UpstreamRefused,
    login,
    ok_payload,
)

# Connecting, logging in and sending KILL QUERY for a vanished client's statement.
KILL_TIMEOUT = 10.0
# The greeting's server version until the broker has seen the upstream's own.
DEFAULT_SERVER_VERSION = "8.0.0-Sidekey"
# Connection ids in the broker's greetings start here: above any thread id a server hands
# out, so a client's KILL with one never names another session's thread.
CONNECTION_ID_BASE = 0x80000000
# A scramble of printable characters, as MySQL's own (some clients stop at a NUL).
_SCRAMBLE_ALPHABET = string.ascii_letters + string.digits
SCRAMBLE_LENGTH = 20

# MySQL error codes (include/mysqld_error.h) and SQLSTATEs of the broker's refusals.
ER_ACCESS_DENIED_ERROR = (1045, "28000")
ER_DBACCESS_DENIED_ERROR = (1044, "42000")
ER_HANDSHAKE_ERROR = (1043, "08S01")
ER_UNKNOWN_ERROR = (1105, "HY000")
ER_CON_COUNT_ERROR = (1040, "08004")
ERROR_OF_STEP: dict[Step, tuple[int, str]] = {
    "identity": ER_ACCESS_DENIED_ERROR,
    "policy": ER_ACCESS_DENIED_ERROR,
    "request": ER_DBACCESS_DENIED_ERROR,
    "credential": ER_UNKNOWN_ERROR,
    "upstream_connect": ER_UNKNOWN_ERROR,
    "upstream_login": ER_UNKNOWN_ERROR,
    "audit": ER_UNKNOWN_ERROR,
}
# Where a protocol error is noticed the client has sent at most its response (seq 1, or 2
# after TLS): the broker's ERR then carries 2, what most clients expect there.
PROTOCOL_ERROR_SEQ = 2
MTLS_REQUIRED = (
    "this service requires TLS with a client certificate: use --ssl-mode=VERIFY_IDENTITY "
    "(mariadb: --ssl-verify-server-cert) with --ssl-ca, --ssl-cert and --ssl-key"
)
TLS_REQUIRED_JWT = (
    "this service requires TLS: use --ssl (with --ssl-verify-server-cert) and your token as "
    "the password (the cleartext method: --enable-cleartext-plugin where the client asks)"
)
_COMPRESSION = c.CLIENT_COMPRESS | c.CLIENT_ZSTD_COMPRESSION_ALGORITHM


@dataclass(slots=True)
class Hello:
    response: HandshakeResponse41
    # Holds the sequence numbers and whatever the client sent after its response.
    parser: ClientParser


class MysqlAdapter(TcpAdapter[Hello]):
    """One mysql service."""

    tls_required_message = MTLS_REQUIRED
    certificate_hint = "use --ssl-cert and --ssl-key (PyMySQL: ssl={'cert': ..., 'key': ...})"
    tls_required_jwt_message = TLS_REQUIRED_JWT
    no_tls_reason = "connection is not TLS (no SSLRequest)"

    def __init__(self, ctx: ServiceContext) -> None:
        super().__init__(ctx)
        service = ctx.service
        section = Section(service.upstream, f"{service.where}.upstream")
        self.upstream: UpstreamConfig = parse_upstream(section, ctx.config.base_dir)
        if service.inject:
            raise ConfigError(f"{service.where}.inject: not used by the mysql adapter")
        self.server_version = self.upstream.server_version or DEFAULT_SERVER_VERSION
        self._connection_ids = itertools.count(CONNECTION_ID_BASE)
        # KILL QUERYs sent for vanished clients' sessions (see `release`).
        self._orphan_kills: set[asyncio.Task[None]] = set()
        self._capabilities = BROKER_CAPABILITIES | (c.CLIENT_SSL if ctx.server_ssl else 0)

    # -- protocol steps ----------------------------------------------------------------------

    async def hello(self, client: Conduit, deadline: float) -> Hello | None:
        loop = asyncio.get_running_loop()
        parser = ClientParser()
        scramble = "".join(secrets.choice(_SCRAMBLE_ALPHABET) for _ in range(SCRAMBLE_LENGTH))
        greeting = HandshakeV10(
            server_version=self.server_version,
            connection_id=next(self._connection_ids) & 0xFFFFFFFF,
            scramble=scramble.encode(),
            capabilities=self._capabilities,
            charset=c.UTF8MB4_GENERAL_CI,
            status=c.SERVER_STATUS_AUTOCOMMIT,
            auth_plugin=NATIVE,
        )
        client.write(encode(greeting, parser.next_seq()))
        while True:
            while (message := parser.next_message()) is None:
                data = await client.receive(max(deadline - loop.time(), 0.001))
                if not data:
                    return None
                parser.feed(data)
            if isinstance(message, SSLRequest):
                if self.ctx.server_ssl is None:
                    raise ProtocolError("TLS was not offered (client_auth: local)")
                client.unread(parser.take_tls_bytes())
                await self.upgrade_tls(client, deadline, early_tls=True)
                continue
            assert isinstance(message, HandshakeResponse41)
            if message.capabilities & _COMPRESSION:
                raise ProtocolError("the broker does not offer the compressed protocol")
            return Hello(message, parser)

    async def ask_token(self, client: Conduit, hello: Hello, deadline: float) -> str | None:
        """The token as the password, in cleartext (the core calls this over TLS only)."""
        response = hello.response
        if response.auth_plugin == CLEAR:
            raw = response.auth_response
        elif not response.capabilities & c.CLIENT_PLUGIN_AUTH:
            # Only an AuthSwitchRequest can ask for the cleartext method (pre-5.5 clients).
            raise IdentityError(
                "this client cannot switch authentication methods (no CLIENT_PLUGIN_AUTH), "
                "so it cannot send a token"
            )
        else:
            loop = asyncio.get_running_loop()
            parser = hello.parser
            client.write(encode(AuthSwitchRequest(CLEAR, b""), parser.next_seq()))
            while (message := parser.next_message()) is None:
                data = await client.receive(max(deadline - loop.time(), 0.001))
                if not data:
                    raise ClientError("client closed the connection when asked for a token")
                parser.feed(data)
            if not isinstance(message, AuthData):  # pragma: no cover - only AuthData now
                raise ProtocolError(f"expected auth data, got {type(message).__name__}")
            raw = message.data
        token = raw[:-1] if raw.endswith(b"\0") else raw
        try:
            return token.decode("ascii")
        except UnicodeDecodeError:
            raise IdentityError("the password is not a token (JWTs are ASCII)") from None

    def check_request(self, session: Session[Hello]) -> dict[str, str]:
        allowed = self.upstream.databases
        database = session.hello.response.database or allowed[0]
        if database not in allowed:
            raise Refusal(
                "request",
                f"database '{database}' is not available through service "
                f"{self.ctx.service.name} (allowed: {', '.join(allowed)})",
            )
        return {"database": database}

    async def login(
        self, session: Session[Hello], credential: Credential, deadline: float
    ) -> Upstream:
        name, target = self.ctx.service.name, self.upstream.target
        user, password = credential.fields["username"], credential.fields["password"]
        try:
            auth = await login(
                target, session.hello.response, user, password, session.request["database"],
                deadline,
            )  # fmt: skip
        except ConnectFailed as exc:
            raise Refusal(
                "upstream_connect", f"cannot reach the database of service {name}: {exc}",
                metric="connect",
            ) from None  # fmt: skip
        except UpstreamRefused as exc:
            raise Refusal(
                "upstream_login",
                str(exc),
                reply=encode(exc.err, 0),  # deliver_refusal numbers it
                metric="refused",
                audit={"upstream_error": exc.err.code},
            ) from None
        except UpstreamError as exc:
            raise Refusal(
                "upstream_login", f"cannot log in to the database of service {name}: {exc}",
                metric="auth",
            ) from None  # fmt: skip
        auth.credential = credential
        return Upstream(auth.conduit, user, target.address, auth)

    def greet(self, session: Session[Hello], upstream: Upstream) -> None:
        auth: Authenticated = upstream.state
        if self.upstream.server_version is None:
            self.server_version = auth.greeting.server_version
        hello = session.hello
        session.client.write(frame(ok_payload(auth.ok), hello.parser.next_seq()))
        session.client.unread(hello.parser.leftover())
        upstream.conduit.unread(auth.leftover)

    def client_filter(self, session: Session[Hello], upstream: Upstream) -> StreamFilter:
        return CommandFilter(self.upstream.databases, self.ctx.service.name)

    def release(self, session: Session[Hello], upstream: Upstream) -> None:
        auth: Authenticated = upstream.state
        stats = session.stats
        if (
            auth.credential is not None
            and not stats.kept
            and stats.ended_by == "error"
            and (stats.error or "").startswith("client:")
        ):
            # The client was reset (its process or host died). The server does not notice
            # the closed upstream socket while a statement runs (a SLEEP, a long scan), so
            # the statement would run to its end holding its locks: KILL QUERY it, over a
            # connection of the same user. A client that leaves cleanly (COM_QUIT) costs
            # nothing.
            self._kill_orphan(session, auth.greeting.connection_id, auth.credential)

    def _kill_orphan(self, session: Session[Hello], thread: int, credential: Credential) -> None:
        target, name = self.upstream.target, self.ctx.service.name
        user, password = credential.fields["username"], credential.fields["password"]

        async def kill() -> None:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + KILL_TIMEOUT
            try:
                auth = await login(
                    target, session.hello.response, user, password,
                    session.request["database"], deadline,
                )  # fmt: skip
            except UpstreamError as exc:
                self.ctx.metrics.upstream_errors.labels(name, "cancel").inc()
                self.ctx.log.warning("killing a vanished client's query failed: %s", exc)
                return
            try:
                auth.conduit.write(frame(bytes([c.COM_QUERY]) + f"KILL QUERY {thread}".encode(), 0))
                await auth.conduit.receive(max(deadline - loop.time(), 0.001))
            except UpstreamError as exc:
                self.ctx.log.warning("killing a vanished client's query failed: %s", exc)
            finally:
                auth.conduit.close()

        self.ctx.log.info(
            "client %s was reset mid-session: killing whatever its upstream session (thread "
            "%d) still runs",
            session.client.peer,
            thread,
        )
        session.end["upstream_cancelled"] = True
        task = asyncio.get_running_loop().create_task(kill())
        self._orphan_kills.add(task)
        task.add_done_callback(self._orphan_kills.discard)

    def refusal_reply(self, refusal: Refusal, hello: Hello) -> bytes:
        code, sqlstate = ERROR_OF_STEP[refusal.step]
        return encode(ErrPacket(code, refusal.message, sqlstate), 0)

    def overload_reply(self, max_connections: int) -> bytes:
        code, sqlstate = ER_CON_COUNT_ERROR
        message = f"Too many connections: service {self.ctx.service.name} allows {max_connections}"
        return encode(ErrPacket(code, message, sqlstate), 0)

    async def deliver_refusal(self, client: Conduit, hello: Hello, reply: bytes) -> None:
        """Write the ERR packet `reply` with the sequence number the client expects next
        (every refusal is built with 0: only here is the hello's count known to be final)."""
        client.write(reply[:3] + bytes([hello.parser.next_seq()]) + reply[4:])

    def protocol_error_reply(self, message: str) -> bytes:
        code, sqlstate = ER_HANDSHAKE_ERROR
        return encode(ErrPacket(code, f"Bad handshake: {message}", sqlstate), PROTOCOL_ERROR_SEQ)
