"""What the core gives the adapter of one service, and the steps every adapter shares.

`ServiceContext` carries the service's config, its TLS serving context, its credential
source, the token verifier, the audit trail and metrics, and implements the steps a TCP
session and an HTTP request have in common: identify (`identify`, with `identify_tls`,
`identify_token` and `identify_local` under it), authorize (`authorize`, `refuse`) and audit
(`record`). The TCP life cycle (`broker.session.lifecycle`) and the HTTP adapter both call
these, so a change to a step is made once.
"""

from __future__ import annotations

import inspect
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from broker.config import Config, ServiceConfig
from broker.credentials import CredentialSource
from broker.identity import IdentityError, WorkloadIdentity, local_identity
from broker.identity.jwks import JwtAuthority
from broker.identity.local import attest_socket
from broker.identity.material import IdentityMaterial
from broker.identity.svid_cache import SvidCache
from broker.identity.tls import verified_anchor
from broker.identity.trust import check_anchor
from broker.observe.audit import AuditLog
from broker.observe.metrics import Metrics
from broker.observe.refusals import RefusalLimiter
from broker.policy import Decision, evaluate

from .registry import Registry
from .siblings import Siblings

# How a caller's token reaches `identify`: already read (an HTTP header), or asked for only
# if no certificate proved the caller (a TCP protocol's password exchange).
TokenSource = str | Callable[[], Awaitable[str | None]] | None


