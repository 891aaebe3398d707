"""The PostgreSQL adapter: the broker as a PostgreSQL server to the client, and as a client
(with a just-in-time credential) to the real server. These are the protocol steps of the
core's session life cycle (`broker.session.lifecycle`), which does identify, authorize, the
credential, audit and the splice.

1. Hello: take a direct TLS ClientHello (libpq 17's ``sslnegotiation=direct``, ALPN
   ``postgresql`` required) or answer SSLRequest (TLS with a required client certificate under
   ``client_auth: mtls``, an optional one under ``mtls+jwt``, none under ``jwt``; 'N' under
   ``local``), decline GSSENCRequest, serve a CancelRequest, or read the StartupMessage.
   Token: when the service takes tokens and no certificate proved the caller, ask for a
   cleartext password (AuthenticationCleartextPassword, over TLS only) and take the token
   from the PasswordMessage, which never goes upstream.
2. Request: the client's ``user`` is ignored; its ``database`` must be one of
   ``upstream.database``.
3. Login: connect, TLS per ``upstream.tls.mode``, StartupMessage with the credential's user,
   SCRAM-SHA-256 / MD5 / cleartext (TLS only) authentication.
4. Greet: the client gets AuthenticationOk, the server's ParameterStatus messages, a
   BackendKeyData with the server's process id and a secret minted by the broker
   (`_cancel.py`), and ReadyForQuery; then the core splices.

Every refusal reaches the client as an ErrorResponse with a SQLSTATE; the credential is only
ever written to the upstream connection.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from broker.codecs.postgres import (
    RESET_QUERY,
    AuthenticationCleartextPassword,
    AuthenticationOk,
    BackendKeyData,
    BackendMessage,
    CancelRequest,
    ErrorResponse,
    FrontendParser,
    GSSENCRequest,
    PasswordChangeGuard,
    PasswordMessage,
    ProtocolError,
    ResetReader,
    SessionTracker,
    SSLRequest,
    StartupMessage,
    encode,
)
from broker.config import Section
from broker.config.jwt import DEFAULT_TOKEN_HEADER
from broker.credentials import Credential
from broker.errors import ClientError, ConfigError, UpstreamError
from broker.identity import IdentityError
from broker.session.adapter import Adapter
from broker.session.context import ServiceContext
from broker.session.lifecycle import Refusal, Session, Step, TcpAdapter, Upstream
from broker.session.net import Conduit
from broker.session.pool import Key, SessionWatch
from broker.session.splice import StreamFilter
from broker.session.upstream import LoginStream

from ._cancel import (
    CANCEL_TOPIC,
    CancelCaller,
    CancelKeys,
    CancelTarget,
    SiblingCancelRate,
    cancel_fields,
    parse_cancel_fields,
)
from ._config import UpstreamConfig, parse_upstream
from ._scram import ScramKeyCache
from ._upstream import (
    Authenticated,
    UpstreamRefused,
    authenticate,
    open_connection,
    send_cancel,
    set_role,
    startup_for_upstream,
)

# Forwarding one CancelRequest: connect, TLS, write, wait for the server to hang up.
CANCEL_TIMEOUT = 5.0
# How often a peer's cancels over the rate passed to sibling workers are logged, at most.
LIMITED_CANCELS_LOG_SECONDS = 60.0

# The first byte of a TLS handshake record: a client that opens with a ClientHello instead of
# an SSLRequest (libpq 17's sslnegotiation=direct). No SSLRequest or StartupMessage can start
# with it: their length field would be over 369 MB.
TLS_HANDSHAKE_RECORD = b"\x16"
# The ALPN protocol name PostgreSQL 17 registered, and requires of direct TLS connections.
ALPN_POSTGRESQL = "postgresql"

# SQLSTATEs we answer with (PostgreSQL's errcodes.txt).
INVALID_AUTHORIZATION = "28000"
PROTOCOL_VIOLATION = "08P01"
CONNECTION_FAILURE = "08006"  # no credential: the session cannot be established
CANNOT_CONNECT = "08001"  # the upstream is down, refused TLS, or failed authentication
CREDENTIAL_REFUSED = "28P01"  # invalid_password: the lease was changed or dropped
# The broker cannot write its audit trail (audit.required): a resource of the server's side,
# worth retrying later.
INSUFFICIENT_RESOURCES = "53000"
TOO_MANY_CONNECTIONS = "53300"  # over the service's max_connections, as the server says it
SQLSTATE_OF_STEP: dict[Step, str] = {
    "identity": INVALID_AUTHORIZATION,
    "policy": INVALID_AUTHORIZATION,
    "request": INVALID_AUTHORIZATION,
    "credential": CONNECTION_FAILURE,
    "upstream_connect": CANNOT_CONNECT,
    "upstream_login": CANNOT_CONNECT,
    "audit": INSUFFICIENT_RESOURCES,
}
MTLS_REQUIRED = (
    "this service requires TLS with a client certificate: use sslmode=verify-full with "
    "sslcert/sslkey"
)
# Added to "no client certificate: ..." for a TLS client that sent none (libpq's sslmode=require
# without sslcert, asyncpg's ssl=True).
CERTIFICATE_HINT = (
    "set sslcert and sslkey (PGSSLCERT/PGSSLKEY) to the SVID and its key, with "
    "sslmode=verify-full and sslrootcert set to the trust bundle; docs/drivers.md shows each "
    "driver's settings"
)
TLS_REQUIRED_JWT = (
    "this service requires TLS: use sslmode=verify-full (or require) and your token as the "
    "password (PGPASSWORD)"
)


@dataclass(slots=True)
class Hello:
    message: StartupMessage
    # Holds whatever the client sent after its StartupMessage: it goes upstream, in order.
    parser: FrontendParser


class _Watch:
    """SessionWatch of a pooled session: the tracker's two filters and its idle test."""

    __slots__ = ("client", "idle", "upstream")

    def __init__(self, tracker: SessionTracker) -> None:
        self.client = tracker.client
        self.upstream = tracker.upstream
        self.idle = tracker.idle


