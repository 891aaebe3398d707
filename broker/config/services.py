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
from .section import ListenAddress, Section, parse_listen

CLIENT_AUTH_MODES = ("mtls", "jwt", "mtls+jwt", "local")
# The modes in which a caller may prove itself with a token (JWT-SVID or OIDC).
TOKEN_AUTH_MODES = ("jwt", "mtls+jwt")
CREDENTIAL_PROVIDERS = ("vault-kv", "vault-database", "env", "file")

# A credential cached for longer than this is a standing secret, not a just-in-time one.
MAX_CREDENTIAL_TTL_SECONDS = 24 * 3600
DEFAULT_CREDENTIAL_TTL_SECONDS = 60.0
# Revoke a per-identity lease once no connection has used it for this long.
DEFAULT_LEASE_IDLE_SECONDS = 300.0
# Per-service cap on concurrent client connections: bounds memory under a connection flood.
DEFAULT_MAX_CONNECTIONS = 1024


@dataclass(frozen=True, slots=True)
class CredentialsConfig:
    """Where a service's credential comes from.

    `provider` picks which of the other fields apply: vault-kv (mount, path), vault-database
    (mount, role), env (fields: name -> variable), file (file: a YAML/JSON mapping).
    """

    provider: str
    mount: str
    path: str | None = None
    role: str | None = None
    fields: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    file: Path | None = None
    ttl: float = DEFAULT_CREDENTIAL_TTL_SECONDS
    idle_timeout: float = DEFAULT_LEASE_IDLE_SECONDS

    def describe(self) -> str:
        """A reference safe for logs and audit: provider and location, never a value."""
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
    if client_auth == "local" and local_identity is None:
        raise ConfigError(
            f"{s.at('local_identity')}: required with client_auth: local (the SPIFFE ID "
            "every local caller is treated as)"
        )
    if local_identity is not None:
        if client_auth != "local":
            raise ConfigError(f"{s.at('local_identity')}: only allowed with client_auth: local")
        _check_spiffe_id(local_identity, s.at("local_identity"), domains[:1])
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
    if s.has("websocket") and adapter != "http":
        # A key that does nothing would look like a protection it is not.
        raise ConfigError(f"{s.at('websocket')}: only applies to adapter: http")
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
        max_connections=s.integer("max_connections", 1, 1_000_000, DEFAULT_MAX_CONNECTIONS),
        rules=rules,
        owner=s.text("owner", None),
        purpose=s.text("purpose", None),
        labels=parse_labels(s),
        jwt=jwt,
        websocket=s.boolean("websocket", True),
    )
    s.finish()
    return service


def _parse_credentials(c: Section, base: Path) -> CredentialsConfig:
    provider = c.choice("from", CREDENTIAL_PROVIDERS)
    ttl = c.number("ttl", 1, MAX_CREDENTIAL_TTL_SECONDS, DEFAULT_CREDENTIAL_TTL_SECONDS)
    if provider == "vault-kv":
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
