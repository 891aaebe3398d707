"""The life cycle of one TCP session, walked here once for every TCP protocol.

    accept ─▶ hello ─▶ identify (─▶ ask token) ─▶ authorize ─▶ check request ─▶ acquire credential
              adapter    core          adapter          core         adapter           core
          ─▶ log in upstream ─▶ greet client ─▶ splice ─▶ release
              adapter             adapter         core      core (and adapter)

`TcpAdapter.serve_session` is that walk. A protocol subclasses `TcpAdapter` and supplies only
its steps: how to read the client's hello (with the TLS upgrade inside it, where the protocol
has one), how to ask the client for a token (when the service takes tokens and no certificate
proved the caller: PostgreSQL asks for a cleartext password over TLS), what the client asked
for, how to log in upstream with a credential, how to greet the client, how to say "refused"
in its protocol, and (optionally) how to keep watching what the client sends once spliced.
The order, the policy decision, the
credential timeout, the audit events and the metrics are the core's, the same for every
protocol:

- a caller refused before its session starts gets one `deny` audit event (identity not proven,
  or not allowed) and its protocol's error;
- an allowed session gets exactly one `session_end` event whatever happens, with one outcome
  word (`OUTCOMES`), and a `session_start` event once the upstream login succeeded;
- `sidekey_sessions_active`, `sidekey_sessions_total{outcome}` and
  `sidekey_upstream_errors_total{kind}` count the same outcomes for every protocol.

Protocols differ in how a session opens, and the walk has a switch or a step for each way:

- TLS negotiated inside the protocol (PostgreSQL ``SSLRequest``, MySQL ``CLIENT_SSL`` after
  the server's greeting): `hello` calls `upgrade_tls` where the protocol says so.
- TLS from the first byte (Redis): `tls_first = True`; the listener does the TLS handshake
  before the session starts (within the hello timeout). A failed handshake never becomes a
  session; one the broker refused (an untrusted certificate) is audited as a denial, as
  `upgrade_tls`'s are. Holding reads for `upgrade_tls` instead loses the ClientHello under
  uvloop, which starts reading on its own after `connection_made`.
- A protocol with no opening message at all (Redis): `hello` returns at once.
- Commands the client may send after login that the broker must answer or rewrite (MySQL
  ``COM_CHANGE_USER``, Redis ``AUTH``): `client_filter` returns a `StreamFilter` for the
  splice's client → upstream direction.
- How a refused client is told: `refusal_reply` (which sees the hello, for a sequence number)
  builds the bytes, `deliver_refusal` writes them (once, unless the protocol needs more).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar

from broker.credentials import Credential
from broker.errors import (
    ClientError,
    ConfigError,
    CredentialUnavailable,
    ProtocolViolation,
    SidekeyError,
)
from broker.identity import IdentityError, MissingCertificate, WorkloadIdentity
from broker.observe.metrics import Value
from broker.policy import Decision

from .adapter import Adapter
from .context import ServiceContext
from .net import Conduit, Listener, serve
from .pool import Key, PoolFull, SessionPool, SessionWatch, chain_filters
from .splice import SpliceStats, StreamFilter, splice

# From accepting a connection to the client's hello, TLS handshake included. Clients send it
# at once, and there is no password to type: a client that takes longer is stuck or hostile
# and holds a connection slot.
DEFAULT_HELLO_TIMEOUT = 10.0
# The hello of a connection over max_connections, read only to answer "too many": shorter
# than the listener's OVERLOAD_TIMEOUT so the answer still fits in it.
OVERLOAD_HELLO_TIMEOUT = 4.0
# Getting a credential: a cache hit is immediate, a vault round trip takes milliseconds;
# past this the vault is down and the client gets an error instead of a hang.
DEFAULT_CREDENTIAL_TIMEOUT = 15.0
# From TCP connect to the upstream's "ready". Key derivation (SCRAM) and backend start take
# milliseconds to a few hundred on a busy server.
DEFAULT_LOGIN_TIMEOUT = 20.0
# Resetting a pooled connection for its next client (PostgreSQL: DISCARD ALL) takes a
# round trip; one that takes longer than this is not worth keeping.
DEFAULT_RESET_TIMEOUT = 5.0

# Which step refused a session. The adapter picks its protocol's error code from it
# (PostgreSQL: a SQLSTATE).
Step = Literal[
    "identity",  # no proven identity: no TLS, no certificate, not a valid SVID
    "policy",  # the identity is proven but not allowed
    "request",  # the client asked for something the service does not offer (a database)
    "credential",  # no credential could be had: fail closed
    "upstream_connect",  # the upstream cannot be reached
    "upstream_login",  # the upstream refused the login, or failed during it
    "audit",  # audit.required and the audit trail cannot be written: fail closed
]

# The outcome words of `session_end` and `sidekey_sessions_total{outcome}`.
OUTCOMES = (
    "ok",  # the splice ended because one side closed
    "idle",  # the splice ended because nothing moved for its idle timeout
    "error",  # a side was reset, or something failed unexpectedly
    "cancelled",  # the broker shut down mid-session
    "denied",  # refused by identity, policy or the request check
    "client_error",  # the client broke off or broke its protocol mid-handshake
    "credential_unavailable",
    "upstream_error",  # the upstream could not be reached or failed the login
    "upstream_refused",  # the upstream answered the login with its own error
    "revoked",  # closed by the broker: a reload's policy or an offboarding denies it now
    "audit_unavailable",  # audit.required and the audit trail could not be written
)
_OUTCOME_OF_STEP: dict[Step, str] = {
    "identity": "denied",
    "policy": "denied",
    "request": "denied",
    "credential": "credential_unavailable",
    "upstream_connect": "upstream_error",
    "upstream_login": "upstream_error",
    "audit": "audit_unavailable",
}

H = TypeVar("H")


class Refusal(Exception):
    """End a session before the splice; the client is told in its protocol.

    `message` is safe to show the client (never a secret). `reply`, when set, is an answer
    already in the protocol (the upstream's own error, relayed as it is), and the outcome is
    then `upstream_refused`. `metric` names the `sidekey_upstream_errors_total{kind}` to count.
    """

    def __init__(
        self,
        step: Step,
        message: str,
        *,
        reply: bytes | None = None,
        metric: str | None = None,
        audit: Mapping[str, Any] | None = None,
        credential_rejected: bool = False,
    ) -> None:
        super().__init__(message)
        self.step: Step = step
        self.message = message
        self.reply = reply
        self.metric = metric
        # The upstream said the credential itself is wrong (PostgreSQL 28P01): a leased one
        # was changed or dropped outside the broker, so the core replaces it and retries once.
        self.credential_rejected = credential_rejected
        # Extra fields for the session_end event (the upstream's SQLSTATE, say).
        self.audit = dict(audit or {})

    @property
    def outcome(self) -> str:
        return "upstream_refused" if self.reply is not None else _OUTCOME_OF_STEP[self.step]


@dataclass(slots=True)
class Session(Generic[H]):
    """One allowed session, from the policy decision to the end of the splice."""

    client: Conduit
    hello: H
    identity: WorkloadIdentity
    decision: Decision
    # What the client asked for, as audit fields (``database``), from `check_request`.
    request: dict[str, Any] = field(default_factory=dict)
    stats: SpliceStats = field(default_factory=SpliceStats)
    started: float = field(default_factory=time.monotonic)
    # Extra fields of the session_end event.
    end: dict[str, Any] = field(default_factory=dict)
    # Why the broker closed it (reload, offboarding), once it did.
    revoked: str | None = None


@dataclass(slots=True)
class Upstream:
    """A logged-in upstream connection, as `TcpAdapter.login` returns it."""

    conduit: Conduit
    # The database (or server) user the credential logged in as, for the audit trail.
    user: str
    # host:port of the upstream, for the audit trail.
    address: str
    # The adapter's own state for `greet` and `release` (greeting messages, cancel keys...).
    state: Any = None


def local_address(conduit: Conduit) -> str | None:
    """Our end of an upstream connection: what the server's own logs call the client."""
    if conduit.transport is None:
        return None
    sockname = conduit.transport.get_extra_info("sockname")
    if isinstance(sockname, tuple) and len(sockname) >= 2:
        return f"{sockname[0]}:{sockname[1]}"
    return None


class TcpAdapter(Adapter, Generic[H]):
    """A TCP protocol on the core's session life cycle (see the module docstring).

    Subclasses implement the protocol steps (`hello`, `login`, `greet`, `refusal_reply`,
    `protocol_error_reply`) and may override `ask_token`, `check_request`, `release` and the
    timeouts.
    """

    hello_timeout = DEFAULT_HELLO_TIMEOUT
    credential_timeout = DEFAULT_CREDENTIAL_TIMEOUT
    login_timeout = DEFAULT_LOGIN_TIMEOUT
    # Fields the credential must have for `login`.
    credential_fields: tuple[str, ...] = ("username", "password")
    # What a client that did not use TLS is told, in the protocol's own terms (how to set it).
    tls_required_message = "this service requires TLS with a client certificate (an X.509-SVID)"
    # The same under client_auth jwt / mtls+jwt: a token is only taken over TLS.
    tls_required_jwt_message = "this service requires TLS (and a token or certificate)"
    # Why such a client was refused, for the audit trail.
    no_tls_reason = "connection is not TLS"
    # How this protocol's clients present a client certificate, added to the refusal of a
    # TLS caller that sent none.
    certificate_hint = "configure your client with the X.509-SVID and its key"
    # True for a protocol whose TLS starts with the first byte (no in-band negotiation): the
    # listener does the handshake before `hello` (client_auth mtls).
    tls_first = False

    def __init__(self, ctx: ServiceContext) -> None:
        super().__init__(ctx)
        self._listener: Listener | None = None
        name = ctx.service.name
        # Metric children bound once: a labels() call per session cost ~5 us under load.
        self._active = ctx.metrics.sessions_active.labels(name)
        self._outcomes: dict[str, Value] = {
            o: ctx.metrics.sessions.labels(name, o) for o in OUTCOMES
        }
        # Upstream session reuse (`pool:`), for a protocol that can reset a session.
        self.pool: SessionPool | None = None
        if ctx.service.pool is not None:
            if type(self).reset is TcpAdapter.reset:
                raise ConfigError(
                    f"{ctx.service.where}.pool: the {ctx.service.adapter} adapter cannot "
                    "reset an upstream session for another client, so it cannot pool them"
                )
            self.pool = SessionPool(name, ctx.service.pool, ctx.metrics, ctx.live)
            ctx.credentials.on_lease_end(self.pool.drop_lease)

    # -- the protocol's steps ------------------------------------------------------------

    @abc.abstractmethod
    async def hello(self, client: Conduit, deadline: float) -> H | None:
        """Read the client's opening, up to what it asks for, by `deadline` (loop time).

        Upgrade to TLS inside it where the protocol does (with `upgrade_tls`). Return None
        when there is nothing more to do (the client left, or it only sent a cancel). Raise
        `ProtocolViolation` for bytes that break the protocol, `ClientError` for the rest.
        """

    async def ask_token(self, client: Conduit, hello: H, deadline: float) -> str | None:
        """Ask the client for its token (JWT-SVID or OIDC) in the protocol's own terms and
        return it, by `deadline`; called over TLS only, when the service takes tokens and no
        certificate proved the caller. Whatever carried the token must never reach the
        upstream. Raise `ProtocolViolation` for bytes that break the protocol, `ClientError`
        if the client leaves.

        The default refuses: a protocol with no way to carry a token cannot use client_auth
        jwt."""
        raise IdentityError(
            f"the {self.ctx.service.adapter} adapter cannot take a token; use client_auth: mtls"
        )

    def check_request(self, session: Session[H]) -> dict[str, Any]:
        """Check what the client asked for against the service; return it as audit fields.

        Raise `Refusal("request", ...)` for what the service does not offer.
        """
        return {}

    @abc.abstractmethod
    async def login(self, session: Session[H], credential: Credential, deadline: float) -> Upstream:
        """Connect to the upstream and log in with `credential` by `deadline`.

        Raise `Refusal("upstream_connect" | "upstream_login", ...)` when that fails; the
        core closes the connection.
        """

    @abc.abstractmethod
    def greet(self, session: Session[H], upstream: Upstream) -> None:
        """Tell the client its session is ready, and push back (`unread`) on both conduits
        whatever the handshake read past its end, so the splice delivers it in order."""

    def release(self, session: Session[H], upstream: Upstream) -> None:
        """The session is over (spliced or not, once greeted): forget what `greet` kept."""
        return None

    def client_filter(self, session: Session[H], upstream: Upstream) -> StreamFilter | None:
        """What watches the client's bytes during the splice, if anything (see the module
        docstring); called once, after `greet`."""
        return None

    @abc.abstractmethod
    def refusal_reply(self, refusal: Refusal, hello: H) -> bytes:
        """The protocol's error message for a refused session (`refusal.message` in it)."""

    async def deliver_refusal(self, client: Conduit, hello: H, reply: bytes) -> None:
        """Tell a refused client: write `reply` (the core closes the connection after).

        A protocol whose client speaks first and may not read an unsolicited error (Redis)
        answers its commands with it instead, for a bounded time.
        """
        client.write(reply)

    @abc.abstractmethod
    def protocol_error_reply(self, message: str) -> bytes:
        """The protocol's error message for a client that broke the protocol."""

    # -- session reuse (`pool:`): a protocol that supports it implements all three ------------

    def pool_key(self, session: Session[H]) -> Key:
        """What besides the identity a pooled connection must match to serve `session`
        (PostgreSQL: the database and the client's startup parameters)."""
        return ()

    def watch(self, session: Session[H], upstream: Upstream) -> SessionWatch:
        """Filters that follow both directions of a pooled session's splice, and say whether
        the upstream is idle (every request answered, no transaction open)."""
        raise NotImplementedError

    async def reset(self, upstream: Upstream, deadline: float) -> bool:
        """Reset an idle upstream session for another client of the same identity (drop its
        session state) by `deadline`; True only if it is idle and clean afterwards."""
        return False

    def reuse(self, upstream: Upstream) -> None:
        """A pooled `upstream` serves a new session: forget what the last one left in
        `upstream.state` (greet runs next)."""
        return None

    def overload_reply(self, max_connections: int) -> bytes | None:
        """The protocol's "too many connections" message for a connection over the service's
        `max_connections`, sent once its hello is read (None: close it without a word)."""
        return None

    # -- the core's part -----------------------------------------------------------------

    @property
    def address(self) -> str:
        if self._listener is None:
            raise RuntimeError("the adapter is not started")
        return str(self._listener.address)

    async def stop(self, drain_timeout: float) -> None:
        if self._listener is not None:
            await self._listener.close(drain_timeout)
        if self.pool is not None:
            # After the sessions (they may hand connections back), before the runtime
            # revokes the leases those connections are logged in with.
            await self.pool.close()

    def describe_pool(self) -> dict[str, Any] | None:
        return self.pool.describe() if self.pool is not None else None

    async def upgrade_tls(
        self, client: Conduit, deadline: float, *, early_tls: bool = False
    ) -> None:
        """Upgrade the client connection to the service's TLS (client certificate required
        under mtls). A failed handshake is an unproven caller: audited as a denial.

        `early_tls`: the client starts TLS without waiting for an answer (MySQL), so bytes
        already buffered are its first TLS records (see `Conduit.start_tls`)."""
        assert self.ctx.server_ssl is not None
        remaining = max(deadline - asyncio.get_running_loop().time(), 0.001)
        try:
            await client.start_tls(
                self.ctx.server_ssl, server_side=True, timeout=remaining, early_tls=early_tls
            )
        except ClientError as exc:
            self._tls_refused(client.peer, str(exc))
            raise

    def _tls_refused(self, peer: str, reason: str) -> None:
        """A caller whose TLS handshake failed: unproven, counted and audited as a denial."""
        self.ctx.refuse(peer, reason)
        self._outcomes["denied"].inc()

    async def start(self) -> None:
        service = self.ctx.service
        rejected = self.ctx.metrics.connections_rejected.labels(service.name)
        self._listener = await serve(
            service.listen,
            self.serve_session,
            max_connections=service.max_connections,
            on_reject=rejected.inc,
            on_overload=self._overloaded if self.overload_reply(1) is not None else None,
            ssl=self.ctx.server_ssl if self.tls_first else None,
            ssl_handshake_timeout=self.hello_timeout,
            on_tls_refused=self._tls_refused,
            sock=self.ctx.listen_socket,
            shared=self.ctx.shared_listen,
            socket_mode=service.socket_mode,
        )

    async def _overloaded(self, client: Conduit) -> None:
        """A connection over max_connections: read its hello (the client may need TLS to
        hear anything) and tell it so; nothing is identified, fetched or spliced."""
        deadline = asyncio.get_running_loop().time() + OVERLOAD_HELLO_TIMEOUT
        try:
            hello = await self.hello(client, deadline)
        except ClientError:
            return
        reply = self.overload_reply(self.ctx.service.max_connections)
        if hello is not None and reply is not None:
            await self.deliver_refusal(client, hello, reply)

    async def serve_session(self, client: Conduit) -> None:
        """The whole life cycle of one accepted connection (the listener's handler)."""
        deadline = asyncio.get_running_loop().time() + self.hello_timeout
        try:
            hello = await self.hello(client, deadline)
        except ProtocolViolation as exc:
            # Say so if the connection can still carry it; the client broke the protocol.
            self.ctx.log.info("protocol error from %s: %s", client.peer, exc)
            if not client.is_closed:
                client.write(self.protocol_error_reply(str(exc)))
            return
        if hello is None:
            return
        try:
            identity = await self._identify(client, hello, deadline)
        except Refusal as refusal:
            await self.deliver_refusal(client, hello, self.refusal_reply(refusal, hello))
            self._outcomes["denied"].inc()
            return
        except ProtocolViolation as exc:
            self.ctx.log.info("protocol error from %s: %s", client.peer, exc)
            if not client.is_closed:
                client.write(self.protocol_error_reply(str(exc)))
            return
        except ClientError as exc:
            # The client left while asked for its token (psql does, to prompt for one).
            self.ctx.log.debug("client %s left during identification: %s", client.peer, exc)
            return
        decision = self.ctx.authorize(identity, client.peer)
        if not decision.allow:
            self._outcomes["denied"].inc()
            reply = self.refusal_reply(Refusal("policy", decision.reason), hello)
            await self.deliver_refusal(client, hello, reply)
            return
        await self._allowed(Session(client, hello, identity, decision))

    async def _identify(self, client: Conduit, hello: H, deadline: float) -> WorkloadIdentity:
        ctx = self.ctx
        if ctx.service.client_auth != "local" and not client.is_tls:
            ctx.refuse(client.peer, self.no_tls_reason)
            message = self.tls_required_jwt_message if ctx.takes_tokens else None
            raise Refusal("identity", message or self.tls_required_message)

        async def ask() -> str | None:
            return await self.ask_token(client, hello, deadline)

        try:
            return await ctx.identify(client.ssl_object, ask, client.socket)
        except MissingCertificate as exc:
            message = f"{exc}: {self.certificate_hint}"
            ctx.refuse(client.peer, message)
            raise Refusal("identity", message) from None
        except IdentityError as exc:
            ctx.refuse(client.peer, str(exc), issuer=getattr(exc, "issuer", None))
            raise Refusal("identity", str(exc)) from None

    async def _allowed(self, session: Session[H]) -> None:
        """From an allowed identity to the end: one session_end event for every ending."""
        client = session.client
        outcome = "error"
        self._active.inc()
        task = asyncio.current_task()
        assert task is not None

        def revoke(reason: str) -> None:
            session.revoked = reason
            task.cancel()

        live = self.ctx.live.add(
            session.identity, self.ctx.service.name, client.peer, "session", revoke
        )
        try:
            unaudited = self.ctx.audit_unavailable()
            if unaudited is not None:
                raise Refusal("audit", unaudited, metric="audit")
            session.request = self.check_request(session)
            rejected: Refusal | None = None
            async with contextlib.AsyncExitStack() as stack:
                credential = await self._acquire(stack, session.identity)
                try:
                    outcome = await self._proxy(session, credential)
                except Refusal as refusal:
                    if not refusal.credential_rejected or credential.ref.lease_id is None:
                        raise
                    rejected = refusal
            if rejected is not None:
                # Released above, so the lease manager may revoke it now; then once more
                # with a fresh one. A second refusal goes to the client as it is.
                await self._replace_tampered(session, credential, rejected)
                async with contextlib.AsyncExitStack() as stack:
                    credential = await self._acquire(stack, session.identity)
                    outcome = await self._proxy(session, credential)
        except Refusal as refusal:
            outcome = refusal.outcome
            session.end["error"] = refusal.message
            session.end.update(refusal.audit)
            if refusal.metric is not None:
                self.ctx.metrics.upstream_errors.labels(self.ctx.service.name, refusal.metric).inc()
            reply = (
                refusal.reply
                if refusal.reply is not None
                else self.refusal_reply(refusal, session.hello)
            )
            await self.deliver_refusal(client, session.hello, reply)
        except asyncio.CancelledError:
            if session.revoked is not None and task.cancelling() == 1:
                # Our own cancel, and nobody else's (a shutdown): the session ends here.
                task.uncancel()
                outcome = "revoked"
                session.end["error"] = session.revoked
                client.abort()
            else:
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
            self.ctx.live.discard(live)
            if session.stats.ended_by is not None:
                session.end.setdefault("ended_by", session.stats.ended_by)
            self._active.dec()
            self._outcomes[outcome].inc()
            self.ctx.record(
                "session_end",
                identity=session.identity,
                peer=client.peer,
                decision=session.decision,
                outcome=outcome,
                **session.request,
                bytes_client_to_upstream=session.stats.client_to_upstream,
                bytes_upstream_to_client=session.stats.upstream_to_client,
                duration_ms=round((time.monotonic() - session.started) * 1000, 1),
                **session.end,
            )

    async def _replace_tampered(
        self, session: Session[H], credential: Credential, refusal: Refusal
    ) -> None:
        """The upstream refused a leased credential: audit `credential_tampered`, revoke the
        lease (its role may have a password only the tamperer knows) so the next acquire
        mints a fresh one."""
        self.ctx.metrics.upstream_errors.labels(self.ctx.service.name, "credential_tampered").inc()
        self.ctx.record(
            "credential_tampered",
            identity=session.identity,
            peer=session.client.peer,
            decision=session.decision,
            lease_id=credential.ref.lease_id,
            credential=credential.ref.to_audit(),
            reason=(
                "the upstream refused the leased credential: its password was changed (or "
                "the role dropped) outside the broker; revoking the lease and retrying once "
                "with a new one"
            ),
            # The adapter's own fields first: its `upstream_error` (a code, as Redis's) gives
            # way to the whole message, which carries the code too.
            **{**refusal.audit, "upstream_error": refusal.message},
        )
        self.ctx.log.warning(
            "credential rejected by the upstream; lease revoked and replaced service=%s "
            "identity=%s lease_id=%s",
            self.ctx.service.name, session.identity, credential.ref.lease_id,
        )  # fmt: skip
        await self.ctx.credentials.invalidate(session.identity, credential)

    async def _acquire(
        self, stack: contextlib.AsyncExitStack, identity: WorkloadIdentity
    ) -> Credential:
        """Hold the identity's credential for the whole session (the lease manager then knows
        the lease is in use); fail closed within `credential_timeout`."""
        name = self.ctx.service.name
        try:
            async with asyncio.timeout(self.credential_timeout):
                credential = await stack.enter_async_context(self.ctx.credentials.use(identity))
        except TimeoutError:
            raise Refusal(
                "credential",
                f"no credential for service {name}: the vault did not answer in "
                f"{self.credential_timeout:g}s",
                metric="credential_timeout",
            ) from None
        except CredentialUnavailable as exc:
            raise Refusal("credential", f"no credential for service {name}: {exc}") from None
        missing = [f for f in self.credential_fields if not credential.fields.get(f)]
        if missing:
            raise Refusal(
                "credential",
                f"the credential of service {name} ({credential.ref.location}) has no "
                f"{' or '.join(missing)} field",
            )
        return credential

    async def _proxy(self, session: Session[H], credential: Credential) -> str:
        """Log in upstream (or take a pooled connection), greet the client, splice; returns
        the outcome."""
        deadline = asyncio.get_running_loop().time() + self.login_timeout
        pool, key = self.pool, None
        pooled: Upstream | None = None
        if pool is not None:
            key = (session.identity.spiffe_id, *self.pool_key(session))
            try:
                pooled = await pool.checkout(key, credential.ref, deadline)
            except PoolFull as exc:
                raise Refusal("upstream_connect", str(exc), metric="pool_full") from None
        if pooled is not None:
            upstream = pooled
            self.reuse(upstream)
        else:
            try:
                upstream = await self.login(session, credential, deadline)
            except BaseException:
                if pool is not None and key is not None:
                    pool.discard(key)
                raise
        watch: SessionWatch | None = None
        try:
            extra: dict[str, Any] = {}
            if pool is not None:
                extra["pool"] = "reused" if pooled is not None else "new"
            # Before the client hears "ready": under audit.required a session whose start
            # could not be written is refused, never served unaudited.
            written = self.ctx.record(
                "session_start",
                identity=session.identity,
                peer=session.client.peer,
                decision=session.decision,
                upstream=upstream.address,
                upstream_local=local_address(upstream.conduit),
                upstream_user=upstream.user,
                **session.request,
                credential=credential.ref.to_audit(),
                lease_id=credential.ref.lease_id,
                **extra,
            )
            if not written and self.ctx.audit.required:
                raise Refusal(
                    "audit",
                    self.ctx.audit_unavailable()
                    or "the broker could not write this session's audit line (audit.required)",
                    metric="audit",
                )
            self.greet(session, upstream)
            try:
                session.end.update(upstream_user=upstream.user, lease_id=credential.ref.lease_id)
                client_filter = self.client_filter(session, upstream)
                if pool is not None:
                    watch = self.watch(session, upstream)
                    client_filter = chain_filters(client_filter, watch.client)
                result = await splice(
                    session.client,
                    upstream.conduit,
                    stats=session.stats,
                    client_filter=client_filter,
                    upstream_filter=watch.upstream if watch is not None else None,
                    keep_upstream=watch.idle if watch is not None else None,
                )
            finally:
                self.release(session, upstream)
        except BaseException:
            upstream.conduit.abort()
            if pool is not None and key is not None:
                pool.discard(key)
            raise
        if pool is not None and key is not None:
            await self._give_back(
                session, pool=pool, key=key, upstream=upstream, credential=credential,
                kept=result.kept,
            )  # fmt: skip
        session.end["ended_by"] = result.ended_by
        if result.error:
            session.end["error"] = result.error
        return "ok" if result.ended_by in ("client", "upstream") else result.ended_by

    async def _give_back(
        self,
        session: Session[H],
        *,
        pool: SessionPool,
        key: Key,
        upstream: Upstream,
        credential: Credential,
        kept: bool,
    ) -> None:
        """After a pooled session: reset the upstream and pool it, or close it."""
        why = None if kept else "not_idle"
        if kept:
            deadline = asyncio.get_running_loop().time() + DEFAULT_RESET_TIMEOUT
            try:
                clean = await self.reset(upstream, deadline)
            except (SidekeyError, OSError) as exc:
                self.ctx.log.info("pooled connection not reset: %s", exc)
                clean = False
            except BaseException:
                upstream.conduit.abort()
                pool.discard(key)
                raise
            why = None if clean else "reset_failed"
        session.end["pool_returned"] = why is None
        if why is None:
            pool.checkin(key, upstream, credential.ref, session.identity, session.client.peer)
        else:
            upstream.conduit.abort()
            pool.discard(key, why)
