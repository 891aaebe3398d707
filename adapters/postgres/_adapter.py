"""The PostgreSQL adapter: the broker as a PostgreSQL server to the client, and as a client
(with a just-in-time credential) to the real server.

One connection, in order:

1. Startup: answer SSLRequest (TLS with a required client certificate under
   ``client_auth: mtls``, 'N' under ``local``), decline GSSENCRequest, serve a CancelRequest,
   or read the StartupMessage.
2. Identity and policy: the SPIFFE ID of the client certificate (or the configured local
   identity), then `ctx.authorize`. The client's ``user`` is ignored; its ``database`` must be
   one of ``upstream.database``.
3. Credential: held with `ctx.credentials.use(identity)` for the whole session, so the lease
   manager knows the lease is in use.
4. Upstream: connect, TLS per ``upstream.tls.mode``, StartupMessage with the credential's
   user, SCRAM-SHA-256 / MD5 / cleartext (TLS only) authentication.
5. The client gets AuthenticationOk, the server's ParameterStatus messages, a BackendKeyData
   minted by the broker, and ReadyForQuery; then `broker.session.splice.splice` relays bytes.

Every error before the splice reaches the client as an ErrorResponse with a SQLSTATE; the
credential is only ever written to the upstream connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

from broker.codecs.postgres import (
    AuthenticationOk,
    BackendKeyData,
    CancelRequest,
    ErrorResponse,
    FrontendParser,
    GSSENCRequest,
    ProtocolError,
    SSLRequest,
    StartupMessage,
    encode,
)
from broker.config import Section
from broker.credentials import Credential
from broker.errors import ClientError, ConfigError, CredentialUnavailable, UpstreamError
from broker.identity import IdentityError, WorkloadIdentity
from broker.policy import Decision
from broker.session.adapter import Adapter, ServiceContext
from broker.session.net import Conduit, Listener, serve
from broker.session.splice import SpliceStats, splice

from ._cancel import CancelKeys, CancelTarget
from ._config import UpstreamConfig, parse_upstream
from ._scram import ScramKeyCache
from ._upstream import (
    Authenticated,
    UpstreamRefused,
    authenticate,
    open_connection,
    send_cancel,
    startup_for_upstream,
)

# From accepting a connection to its StartupMessage, TLS handshake included. libpq sends it
# at once; PostgreSQL's authentication_timeout is 60 s, but here there is no password to
# type, so a client that takes longer is stuck or hostile and holds a connection slot.
CLIENT_STARTUP_TIMEOUT = 15.0
# Getting a credential: a lease manager cache hit is immediate, a vault round trip takes
# milliseconds; past this the vault is down and the client gets 08006 instead of a hang.
CREDENTIAL_TIMEOUT = 15.0
# From TCP connect to the upstream's ReadyForQuery. SCRAM key derivation and backend start
# take milliseconds to a few hundred on a busy server.
UPSTREAM_STARTUP_TIMEOUT = 20.0
# Forwarding one CancelRequest: connect, TLS, write, wait for the server to hang up.
CANCEL_TIMEOUT = 5.0

# SQLSTATEs we answer with (PostgreSQL's errcodes.txt).
INVALID_AUTHORIZATION = "28000"
PROTOCOL_VIOLATION = "08P01"
CONNECTION_FAILURE = "08006"  # no credential: the session cannot be established
CANNOT_CONNECT = "08001"  # the upstream is down, refused TLS, or failed authentication
MTLS_REQUIRED = (
    "this service requires TLS with a client certificate: use sslmode=verify-full with "
    "sslcert/sslkey"
)


class _Refused(Exception):
    """End the connection with an ErrorResponse to the client and an audited outcome."""

    def __init__(self, response: ErrorResponse, outcome: str, reason: str) -> None:
        super().__init__(reason)
        self.response = response
        self.outcome = outcome


def _fatal(sqlstate: str, message: str, outcome: str) -> _Refused:
    return _Refused(ErrorResponse.make("FATAL", sqlstate, message), outcome, message)


@dataclass(slots=True)
class _Startup:
    message: StartupMessage
    # Holds whatever the client sent after its StartupMessage: it goes upstream, in order.
    parser: FrontendParser


@dataclass(slots=True)
class _Session:
    """One allowed session, from policy to the end of the splice."""

    client: Conduit
    startup: _Startup
    identity: WorkloadIdentity
    decision: Decision
    database: str | None = None
    stats: SpliceStats = field(default_factory=SpliceStats)
    started: float = field(default_factory=time.monotonic)
    # Extra fields of the session_end audit event.
    end: dict[str, Any] = field(default_factory=dict)


def _local_address(conduit: Conduit) -> str | None:
    """Our end of the upstream connection: matches client_port in pg_stat_activity."""
    if conduit.transport is None:
        return None
    sockname = conduit.transport.get_extra_info("sockname")
    if isinstance(sockname, tuple) and len(sockname) >= 2:
        return f"{sockname[0]}:{sockname[1]}"
    return None


class PostgresAdapter(Adapter):
    """One postgres service: its listener, cancel keys and SCRAM key cache."""

    def __init__(self, ctx: ServiceContext) -> None:
        super().__init__(ctx)
        service = ctx.service
        section = Section(service.upstream, f"{service.where}.upstream")
        self.upstream: UpstreamConfig = parse_upstream(section, ctx.config.base_dir)
        if service.inject:
            raise ConfigError(f"{service.where}.inject: not used by the postgres adapter")
        self.cancel_keys = CancelKeys()
        self.scram_keys = ScramKeyCache()
        self._listener: Listener | None = None
        # Metric children bound once: Counter.labels() costs ~5 us per call under load, and
        # every session made three such calls.
        self._sessions_active = ctx.metrics.sessions_active.labels(service.name)
        self._sessions_by_outcome: dict[str, Any] = {}

    async def start(self) -> None:
        service = self.ctx.service
        rejected = self.ctx.metrics.connections_rejected.labels(service.name)
        self._listener = await serve(
            service.listen,
            self._handle,
            max_connections=service.max_connections,
            on_reject=rejected.inc,
        )

    @property
    def address(self) -> str:
        if self._listener is None:
            raise RuntimeError("the adapter is not started")
        return str(self._listener.address)

    async def stop(self, drain_timeout: float) -> None:
        if self._listener is not None:
            await self._listener.close(drain_timeout)

    # -- one connection --------------------------------------------------------------------

    async def _handle(self, client: Conduit) -> None:
        try:
            startup = await self._startup(client)
        except ProtocolError as exc:
            # The client broke the protocol: say so if the connection can still carry it.
            self.ctx.log.info("protocol error from %s: %s", client.peer, exc)
            if not client.is_closed:
                client.write(encode(ErrorResponse.make("FATAL", PROTOCOL_VIOLATION, str(exc))))
            return
        if startup is not None:
            await self._session(client, startup)

    async def _startup(self, client: Conduit) -> _Startup | None:
        """Read up to the StartupMessage; None if the connection ends (or was a cancel)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CLIENT_STARTUP_TIMEOUT
        parser = FrontendParser()
        server_ssl = self.ctx.server_ssl
        while True:
            while (message := parser.next_message()) is None:
                if parser.finished:
                    return None
                data = await client.receive(max(deadline - loop.time(), 0.001))
                if not data:
                    return None
                parser.feed(data)
            if isinstance(message, SSLRequest):
                accept = server_ssl is not None
                client.write(parser.answer_encryption_request(accept))
                if server_ssl is not None:
                    try:
                        await client.start_tls(
                            server_ssl,
                            server_side=True,
                            timeout=max(deadline - loop.time(), 0.001),
                        )
                    except ClientError as exc:
                        # No certificate, or one that does not chain to the bundle: an
                        # unproven caller, worth an audit line like any other denial.
                        self.ctx.refuse(client.peer, str(exc))
                        raise
            elif isinstance(message, GSSENCRequest):
                # No GSSAPI here; the client goes on with SSLRequest or StartupMessage.
                client.write(parser.answer_encryption_request(False))
            elif isinstance(message, CancelRequest):
                await self._cancel(client, message)
                return None
            elif isinstance(message, StartupMessage):
                return _Startup(message, parser)
            else:  # pragma: no cover - the parser only yields the above before startup
                raise ProtocolError(f"unexpected {type(message).__name__} before startup")

    def _identify(self, client: Conduit) -> WorkloadIdentity:
        if self.ctx.service.client_auth == "local":
            return self.ctx.identify_local()
        if not client.is_tls:
            self.ctx.refuse(client.peer, "connection is not TLS (no SSLRequest)")
            raise _fatal(INVALID_AUTHORIZATION, MTLS_REQUIRED, "denied")
        try:
            return self.ctx.identify_tls(client.ssl_object)
        except IdentityError as exc:
            self.ctx.refuse(client.peer, str(exc))
            raise _fatal(INVALID_AUTHORIZATION, str(exc), "denied") from None

    async def _session(self, client: Conduit, startup: _Startup) -> None:
        ctx = self.ctx
        try:
            identity = self._identify(client)
        except _Refused as refused:
            client.write(encode(refused.response))
            return
        decision = ctx.authorize(identity, client.peer)
        if not decision.allow:
            client.write(
                encode(ErrorResponse.make("FATAL", INVALID_AUTHORIZATION, decision.reason))
            )
            self._count_session("denied")
            return

        # From here on the identity is allowed: every ending is one session_end event.
        session = _Session(client, startup, identity, decision)
        outcome = "error"
        self._sessions_active.inc()
        try:
            session.database = self._database(startup.message)
            async with contextlib.AsyncExitStack() as stack:
                credential = await self._credential(stack, identity)
                outcome = await self._proxy(session, credential)
        except _Refused as refused:
            outcome = refused.outcome
            session.end["error"] = str(refused)
            client.write(encode(refused.response))
        except asyncio.CancelledError:
            outcome = "cancelled"
            session.end["error"] = "broker shutting down"
            raise
        except ClientError as exc:
            outcome = "client_error"
            session.end["error"] = str(exc)
        except Exception as exc:
            session.end["error"] = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            if session.stats.ended_by is not None:
                session.end.setdefault("ended_by", session.stats.ended_by)
            self._sessions_active.dec()
            self._count_session(outcome)
            ctx.record(
                "session_end",
                identity=identity,
                peer=client.peer,
                decision=decision,
                outcome=outcome,
                database=session.database,
                bytes_client_to_upstream=session.stats.client_to_upstream,
                bytes_upstream_to_client=session.stats.upstream_to_client,
                duration_ms=round((time.monotonic() - session.started) * 1000, 1),
                **session.end,
            )

    def _count_session(self, outcome: str) -> None:
        child = self._sessions_by_outcome.get(outcome)
        if child is None:
            # Outcomes are a small fixed set of literals, so this dict stays small.
            child = self.ctx.metrics.sessions.labels(self.ctx.service.name, outcome)
            self._sessions_by_outcome[outcome] = child
        child.inc()

    def _database(self, startup: StartupMessage) -> str:
        allowed = self.upstream.databases
        # Without a database parameter the server would use the user name, which here is
        # the client's untrusted one: use the service's first database instead.
        database = startup.get("database") or allowed[0]
        if database not in allowed:
            raise _fatal(
                INVALID_AUTHORIZATION,
                f'database "{database}" is not available through service '
                f"{self.ctx.service.name} (allowed: {', '.join(allowed)})",
                "denied",
            )
        return database

    async def _credential(
        self, stack: contextlib.AsyncExitStack, identity: WorkloadIdentity
    ) -> Credential:
        name = self.ctx.service.name
        try:
            async with asyncio.timeout(CREDENTIAL_TIMEOUT):
                credential = await stack.enter_async_context(self.ctx.credentials.use(identity))
        except TimeoutError:
            self.ctx.metrics.upstream_errors.labels(name, "credential_timeout").inc()
            raise _fatal(
                CONNECTION_FAILURE,
                f"no credential for service {name}: the vault did not answer in "
                f"{CREDENTIAL_TIMEOUT:g}s",
                "credential_unavailable",
            ) from None
        except CredentialUnavailable as exc:
            raise _fatal(
                CONNECTION_FAILURE,
                f"no credential for service {name}: {exc}",
                "credential_unavailable",
            ) from None
        missing = [f for f in ("username", "password") if not credential.fields.get(f)]
        if missing:
            raise _fatal(
                CONNECTION_FAILURE,
                f"the credential of service {name} ({credential.ref.location}) has no "
                f"{' or '.join(missing)} field",
                "credential_unavailable",
            )
        return credential

    async def _proxy(self, session: _Session, credential: Credential) -> str:
        """Authenticate upstream, hand the client its greeting, splice; returns the outcome."""
        ctx, name, client = self.ctx, self.ctx.service.name, session.client
        user, password = credential.fields["username"], credential.fields["password"]
        assert session.database is not None
        deadline = asyncio.get_running_loop().time() + UPSTREAM_STARTUP_TIMEOUT
        try:
            upstream, stream = await open_connection(self.upstream, deadline)
        except UpstreamError as exc:
            ctx.metrics.upstream_errors.labels(name, "connect").inc()
            raise _fatal(
                CANNOT_CONNECT,
                f"cannot reach the database of service {name}: {exc}",
                "upstream_error",
            ) from None
        try:
            try:
                greeting = await authenticate(
                    stream,
                    startup_for_upstream(session.startup.message, user, session.database),
                    password,
                    self.scram_keys,
                )
            except UpstreamRefused as exc:
                ctx.metrics.upstream_errors.labels(name, "refused").inc()
                session.end["upstream_sqlstate"] = exc.response.sqlstate
                raise _Refused(exc.response, "upstream_refused", str(exc)) from None
            except UpstreamError as exc:
                ctx.metrics.upstream_errors.labels(name, "auth").inc()
                raise _fatal(
                    CANNOT_CONNECT,
                    f"cannot log in to the database of service {name}: {exc}",
                    "upstream_error",
                ) from None

            process_id = self._greet(client, greeting, session.identity)
            try:
                lease = credential.ref.to_audit()
                ctx.record(
                    "session_start",
                    identity=session.identity,
                    peer=client.peer,
                    decision=session.decision,
                    upstream=self.upstream.address,
                    upstream_local=_local_address(upstream),
                    upstream_user=user,
                    database=session.database,
                    credential=lease,
                    lease_id=credential.ref.lease_id,
                )
                session.end.update(upstream_user=user, lease_id=credential.ref.lease_id)
                client.unread(session.startup.parser.leftover())
                upstream.unread(stream.parser.leftover())
                result = await splice(client, upstream, stats=session.stats)
            finally:
                if process_id is not None:
                    self.cancel_keys.forget(process_id)
        except BaseException:
            upstream.abort()
            raise
        session.end["ended_by"] = result.ended_by
        if result.error:
            session.end["error"] = result.error
        return "ok" if result.ended_by in ("client", "upstream") else result.ended_by

    def _greet(
        self, client: Conduit, greeting: Authenticated, identity: WorkloadIdentity
    ) -> int | None:
        """Write the client's side of a successful startup; returns the broker's cancel pid."""
        out = bytearray()
        if greeting.negotiate is not None:
            out += encode(greeting.negotiate)
        out += encode(AuthenticationOk())
        process_id: int | None = None
        for message in greeting.messages:
            if isinstance(message, BackendKeyData):
                target = CancelTarget(message.process_id, message.secret_key, identity.spiffe_id)
                process_id, secret_key = self.cancel_keys.issue(target)
                out += encode(BackendKeyData(process_id, secret_key))
            else:
                out += encode(message)
        client.write(bytes(out))
        return process_id

    # -- cancel ------------------------------------------------------------------------------

    async def _cancel(self, client: Conduit, request: CancelRequest) -> None:
        """Forward a cancel for one of our sessions; ignore anything else silently, as
        PostgreSQL does (no answer tells a guesser whether a key exists)."""
        target = self.cancel_keys.find(request.process_id, request.secret_key)
        if target is None:
            self.ctx.log.debug("ignoring cancel with an unknown key from %s", client.peer)
            return
        if client.is_tls:
            # Over mTLS the key alone is not enough: it must be the session owner asking.
            try:
                who = self.ctx.identify_tls(client.ssl_object).spiffe_id
            except IdentityError:
                who = None
            if who != target.spiffe_id:
                self.ctx.log.info("ignoring cancel from %s: not the session's identity", who)
                return
        deadline = asyncio.get_running_loop().time() + CANCEL_TIMEOUT
        try:
            await send_cancel(self.upstream, target.process_id, target.secret_key, deadline)
        except UpstreamError as exc:
            self.ctx.metrics.upstream_errors.labels(self.ctx.service.name, "cancel").inc()
            self.ctx.log.warning("forwarding a cancel failed: %s", exc)
