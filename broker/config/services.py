"""The `services` list: one entry per listener, its adapter, policy and credential source.

Adapter-specific sections (`upstream`, `inject`, `guard`) are kept as read-only mappings here and
parsed by the adapter with the same `Section` reader.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from broker.errors import ConfigError
from broker.spiffeid import SpiffeIdError, parse_spiffe_id

from .governance import AllowRule, parse_labels, parse_rule
from .jwt import ServiceJwtConfig, parse_service_jwt
from .oauth2 import DEFAULT_TOKEN_MAX_LIFETIME_SECONDS, OAuth2Config, parse_oauth2
from .pool import PoolConfig, parse_pool
from .section import ListenAddress, Section, parse_listen

CLIENT_AUTH_MODES = ("mtls", "jwt", "mtls+jwt", "local")
# The modes in which a caller may prove itself with a token (JWT-SVID or OIDC).
TOKEN_AUTH_MODES = ("jwt", "mtls+jwt")
CREDENTIAL_PROVIDERS = ("vault-kv", "vault-database", "env", "file", "oauth2")

# A credential cached for longer than this is a standing secret, not a just-in-time one.
MAX_CREDENTIAL_TTL_SECONDS = 24 * 3600
DEFAULT_CREDENTIAL_TTL_SECONDS = 60.0
# Revoke a per-identity lease once no connection has used it for this long.
DEFAULT_LEASE_IDLE_SECONDS = 300.0
# Service keys only the HTTP adapter reads; on another adapter they are errors.
HTTP_ONLY_KEYS = ("websocket", "allow_trace", "limits", "forward_identity")
# Per-service cap on concurrent client connections: bounds memory under a connection flood.
DEFAULT_MAX_CONNECTIONS = 1024
# What a `local:` entry may select on (SPIRE's unix attestor has uid, gid and path; pod_uid
# and cgroup are what a pod's cgroup says).
LOCAL_SELECTORS = ("uid", "gid", "exe", "pod_uid", "cgroup")
# A `local:` list longer than this is a config generator's mistake: each caller walks it.
MAX_LOCAL_RULES = 1000
# A unix listener's mode when `socket_mode` is not given: owner and group may connect.
DEFAULT_SOCKET_MODE = 0o660


@dataclass(frozen=True, slots=True)
class LocalRule:
    """One `local:` entry: the SPIFFE ID a local caller gets when every selector given
    matches its kernel-reported credentials (broker.identity.local)."""

    id: str
    where: str
    uid: int | None = None
    gid: int | None = None
    exe: str | None = None
    pod_uid: str | None = None
    cgroup: str | None = None

    @property
    def needs_process(self) -> bool:
        """Whether matching reads the peer process (/proc), not only SO_PEERCRED."""
        return self.exe is not None or self.pod_uid is not None or self.cgroup is not None


@dataclass(frozen=True, slots=True)
class CredentialsConfig:
    """Where a service's credential comes from.

    `provider` picks which of the other fields apply: vault-kv (mount, path), vault-database
    (mount, role), env (fields: name -> variable), file (file: a YAML/JSON mapping), oauth2
    (oauth2: the token endpoint and the client credentials, themselves one of the first ones).
    """

    provider: str
    mount: str
    path: str | None = None
    role: str | None = None
    fields: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    file: Path | None = None
    ttl: float = DEFAULT_CREDENTIAL_TTL_SECONDS
    idle_timeout: float = DEFAULT_LEASE_IDLE_SECONDS
    oauth2: OAuth2Config | None = None

    def describe(self) -> str:
        """A reference safe for logs and audit: provider and location, never a value."""
        if self.oauth2 is not None:
            return f"oauth2:{self.oauth2.endpoint}"
        where = self.path or self.role or (str(self.file) if self.file else ",".join(self.fields))
        return f"{self.provider}:{self.mount + '/' if self.mount else ''}{where}"


@dataclass(frozen=True, slots=True)
class ServiceConfig:
    name: str
    index: int
    adapter: str
    listen: ListenAddress
    client_auth: str
    allow: tuple[str, ...]
    credentials: CredentialsConfig
    upstream: Mapping[str, Any]
    inject: Mapping[str, Any]
    local_identity: str | None = None
    # client_auth local: the callers' selectors, first match wins (empty: local_identity).
    local: tuple[LocalRule, ...] = ()
    # Unix listeners: the socket file's mode (DEFAULT_SOCKET_MODE when not given).
    socket_mode: int = DEFAULT_SOCKET_MODE
    # TLS listeners: TLS 1.3 session tickets and TLS 1.2 session resumption for callers.
    tls_resumption: bool = True
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    # The allow rules with their conditions and owners; `allow` is their IDs (patterns).
    rules: tuple[AllowRule, ...] = ()
    owner: str | None = None
    purpose: str | None = None
    labels: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    # What the adapter watches in a logged-in session (postgres: deny_password_change).
    guard: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    # The token rules under client_auth jwt / mtls+jwt; None otherwise.
    jwt: ServiceJwtConfig | None = None
    # HTTP only: whether a WebSocket upgrade may be spliced through (`websocket: false`
    # answers it 403).
    websocket: bool = True
    # HTTP: forward TRACE requests (refused by default: the echo carries the credential).
    allow_trace: bool = False
    # Logged-in upstream connections kept per identity (broker.session.pool); None: none.
    pool: PoolConfig | None = None
    # HTTP: size limits on what is read from the network (max_head_bytes), for the adapter.
    limits: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    # HTTP: the verified caller's SPIFFE ID (and token claims) for the upstream, for the adapter.
    forward_identity: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    def __post_init__(self) -> None:
        if not self.rules and self.allow:
            object.__setattr__(self, "rules", tuple(AllowRule(a) for a in self.allow))

    @property
    def where(self) -> str:
        return f"services[{self.index}]"


def parse_service(
    s: Section,
    index: int,
    base: Path,
    trust_domains: str | tuple[str, ...],
    token_domains: frozenset[str] = frozenset(),
) -> ServiceConfig:
    """One `services[]` entry. `trust_domains` are the configured ones, the broker's own
    first: allow rules may name IDs of any of them, a local identity only of its own.
    `token_domains`: trust domains tokens can prove IDs of (an issuer's spiffe_id template
    names its own); the allow rules of a service that takes tokens may name them too."""
    domains = (trust_domains,) if isinstance(trust_domains, str) else trust_domains
    name = s.text("name")
    adapter = s.text("adapter")
    listen = parse_listen(s.text("listen"), s.at("listen"), base)
    client_auth = s.choice("client_auth", CLIENT_AUTH_MODES, "mtls")
    jwt: ServiceJwtConfig | None = None
    if client_auth in TOKEN_AUTH_MODES:
        jwt = parse_service_jwt(s.section("jwt", {}), name)
    elif s.has("jwt"):
        raise ConfigError(f"{s.at('jwt')}: only used with client_auth: jwt or mtls+jwt")
    local_identity = s.text("local_identity", None)
    local = _parse_local(s, domains[:1]) if s.has("local") else ()
    if client_auth == "local" and local_identity is None and not local:
        raise ConfigError(
            f"{s.at('local_identity')}: required with client_auth: local (the one SPIFFE ID "
            f"every local caller is treated as), or {s.at('local')}: the callers' selectors "
            "and their SPIFFE IDs ([{uid: 1000, id: spiffe://...}])"
        )
    if local_identity is not None and local:
        raise ConfigError(
            f"{s.at('local_identity')}: not together with {s.at('local')}: local_identity "
            "gives every caller one ID, local: maps callers to IDs by their uid, gid, exe or "
            "pod; keep one"
        )
    for key in ("local_identity", "local"):
        if s.has(key) and client_auth != "local":
            raise ConfigError(f"{s.at(key)}: only allowed with client_auth: local")
    if local and listen.path is None:
        raise ConfigError(
            f"{s.at('local')}: needs a unix listener (listen: unix:/path): the kernel names "
            "the caller of a unix socket only"
        )
    if local_identity is not None:
        _check_spiffe_id(local_identity, s.at("local_identity"), domains[:1])
    socket_mode = DEFAULT_SOCKET_MODE
    if s.has("socket_mode"):
        if listen.path is None:
            raise ConfigError(f"{s.at('socket_mode')}: only for a unix listener (listen: unix:...)")
        socket_mode = _parse_mode(s.raw("socket_mode"), s.at("socket_mode"))
    tls_resumption = s.boolean("tls_resumption", True)
    raw_allow = s.raw("allow", [])
    if isinstance(raw_allow, str | Mapping):
        raw_allow = [raw_allow]
    if not isinstance(raw_allow, list):
        raise ConfigError(f"{s.at('allow')}: must be a list of SPIFFE IDs or rules")
    rules = tuple(parse_rule(r, f"{s.at('allow')}[{i}]") for i, r in enumerate(raw_allow))
    allowed_domains = domains
    if jwt is not None:
        allowed_domains += tuple(sorted(token_domains - set(domains)))
    for i, rule in enumerate(rules):
        where = f"{s.at('allow')}[{i}]" + (".id" if isinstance(raw_allow[i], Mapping) else "")
        _check_allow_pattern(rule.id, where, allowed_domains)
    allow = tuple(rule.id for rule in rules)
    credentials = _parse_credentials(s.section("credentials"), base)
    for key in HTTP_ONLY_KEYS:
        if s.has(key) and adapter != "http":
            # A key that does nothing would look like a protection it is not.
            raise ConfigError(f"{s.at(key)}: only applies to adapter: http")
    service = ServiceConfig(
        name=name,
        index=index,
        adapter=adapter,
        listen=listen,
        client_auth=client_auth,
        allow=allow,
        credentials=credentials,
        upstream=s.frozen("upstream"),
        inject=s.frozen("inject"),
        guard=s.frozen("guard"),
        local_identity=local_identity,
        local=local,
        socket_mode=socket_mode,
        tls_resumption=tls_resumption,
        max_connections=s.integer("max_connections", 1, 1_000_000, DEFAULT_MAX_CONNECTIONS),
        rules=rules,
        owner=s.text("owner", None),
        purpose=s.text("purpose", None),
        labels=parse_labels(s),
        jwt=jwt,
        websocket=s.boolean("websocket", True),
        allow_trace=s.boolean("allow_trace", False),
        pool=parse_pool(s.section("pool")) if s.has("pool") else None,
        limits=s.frozen("limits"),
        forward_identity=s.frozen("forward_identity"),
    )
    s.finish()
    return service


def _parse_local(s: Section, trust_domains: tuple[str, ...]) -> tuple[LocalRule, ...]:
    raw = s.raw("local")
    if not isinstance(raw, list) or not raw:
        raise ConfigError(
            f"{s.at('local')}: must be a non-empty list of {{selectors..., id: spiffe://...}}"
        )
    if len(raw) > MAX_LOCAL_RULES:
        raise ConfigError(f"{s.at('local')}: at most {MAX_LOCAL_RULES} entries")
    rules = []
    for i, entry in enumerate(raw):
        e = Section(entry, f"{s.at('local')}[{i}]")
        spiffe_id = e.text("id")
        _check_spiffe_id(spiffe_id, e.at("id"), trust_domains)
        uid = e.integer("uid", 0, 2**32 - 2, None)
        gid = e.integer("gid", 0, 2**32 - 2, None)
        exe = e.text("exe", None)
        if exe is not None and not exe.startswith("/"):
            raise ConfigError(f"{e.at('exe')}: must be an absolute path, got {exe!r}")
        pod_uid = e.text("pod_uid", None)
        cgroup = e.text("cgroup", None)
        if cgroup is not None and not cgroup.startswith("/"):
            raise ConfigError(
                f"{e.at('cgroup')}: must be a cgroup path starting with / (a * matches any "
                f"characters), got {cgroup!r}"
            )
        e.finish()
        rule = LocalRule(spiffe_id, e.where, uid, gid, exe, pod_uid, cgroup)
        if all(getattr(rule, k) is None for k in LOCAL_SELECTORS):
            raise ConfigError(
                f"{e.where}: needs at least one selector ({', '.join(LOCAL_SELECTORS)}); "
                "for one ID for every caller use local_identity instead of local"
            )
        rules.append(rule)
    return tuple(rules)


def _parse_mode(value: object, where: str) -> int:
    # A YAML 0660 is the integer 432 and 660 is not octal at all: only a string is clear.
    if not isinstance(value, str) or not value.isdigit() or set(value) - set("01234567"):
        raise ConfigError(f'{where}: must be an octal string such as "0660", got {value!r}')
    mode = int(value, 8)
    if mode > 0o777:
        raise ConfigError(f"{where}: only permission bits (at most 0777), got {value!r}")
    if not mode & 0o600 == 0o600:
        raise ConfigError(
            f"{where}: the owner (the broker) must keep read and write (0600), got {value!r}"
        )
    return mode


def _parse_credentials(c: Section, base: Path) -> CredentialsConfig:
    provider = c.choice("from", CREDENTIAL_PROVIDERS)
    # An access token is used until shortly before its expires_in, and never longer than ttl.
    default_ttl = (
        DEFAULT_TOKEN_MAX_LIFETIME_SECONDS
        if provider == "oauth2"
        else DEFAULT_CREDENTIAL_TTL_SECONDS
    )
    ttl = c.number("ttl", 1, MAX_CREDENTIAL_TTL_SECONDS, default_ttl)
    if provider == "oauth2":
        client = _parse_credentials(c.section("client"), base)
        creds = CredentialsConfig(provider, "", ttl=ttl, oauth2=parse_oauth2(c, base, client))
    elif provider == "vault-kv":
        creds = CredentialsConfig(provider, c.text("mount", "secret"), path=c.text("path"), ttl=ttl)
    elif provider == "vault-database":
        creds = CredentialsConfig(
            provider,
            c.text("mount", "database"),
            role=c.text("role"),
            ttl=ttl,
            idle_timeout=c.number("idle_timeout", 0, 7 * 24 * 3600, DEFAULT_LEASE_IDLE_SECONDS),
        )
    elif provider == "env":
        creds = CredentialsConfig(provider, "", fields=c.string_map("fields"), ttl=ttl)
    else:
        creds = CredentialsConfig(provider, "", file=c.path("path", base), ttl=ttl)
    c.finish()
    return creds


def _check_spiffe_id(value: str, where: str, trust_domains: tuple[str, ...]) -> None:
    try:
        spiffe_id = parse_spiffe_id(value)
    except SpiffeIdError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if spiffe_id.trust_domain.name not in trust_domains:
        if len(trust_domains) == 1:
            raise ConfigError(f"{where}: {value!r} is outside trust domain {trust_domains[0]!r}")
        known = ", ".join(repr(td) for td in trust_domains)
        raise ConfigError(
            f"{where}: {value!r} is outside the configured trust domains ({known}); a "
            "partner's trust domain goes under identity.federation"
        )


def _check_allow_pattern(pattern: str, where: str, trust_domains: tuple[str, ...]) -> None:
    for suffix in ("/**", "/*"):
        if pattern.endswith(suffix):
            pattern = pattern[: -len(suffix)]
            break
    if "*" in pattern:
        raise ConfigError(f"{where}: '*' is only allowed as a trailing /* or /** segment")
    _check_spiffe_id(pattern, where, trust_domains)


def check_unique(services: tuple[ServiceConfig, ...]) -> None:
    names: dict[str, int] = {}
    listens: dict[ListenAddress, int] = {}
    for service in services:
        if service.name in names:
            raise ConfigError(
                f"{service.where}.name: {service.name!r} already used by "
                f"services[{names[service.name]}]"
            )
        names[service.name] = service.index
        if service.listen.port != 0 and service.listen in listens:
            raise ConfigError(
                f"{service.where}.listen: {service.listen} already used by "
                f"services[{listens[service.listen]}]"
            )
        listens[service.listen] = service.index