@dataclass(slots=True)
class _Login:
    """The upstream side of a logged-in session, for greet and release."""

    greeting: Authenticated
    leftover: bytes
    # The BackendKeyData this session's client got (the server's pid, the broker's secret).
    cancel_key: tuple[int, bytes] | None = None
    # The password-change guard of this session, under guard.deny_password_change.
    guard: PasswordChangeGuard | None = None
    # The server's own BackendKeyData (its pid and secret), to cancel what a vanished client
    # left running.
    upstream_key: tuple[int, bytes] | None = None


class PostgresAdapter(TcpAdapter[Hello]):
    """One postgres service: its cancel keys and SCRAM key cache."""

    tls_required_message = MTLS_REQUIRED
    tls_alpn = (ALPN_POSTGRESQL,)
    tls_required_jwt_message = TLS_REQUIRED_JWT
    certificate_hint = CERTIFICATE_HINT
    no_tls_reason = "connection is not TLS (no SSLRequest)"

    def __init__(self, ctx: ServiceContext) -> None:
        super().__init__(ctx)
        service = ctx.service
        section = Section(service.upstream, f"{service.where}.upstream")
        self.upstream: UpstreamConfig = parse_upstream(section, ctx.config.base_dir)
        if service.inject:
            raise ConfigError(f"{service.where}.inject: not used by the postgres adapter")
        guard = Section(service.guard, f"{service.where}.guard")
        # Rewrite ALTER ROLE/USER ... PASSWORD (and psql's \password) into an error: see
        # broker/codecs/postgres/_guard.py for what this can and cannot see.
        self.deny_password_change: bool = guard.boolean("deny_password_change", False)
        guard.finish()
        if service.jwt is not None and service.jwt.header != DEFAULT_TOKEN_HEADER:
            raise ConfigError(
                f"{service.where}.jwt.header: not used by the postgres adapter (the token is "
                "the password)"
            )
        self.cancel_keys = CancelKeys()
        # The adapters of this service that reloads replaced while their sessions drain: a
        # cancel for one of those sessions comes to this adapter's listener (take_over).
        self._predecessors: list[PostgresAdapter] = []
        self._stopped = False
        # Cancels sent in the background, each within CANCEL_TIMEOUT: for vanished clients'
        # sessions (see `release`), and for sessions of ours a sibling worker got the
        # CancelRequest of (`sibling_request`).
        self._cancels: set[asyncio.Task[None]] = set()
        # Cancels passed to sibling workers, per peer address (_cancel.SiblingCancelRate),
        # and when the last one over the rate was logged.
        self._sibling_rate = SiblingCancelRate()
        self._limited_said = -LIMITED_CANCELS_LOG_SECONDS
        self.scram_keys = ScramKeyCache()

    # -- protocol steps ----------------------------------------------------------------------

    async def hello(self, client: Conduit, deadline: float) -> Hello | None:
        """Read up to the StartupMessage; None if the connection ends (or was a cancel)."""
        loop = asyncio.get_running_loop()
        parser = FrontendParser()
        first = True
        while True:
            while (message := parser.next_message()) is None:
                if parser.finished:
                    return None
                data = await client.receive(max(deadline - loop.time(), 0.001))
                if not data:
                    return None
                if first and data[:1] == TLS_HANDSHAKE_RECORD and self.ctx.server_ssl is not None:
                    await self._direct_tls(client, parser, data, deadline)
                    first = False
                    continue
                first = False
                parser.feed(data)
            if isinstance(message, SSLRequest):
                accept = self.ctx.server_ssl is not None
                client.write(parser.answer_encryption_request(accept))
                if accept:
                    await self.upgrade_tls(client, deadline)
            elif isinstance(message, GSSENCRequest):
                # No GSSAPI here; the client goes on with SSLRequest or StartupMessage.
                client.write(parser.answer_encryption_request(False))
            elif isinstance(message, CancelRequest):
                await self._cancel(client, message)
                return None
            elif isinstance(message, StartupMessage):
                return Hello(message, parser)
            else:  # pragma: no cover - the parser only yields the above before startup
                raise ProtocolError(f"unexpected {type(message).__name__} before startup")

    async def _direct_tls(
        self, client: Conduit, parser: FrontendParser, data: bytes, deadline: float
    ) -> None:
        """``sslnegotiation=direct`` (libpq 17+): the ClientHello without an SSLRequest, on
        the same listener. As PostgreSQL does, the client must name ALPN ``postgresql``: a
        TLS client of some other protocol must not get this far by accident."""
        parser.start_direct_tls()
        client.unread(data)
        await self.upgrade_tls(client, deadline, early_tls=True)
        ssl_object = client.ssl_object
        alpn = ssl_object.selected_alpn_protocol() if ssl_object is not None else None
        if alpn != ALPN_POSTGRESQL:
            raise ProtocolError(
                "direct TLS connection without ALPN protocol 'postgresql': use libpq 17+ "
                "with sslnegotiation=direct, or the default sslnegotiation=postgres"
            )

    async def ask_token(self, client: Conduit, hello: Hello, deadline: float) -> str | None:
        """AuthenticationCleartextPassword, and the token from the PasswordMessage; the
        message is consumed here, so only what follows it is left for the upstream."""
        loop = asyncio.get_running_loop()
        parser = hello.parser
        parser.expect_password(PasswordMessage)
        client.write(encode(AuthenticationCleartextPassword()))
        while (message := parser.next_message()) is None:
            if parser.finished:
                raise ClientError("client ended the session instead of sending a token")
            data = await client.receive(max(deadline - loop.time(), 0.001))
            if not data:
                raise ClientError("client closed the connection when asked for a token")
            parser.feed(data)
        if not isinstance(message, PasswordMessage):
            raise ProtocolError(f"expected a password message, got {type(message).__name__}")
        try:
            return message.password.decode("ascii")
        except UnicodeDecodeError:
            raise IdentityError("the password is not a token (JWTs are ASCII)") from None

    def check_request(self, session: Session[Hello]) -> dict[str, str]:
        allowed = self.upstream.databases
        # Without a database parameter the server would use the user name, which here is
        # the client's untrusted one: use the service's first database instead.
        database = session.hello.message.get("database") or allowed[0]
        if database not in allowed:
            raise Refusal(
                "request",
                f'database "{database}" is not available through service '
                f"{self.ctx.service.name} (allowed: {', '.join(allowed)})",
            )
        return {"database": database}

    async def login(
        self, session: Session[Hello], credential: Credential, deadline: float
    ) -> Upstream:
        name = self.ctx.service.name
        user, password = credential.fields["username"], credential.fields["password"]
        database = session.request["database"]
        try:
            conduit, stream = await open_connection(self.upstream.target, deadline)
        except UpstreamError as exc:
            raise Refusal(
                "upstream_connect",
                f"cannot reach the database of service {name}: {exc}",
                metric="connect",
            ) from None
        try:
            greeting = await authenticate(
                stream,
                startup_for_upstream(session.hello.message, user, database),
                password,
                self.scram_keys,
            )
        except UpstreamRefused as exc:
            conduit.abort()
            raise Refusal(
                "upstream_login",
                str(exc),
                reply=encode(exc.response),
                metric="refused",
                audit={"upstream_sqlstate": exc.response.sqlstate},
                credential_rejected=exc.response.sqlstate == CREDENTIAL_REFUSED,
            ) from None
        except UpstreamError as exc:
            conduit.abort()
            raise Refusal(
                "upstream_login",
                f"cannot log in to the database of service {name}: {exc}",
                metric="auth",
            ) from None
        except BaseException:
            conduit.abort()
            raise
        role = self.upstream.set_role
        if role is not None:
            await self._set_role(conduit, stream, greeting, role)
        login = _Login(greeting, stream.parser.leftover())
        return Upstream(conduit, user, self.upstream.target.address, login)

    async def _set_role(
        self,
        conduit: Conduit,
        stream: LoginStream[BackendMessage],
        greeting: Authenticated,
        role: str,
    ) -> None:
        """upstream.set_role: SET ROLE before the client's first message; what the server
        said to it joins the greeting, in place of the login's ReadyForQuery."""
        try:
            said = await set_role(stream, role)
        except UpstreamRefused as exc:
            conduit.abort()
            raise Refusal(
                "upstream_login",
                f"service {self.ctx.service.name}: SET ROLE {role} (upstream.set_role) failed: "
                f"{exc.response.message}; the vault's creation statements must grant "
                f"{role} to each dynamic user (docs/adapters/postgres.md)",
                metric="set_role",
                audit={"upstream_sqlstate": exc.response.sqlstate},
            ) from None
        except UpstreamError as exc:
            conduit.abort()
            raise Refusal(
                "upstream_login",
                f"service {self.ctx.service.name}: SET ROLE {role} failed: {exc}",
                metric="set_role",
            ) from None
        except BaseException:
            conduit.abort()
            raise
        greeting.messages[-1:] = said

    def greet(self, session: Session[Hello], upstream: Upstream) -> None:
        """AuthenticationOk, the server's startup messages with a BackendKeyData carrying
        the server's process id and the broker's own secret, and ReadyForQuery."""
        login: _Login = upstream.state
        greeting = login.greeting
        out = bytearray()
        if greeting.negotiate is not None:
            out += encode(greeting.negotiate)
        out += encode(AuthenticationOk())
        for message in greeting.messages:
            if isinstance(message, BackendKeyData):
                target = CancelTarget(
                    message.process_id, message.secret_key, session.identity.spiffe_id
                )
                login.cancel_key = self.cancel_keys.issue(target)
                login.upstream_key = (message.process_id, message.secret_key)
                out += encode(BackendKeyData(*login.cancel_key))
            else:
                out += encode(message)
        session.client.write(bytes(out))
        session.client.unread(session.hello.parser.leftover())
        upstream.conduit.unread(login.leftover)

    # -- session reuse (`pool:`) --------------------------------------------------------------

    def pool_key(self, session: Session[Hello]) -> Key:
        """A pooled connection serves a client of the same identity that asks for the same
        database with the same startup parameters (application_name, options, encoding...):
        what the server set up at login is then what this client would have got."""
        message = session.hello.message
        params = tuple(sorted((k, v) for k, v in message.parameters if k != "user"))
        return (session.request["database"], message.protocol_version, params)

    def watch(self, session: Session[Hello], upstream: Upstream) -> SessionWatch:
        return _Watch(SessionTracker())

    async def reset(self, upstream: Upstream, deadline: float) -> bool:
        """DISCARD ALL, and the answer must be clean and idle (see codecs' ResetReader)."""
        conduit = upstream.conduit
        if conduit.is_closed or conduit.buffered:
            return False
        conduit.write(RESET_QUERY)
        reader = ResetReader()
        loop = asyncio.get_running_loop()
        while True:
            data = await conduit.receive(max(deadline - loop.time(), 0.001))
            if not data:
                return False
            done = reader.feed(data)
            if done is not None:
                return done

    def reuse(self, upstream: Upstream) -> None:
        login: _Login = upstream.state
        login.leftover = b""
        login.cancel_key = None
        login.guard = None

    def client_filter(self, session: Session[Hello], upstream: Upstream) -> StreamFilter | None:
        if not self.deny_password_change:
            return None
        login: _Login = upstream.state
        login.guard = PasswordChangeGuard()
        return login.guard

    def release(self, session: Session[Hello], upstream: Upstream) -> None:
        login: _Login = upstream.state
        if login.cancel_key is not None:
            self.cancel_keys.forget(*login.cancel_key)
        if login.guard is not None and login.guard.refused:
            session.end["password_changes_refused"] = login.guard.refused
        stats = session.stats
        if (
            login.upstream_key is not None
            and not stats.kept
            and stats.ended_by == "error"
            and (stats.error or "").startswith("client:")
        ):
            # The client was reset (its process or host died) and the broker closes the
            # upstream connection; but a server busy with a query does not notice a closed
            # socket until it writes (unless client_connection_check_interval is set), so its
            # query would run on for as long as it takes, holding its locks. Cancel it. A
            # client that leaves cleanly sends Terminate first; this costs nothing then.
            self._cancel_orphan(session, *login.upstream_key)

    def _cancel_orphan(self, session: Session[Hello], process_id: int, secret: bytes) -> None:
        self.ctx.log.info(
            "client %s was reset mid-session: cancelling whatever its upstream session (pid %d) "
            "still runs",
            session.client.peer,
            process_id,
        )
        session.end["upstream_cancelled"] = True
        self._cancel_later(process_id, secret, "cancelling a vanished client's query")

    def _cancel_later(self, process_id: int, secret: bytes, what: str) -> None:
        task = asyncio.get_running_loop().create_task(self._send_cancel(process_id, secret, what))
        self._cancels.add(task)
        task.add_done_callback(self._cancels.discard)

    async def _send_cancel(self, process_id: int, secret: bytes, what: str) -> None:
        deadline = asyncio.get_running_loop().time() + CANCEL_TIMEOUT
        try:
            await send_cancel(self.upstream.target, process_id, secret, deadline)
        except UpstreamError as exc:
            self.ctx.metrics.upstream_errors.labels(self.ctx.service.name, "cancel").inc()
            self.ctx.log.warning("%s failed: %s", what, exc)

    def refusal_reply(self, refusal: Refusal, hello: Hello) -> bytes:
        sqlstate = SQLSTATE_OF_STEP[refusal.step]
        return encode(ErrorResponse.make("FATAL", sqlstate, refusal.message))

    def protocol_error_reply(self, message: str) -> bytes:
        return encode(ErrorResponse.make("FATAL", PROTOCOL_VIOLATION, message))

    def overload_reply(self, max_connections: int) -> bytes:
        # Sent after the TLS handshake and StartupMessage, where PostgreSQL says it too:
        # libpq ignores an error sent in answer to SSLRequest ("server sent an error response
        # during SSL exchange"), so answering earlier would tell the client nothing.
        return encode(
            ErrorResponse.make(
                "FATAL",
                TOO_MANY_CONNECTIONS,
                f"sorry, too many clients already: service {self.ctx.service.name} is at its "
                f"max_connections limit ({max_connections}); try again later",
            )
        )

    # -- cancel ------------------------------------------------------------------------------

    def take_over(self, previous: Adapter) -> None:
        if isinstance(previous, PostgresAdapter):
            self._predecessors = [previous, *previous._predecessors]
            previous._predecessors = []
            self._sibling_rate = previous._sibling_rate

    async def stop(self, drain_timeout: float) -> None:
        await super().stop(drain_timeout)
        self._stopped = True  # no session left: its keys need no answering

    def _find_cancel(
        self, process_id: int, secret_key: bytes
    ) -> tuple[PostgresAdapter, CancelTarget] | None:
        """The session a cancel key belongs to, among this adapter's and its predecessors'
        (each sends the cancel to its own upstream), or None."""
        self._predecessors = [p for p in self._predecessors if not p._stopped]
        for adapter in (self, *self._predecessors):
            target = adapter.cancel_keys.find(process_id, secret_key)
            if target is not None:
                return adapter, target
        return None

    async def _cancel(self, client: Conduit, request: CancelRequest) -> None:
        """Forward a cancel for one of our sessions, or one of a sibling worker's; ignore
        anything else silently, as PostgreSQL does (no answer tells a guesser whether a key
        exists)."""
        found = self._find_cancel(request.process_id, request.secret_key)
        siblings = self.ctx.siblings
        if found is None and siblings is None:
            self.ctx.log.debug("ignoring cancel with an unknown key from %s", client.peer)
            self._count_cancel("unknown")
            return
        caller = self._cancel_caller(client)
        if found is not None:
            owner, target = found
            if self._may_cancel(caller, target, ""):
                await owner._send_cancel(
                    target.process_id, target.secret_key, "forwarding a cancel"
                )
            return
        assert siblings is not None
        if not self._sibling_rate.allow(client.peer):
            self._count_cancel("limited")
            now = time.monotonic()
            if now - self._limited_said >= LIMITED_CANCELS_LOG_SECONDS:
                self._limited_said = now
                self.ctx.log.warning(
                    "cancels from %s over %.0f a second: not passed to the other workers "
                    "(dropped, as a cancel with an unknown key is; said once a minute)",
                    client.peer, self._sibling_rate.per_second,
                )  # fmt: skip
            return
        # Not a key of this worker's: the worker that served the session knows it, and
        # decides and cancels as if the cancel had come to it.
        fields = cancel_fields(request.process_id, request.secret_key, caller)
        try:
            answers = await siblings.ask(self.ctx.service.name, CANCEL_TOPIC, fields)
        except ValueError as exc:  # over the request limit, which no verified SPIFFE ID reaches
            self.ctx.log.debug("cannot pass a cancel to the other workers: %s", exc)
            return
        if not any(answer.get("known") is True for answer in answers):
            self._count_cancel("unknown")
            self.ctx.log.debug(
                "ignoring cancel with a key no worker knows from %s (%d of %d siblings "
                "answered)", client.peer, len(answers), len(siblings.others),
            )  # fmt: skip

    def _count_cancel(self, outcome: str) -> None:
        self.ctx.metrics.cancels.labels(self.ctx.service.name, outcome).inc()

    def _cancel_caller(self, client: Conduit) -> CancelCaller:
        ssl_object = client.ssl_object
        if ssl_object is None or not ssl_object.getpeercert(binary_form=True):
            return CancelCaller(certificate=False, spiffe_id=None)
        try:
            who: str | None = self.ctx.identify_tls(ssl_object).spiffe_id
        except IdentityError:
            who = None
        return CancelCaller(certificate=True, spiffe_id=who)

    def _may_cancel(self, caller: CancelCaller, target: CancelTarget, via: str) -> bool:
        if caller.may_cancel(target):
            self._count_cancel("forwarded")
            return True
        self._count_cancel("refused")
        self.ctx.log.info(
            "ignoring cancel from %s: not the session's identity%s", caller.spiffe_id, via
        )
        return False

    async def sibling_request(
        self, topic: str, fields: dict[str, Any], sender: int | None
    ) -> dict[str, Any] | None:
        """A sibling worker's CancelRequest with a key it does not know: `known` tells it
        whether the key is one of ours (it is never told more), and the cancel goes upstream
        from here, in the background, so the sibling waits only for the lookup."""
        if topic != CANCEL_TOPIC:
            return None
        process_id, secret_key, caller = parse_cancel_fields(fields)
        found = self._find_cancel(process_id, secret_key)
        if found is None:
            return {"known": False}
        owner, target = found
        if self._may_cancel(caller, target, f" (forwarded by worker {sender})"):
            owner._cancel_later(
                target.process_id, target.secret_key, "forwarding a sibling worker's cancel"
            )
        return {"known": True}