@dataclass(frozen=True, slots=True)
class ServiceContext:
    """What the core provides to the adapter of one service."""

    config: Config
    service: ServiceConfig
    # The TLS serving context (client certificate required under mtls, optional under
    # mtls+jwt, not asked for under jwt); None for client_auth: local.
    server_ssl: ssl.SSLContext | None
    credentials: CredentialSource
    audit: AuditLog
    metrics: Metrics
    log: logging.Logger
    # The broker's identity material: the bundles per trust domain, for federated callers.
    material: IdentityMaterial | None = None
    # Client certificates already mapped to identities: parsing one and applying the SVID
    # rules costs ~80 us per connection, a cache hit ~1 us (measured under load, 2 cores).
    svids: SvidCache = field(default_factory=SvidCache, repr=False, compare=False)
    # Live sessions, offboarded identities and usage, shared by every service of a broker.
    live: Registry = field(default_factory=Registry, repr=False, compare=False)
    # Verifies tokens under client_auth jwt / mtls+jwt (shared by all services); else None.
    tokens: JwtAuthority | None = field(default=None, repr=False, compare=False)
    # Under `workers: N` (broker.supervisor): the listening socket the parent bound for this
    # service, shared by every worker (each listener serves a dup of it), and whether a
    # listener the worker binds itself must share its TCP port (SO_REUSEPORT).
    listen_socket: socket.socket | None = field(default=None, repr=False, compare=False)
    shared_listen: bool = field(default=False, repr=False, compare=False)
    # Under `workers: N`: the other workers, to ask what only one of them knows (the
    # session a PostgreSQL cancel key belongs to). None with one process.
    siblings: Siblings | None = field(default=None, repr=False, compare=False)
    # How many refusals of unproven callers get a `deny` line (shared by all services of a
    # broker; broker.observe.refusals). None: every one.
    refusals: RefusalLimiter | None = field(default=None, repr=False, compare=False)
    # Counters bound to this service once: Counter.labels() costs ~1 us per call, and the
    # HTTP adapter would call it on every request.
    _allowed: Any = field(init=False, repr=False, compare=False)
    _denied: Any = field(init=False, repr=False, compare=False)
    # The trust domains whose X.509-SVIDs are verified: a name, or a set of them.
    _trust_domains: str | frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        domains = self.config.identity.trust_domains
        object.__setattr__(
            self, "_trust_domains", domains[0] if len(domains) == 1 else frozenset(domains)
        )
        requests = self.metrics.requests
        object.__setattr__(self, "_allowed", requests.labels(self.service.name, "allow"))
        object.__setattr__(self, "_denied", requests.labels(self.service.name, "deny"))

    def retarget(self, config: Config, service: ServiceConfig) -> None:
        """Apply a reloaded config whose only changes to this service are policy (allow
        rules, owners): the next decision uses it; the listener and credential stay."""
        object.__setattr__(self, "config", config)
        object.__setattr__(self, "service", service)

    @property
    def takes_tokens(self) -> bool:
        """Whether a caller may prove itself with a token (client_auth jwt or mtls+jwt)."""
        return self.service.jwt is not None

    async def identify(
        self,
        ssl_object: ssl.SSLObject | ssl.SSLSocket | None,
        token: TokenSource = None,
        sock: socket.socket | None = None,
    ) -> WorkloadIdentity:
        """The identity of a caller under the service's `client_auth`; raises IdentityError.
        The one place that decides how a caller is proven:

        - local: the first `local:` rule the peer of the unix socket `sock` matches (its
          SO_PEERCRED uid, gid, process), or the one `local_identity`;
        - mtls: the client certificate;
        - mtls+jwt: the client certificate if one was presented (certificate first), else
          the token; jwt: the token. A token is only ever taken over TLS.

        `token` is the token already read, or a coroutine function that asks the client for
        one (called only when no certificate proved the caller)."""
        mode = self.service.client_auth
        if mode == "local":
            return self.identify_local(sock)
        if mode == "mtls":
            return self.identify_tls(ssl_object)
        if ssl_object is None:
            raise IdentityError("connection is not TLS: a token is only accepted over TLS")
        if mode == "mtls+jwt" and ssl_object.getpeercert(binary_form=True):
            return self.identify_tls(ssl_object)
        if callable(token):
            asked = token()
            token = await asked if inspect.isawaitable(asked) else asked
        if not token:
            raise IdentityError(self.no_token_message())
        if self.tokens is None:
            raise IdentityError(f"service {self.service.name} takes no tokens")
        return await self.tokens.verify(token, self.audience)

    def no_token_message(self) -> str:
        what = (
            "a client certificate or a token"
            if self.service.client_auth == "mtls+jwt"
            else "a token"
        )
        return (
            f"no proven identity: present {what} (JWT-SVID or OIDC) for audience {self.audience!r}"
        )

    @property
    def audience(self) -> str:
        return self.service.jwt.audience if self.service.jwt is not None else self.service.name

    async def identify_token(self, token: str) -> WorkloadIdentity:
        """The identity a JWT-SVID or OIDC token proves to this service; raises IdentityError."""
        if self.tokens is None:
            raise IdentityError(f"service {self.service.name} takes no tokens")
        return await self.tokens.verify(token, self.audience)

    def identify_tls(self, ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> WorkloadIdentity:
        """The identity proven by a completed mTLS handshake; raises IdentityError."""
        if ssl_object is None:
            raise IdentityError("connection is not TLS: present an X.509-SVID over TLS")
        der = ssl_object.getpeercert(binary_form=True)
        if ssl_object.session_reused:
            return self._identify_resumed(der)
        identity = self.svids.identity(der, self._trust_domains)
        if not isinstance(self._trust_domains, str):
            # Federation: OpenSSL verified the chain against every domain's bundle; it must
            # end in the bundle of the ID's own domain (broker.identity.trust).
            bundles = self.material.bundles if self.material is not None else {}
            check_anchor(identity, verified_anchor(ssl_object), bundles)
        if self.service.tls_resumption and der:
            anchor = verified_anchor(ssl_object)
            if anchor is not None:
                self.svids.remember_anchor(der, anchor)
        return identity

    def _identify_resumed(self, der: bytes | None) -> WorkloadIdentity:
        """A resumed TLS session: OpenSSL verified no chain and checked no validity in this
        handshake, only that the session is one it issued. The certificate is the one the
        session was made with; it counts only if a full handshake here verified it (its
        trust anchor remembered), the anchor is still in the bundle of the ID's trust domain
        (a CA removed from a bundle since ends its sessions), and it has not expired."""
        if not der:
            return self.svids.identity(der, self._trust_domains)  # raises MissingCertificate
        anchor = self.svids.anchor(der)
        if anchor is None or self.material is None:
            raise IdentityError(
                "resumed TLS session of a client certificate this broker has not verified "
                "(or no longer remembers): connect again without the saved session"
            )
        identity = self.svids.identity(der, self._trust_domains)
        if identity.expires is not None and identity.expires <= datetime.now(UTC):
            raise IdentityError("client certificate has expired (resumed TLS session)")
        check_anchor(identity, anchor, self.material.bundles)
        return identity

    def identify_local(self, sock: socket.socket | None = None) -> WorkloadIdentity:
        """The identity of a `client_auth: local` caller: attested from the kernel's peer
        credentials by the `local:` rules, or the one configured `local_identity`."""
        if self.service.local:
            return attest_socket(self.service.local, sock)
        assert self.service.local_identity is not None  # enforced by config parsing
        return local_identity(self.service.local_identity)

    def authorize(self, identity: WorkloadIdentity | None, peer: str, **fields: Any) -> Decision:
        """Apply policy, count the decision, and audit a denial (an allow is audited by the
        adapter when the request or session ends, with its byte counts and outcome).
        `fields` go into the denial's audit line (HTTP: the method and path)."""
        decision = self.decide(identity, peer)
        if decision.allow:
            self._allowed.inc()
            assert identity is not None
            self.live.note_use(identity.spiffe_id, self.service.name)
        else:
            self._denied.inc()
            self.record("deny", identity=identity, peer=peer, decision=decision, **fields)
        return decision

    def decide(self, identity: WorkloadIdentity | None, peer: str) -> Decision:
        """The policy decision alone: not counted, not audited (a reload re-checks live
        sessions with it)."""
        return evaluate(identity, self.service, denied=self.live.denied, source=peer)

    def refuse(
        self, peer: str, reason: str, identity: WorkloadIdentity | None = None, **fields: Any
    ) -> None:
        """Count and audit a caller refused before policy could run (no proven identity):
        every one is counted, not every one written (`refusals`)."""
        self._denied.inc()
        service = self.service
        if self.refusals is not None and not self.refusals.admit(
            service.name, service.adapter, peer, reason
        ):
            return
        self.record(
            "deny", identity=identity, peer=peer, decision=Decision(False, reason), **fields
        )

    def record(
        self,
        event: str,
        *,
        identity: WorkloadIdentity | None,
        peer: str,
        decision: Decision | None = None,
        **fields: Any,
    ) -> bool:
        """Emit one audit event with the standard fields filled in; False if it could not
        be written."""
        # One dict, filled in place: the keyword-argument version cost ~3 us per request.
        record: dict[str, Any] = {"service": self.service.name, "adapter": self.service.adapter}
        if identity is not None:
            record["spiffe_id"] = identity.spiffe_id
            record["auth_method"] = identity.method
            if identity.issuer is not None:
                # The issuer and the claims the ID was made of; never the token.
                record["issuer"] = identity.issuer
                record["claims"] = dict(identity.claims)
        record["peer"] = peer
        if decision is not None:
            record["decision"] = "allow" if decision.allow else "deny"
            if decision.rule is not None:
                record["rule"] = decision.rule
            if not decision.allow:
                record["reason"] = decision.reason
        record.update(fields)
        return self.audit.emit_record(event, record)

    def audit_unavailable(self) -> str | None:
        """Why nothing may be served now (`audit.required` and the audit file cannot be
        written), as the client is told; None when serving may go on."""
        reason = self.audit.unavailable()
        if reason is None:
            return None
        return (
            f"service {self.service.name} is refusing requests: the broker cannot write its "
            f"audit trail ({reason}) and audit.required is true; free space for the audit file"
        )
