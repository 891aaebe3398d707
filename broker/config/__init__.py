"""Configuration: parsed once into frozen, typed objects with located error messages.

The runtime never reads raw dicts. Adapter-specific sections (`upstream`, `inject`) are kept
as read-only mappings here and parsed by the adapter with the same `Section` reader, so every
error names its path: ``services[1].upstream.url: must be an http or https URL``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, TypeVar

import yaml
from spiffe import SpiffeId, TrustDomain

from broker.errors import ConfigError

T = TypeVar("T")

CLIENT_AUTH_MODES = ("mtls", "jwt", "local")
CREDENTIAL_PROVIDERS = ("vault-kv", "vault-database", "env", "file")
VAULT_AUTH_METHODS = ("token",)

# A credential cached for longer than this is a standing secret, not a just-in-time one.
MAX_CREDENTIAL_TTL_SECONDS = 24 * 3600
DEFAULT_CREDENTIAL_TTL_SECONDS = 60.0
# Revoke a per-identity lease once no connection has used it for this long.
DEFAULT_LEASE_IDLE_SECONDS = 300.0
# Per-service cap on concurrent client connections: bounds memory under a connection flood.
DEFAULT_MAX_CONNECTIONS = 1024
# In-flight requests and sessions get this long to finish on SIGTERM before they are cut
# (`sidekey run --drain-timeout`).
DEFAULT_DRAIN_SECONDS = 10.0
# A config file larger than this is a mistake (or an attack on the parser).
MAX_CONFIG_BYTES = 1024 * 1024

_MISSING: Any = object()


class Section:
    """A located, read-once view of one mapping in the config.

    Every accessor records the key it consumed; `finish()` rejects the keys nobody asked
    for, so a typo is an error rather than a silently ignored setting.
    """

    def __init__(self, raw: object, where: str) -> None:
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{where}: must be a mapping, got {_kind(raw)}")
        self._raw: Mapping[Any, Any] = raw
        self.where = where
        self._seen: set[str] = set()

    def at(self, key: str) -> str:
        """The located name of `key`, for error messages."""
        return f"{self.where}.{key}" if self.where else key

    def has(self, key: str) -> bool:
        return key in self._raw

    def raw(self, key: str, default: Any = _MISSING) -> Any:
        self._seen.add(key)
        if key in self._raw:
            return self._raw[key]
        if default is _MISSING:
            raise ConfigError(f"{self.at(key)}: required")
        return default

    def text(self, key: str, default: Any = _MISSING) -> Any:
        value = self.raw(key, default)
        if value is default and default is not _MISSING:
            return value
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{self.at(key)}: must be a non-empty string, got {_kind(value)}")
        return value

    def choice(self, key: str, options: tuple[str, ...], default: Any = _MISSING) -> Any:
        value = self.text(key, default)
        if value not in options and not (value is default and default is not _MISSING):
            raise ConfigError(f"{self.at(key)}: must be one of {', '.join(options)}, got {value!r}")
        return value

    def integer(self, key: str, low: int, high: int, default: Any = _MISSING) -> Any:
        value = self.raw(key, default)
        if value is default and default is not _MISSING:
            return value
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ConfigError(f"{self.at(key)}: must be an integer {low}-{high}, got {value!r}")
        return value

    def number(self, key: str, low: float, high: float, default: Any = _MISSING) -> Any:
        value = self.raw(key, default)
        if value is default and default is not _MISSING:
            return value
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not low <= value <= high
        ):
            raise ConfigError(f"{self.at(key)}: must be a number {low}-{high}, got {value!r}")
        return float(value)

    def boolean(self, key: str, default: Any = _MISSING) -> Any:
        value = self.raw(key, default)
        if not isinstance(value, bool):
            raise ConfigError(f"{self.at(key)}: must be true or false, got {value!r}")
        return value

    def strings(self, key: str, default: Any = _MISSING) -> Any:
        """A list of non-empty strings; a single string is accepted as a list of one."""
        value = self.raw(key, default)
        if value is default and default is not _MISSING:
            return value
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise ConfigError(f"{self.at(key)}: must be a list of strings, got {_kind(value)}")
        return tuple(value)

    def string_map(self, key: str, default: Any = _MISSING) -> Any:
        """A mapping of string to string (header templates, field-to-variable maps)."""
        value = self.raw(key, default)
        if value is default and default is not _MISSING:
            return value
        if not isinstance(value, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            raise ConfigError(f"{self.at(key)}: must be a mapping of strings to strings")
        return MappingProxyType(dict(value))

    def path(self, key: str, base: Path, default: Any = _MISSING, must_exist: bool = True) -> Any:
        """A file path, relative to the config file's directory; must exist unless told."""
        value = self.text(key, default)
        if value is default and default is not _MISSING:
            return value
        resolved = (base / value).resolve()
        if must_exist and not resolved.is_file():
            raise ConfigError(f"{self.at(key)}: file not found: {resolved}")
        return resolved

    def section(self, key: str, default: Any = _MISSING) -> Section:
        value = self.raw(key, default)
        return Section({} if value is None else value, self.at(key))

    def sections(self, key: str) -> Iterator[Section]:
        value = self.raw(key)
        if not isinstance(value, list) or not value:
            raise ConfigError(f"{self.at(key)}: must be a non-empty list")
        for i, item in enumerate(value):
            yield Section(item, f"{self.at(key)}[{i}]" if self.where else f"{key}[{i}]")

    def frozen(self, key: str) -> Mapping[str, Any]:
        """The raw mapping under `key`, read-only, for an adapter to parse with `Section`."""
        value = self.raw(key, {})
        if value is None:
            value = {}
        if not isinstance(value, Mapping):
            raise ConfigError(f"{self.at(key)}: must be a mapping, got {_kind(value)}")
        return MappingProxyType(dict(value))

    def finish(self) -> None:
        unknown = sorted(str(k) for k in self._raw if k not in self._seen)
        if unknown:
            raise ConfigError(f"{self.at(unknown[0])}: unknown key")


def _kind(value: object) -> str:
    return "nothing" if value is None else type(value).__name__


@dataclass(frozen=True, slots=True)
class ListenAddress:
    """Where a listener binds: a TCP host and port, or a unix socket path."""

    host: str | None = None
    port: int | None = None
    path: Path | None = None

    def __str__(self) -> str:
        return f"unix:{self.path}" if self.path else f"{self.host}:{self.port}"


def parse_listen(value: str, where: str, base: Path) -> ListenAddress:
    if value.startswith("unix:"):
        return ListenAddress(path=(base / value[5:]).resolve())
    host, sep, port_text = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"{where}: must be HOST:PORT (port 0-65535) or unix:PATH, got {value!r}")
    if host != "localhost":
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ConfigError(f"{where}: host must be an IP address or localhost") from None
    return ListenAddress(host=host, port=int(port_text))


@dataclass(frozen=True, slots=True)
class IdentityConfig:
    trust_domain: str
    x509_bundle: Path


@dataclass(frozen=True, slots=True)
class TLSConfig:
    cert: Path
    key: Path


@dataclass(frozen=True, slots=True)
class VaultAuthConfig:
    method: Literal["token"]
    token_env: str | None = None
    token_file: Path | None = None


@dataclass(frozen=True, slots=True)
class VaultConfig:
    address: str
    auth: VaultAuthConfig
    ca: Path | None = None
    timeout: float = 5.0


@dataclass(frozen=True, slots=True)
class AdminConfig:
    listen: ListenAddress


@dataclass(frozen=True, slots=True)
class AuditConfig:
    file: Path | None


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

    @property
    def where(self) -> str:
        return f"services[{self.index}]"


@dataclass(frozen=True, slots=True)
class Config:
    path: Path
    identity: IdentityConfig
    tls: TLSConfig
    services: tuple[ServiceConfig, ...]
    vault: VaultConfig | None = None
    admin: AdminConfig | None = None
    audit: AuditConfig = AuditConfig(file=None)

    @property
    def base_dir(self) -> Path:
        return self.path.parent


def load_config(path: str | Path) -> Config:
    """Read, parse and validate a config file. Raises ConfigError with a located message."""
    path = Path(path).resolve()
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: config larger than {MAX_CONFIG_BYTES} bytes")
    try:
        raw = yaml.safe_load(data)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{at}") from None
    return parse_config(raw, path)


def parse_config(raw: object, path: Path) -> Config:
    base = path.parent
    top = Section(raw, "")
    version = top.raw("version")
    if version != 1:
        raise ConfigError(f"version: must be 1 (the only config version so far), got {version!r}")

    ident = top.section("identity")
    trust_domain = ident.text("trust_domain")
    try:
        trust_domain = TrustDomain(trust_domain).name
    except Exception:
        raise ConfigError(
            f"identity.trust_domain: not a valid trust domain: {trust_domain!r}"
        ) from None
    identity = IdentityConfig(trust_domain, ident.path("x509_bundle", base))
    ident.finish()

    tls_section = top.section("tls")
    tls = TLSConfig(tls_section.path("cert", base), tls_section.path("key", base))
    tls_section.finish()

    vault = _parse_vault(top.section("vault"), base) if top.has("vault") else None
    top.raw("vault", None)

    admin = None
    if top.has("admin"):
        admin_section = top.section("admin")
        admin = AdminConfig(
            parse_listen(admin_section.text("listen"), admin_section.at("listen"), base)
        )
        admin_section.finish()

    audit = AuditConfig(file=None)
    if top.has("audit"):
        audit_section = top.section("audit")
        audit_file = audit_section.text("file", None)
        audit = AuditConfig(file=(base / audit_file).resolve() if audit_file else None)
        audit_section.finish()

    services = tuple(
        _parse_service(s, i, base, trust_domain) for i, s in enumerate(top.sections("services"))
    )
    _check_unique(services)
    for service in services:
        if service.credentials.provider.startswith("vault-") and vault is None:
            raise ConfigError(
                f"{service.where}.credentials.from: {service.credentials.provider} needs a "
                "top-level vault section"
            )
    top.finish()
    return Config(path, identity, tls, services, vault, admin, audit)


def _parse_vault(section: Section, base: Path) -> VaultConfig:
    address = section.text("address")
    if not address.startswith(("http://", "https://")):
        raise ConfigError(f"{section.at('address')}: must start with http:// or https://")
    auth_section = section.section("auth")
    method = auth_section.choice("method", VAULT_AUTH_METHODS)
    token_env = auth_section.text("token_env", None)
    token_file = auth_section.path("token_file", base, None)
    if (token_env is None) == (token_file is None):
        raise ConfigError(
            f"{auth_section.where}: token auth needs exactly one of token_env, token_file"
        )
    auth_section.finish()
    vault = VaultConfig(
        address=address.rstrip("/"),
        auth=VaultAuthConfig(method, token_env, token_file),
        ca=section.path("ca", base, None),
        timeout=section.number("timeout", 0.1, 120, 5.0),
    )
    section.finish()
    return vault


def _parse_service(s: Section, index: int, base: Path, trust_domain: str) -> ServiceConfig:
    name = s.text("name")
    adapter = s.text("adapter")
    listen = parse_listen(s.text("listen"), s.at("listen"), base)
    client_auth = s.choice("client_auth", CLIENT_AUTH_MODES, "mtls")
    if client_auth == "jwt":
        raise ConfigError(f"{s.at('client_auth')}: jwt is not supported yet; use mtls or local")
    local_identity = s.text("local_identity", None)
    if client_auth == "local" and local_identity is None:
        raise ConfigError(
            f"{s.at('local_identity')}: required with client_auth: local (the SPIFFE ID "
            "every local caller is treated as)"
        )
    if local_identity is not None:
        if client_auth != "local":
            raise ConfigError(f"{s.at('local_identity')}: only allowed with client_auth: local")
        _check_spiffe_id(local_identity, s.at("local_identity"), trust_domain)
    allow = s.strings("allow", ())
    for i, pattern in enumerate(allow):
        _check_allow_pattern(pattern, f"{s.at('allow')}[{i}]", trust_domain)
    credentials = _parse_credentials(s.section("credentials"), base)
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
        local_identity=local_identity,
        max_connections=s.integer("max_connections", 1, 1_000_000, DEFAULT_MAX_CONNECTIONS),
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


def _check_spiffe_id(value: str, where: str, trust_domain: str) -> None:
    try:
        spiffe_id = SpiffeId(value)
    except Exception:
        raise ConfigError(f"{where}: not a valid SPIFFE ID: {value!r}") from None
    if spiffe_id.trust_domain.name != trust_domain:
        raise ConfigError(f"{where}: {value!r} is outside trust domain {trust_domain!r}")


def _check_allow_pattern(pattern: str, where: str, trust_domain: str) -> None:
    for suffix in ("/**", "/*"):
        if pattern.endswith(suffix):
            pattern = pattern[: -len(suffix)]
            break
    if "*" in pattern:
        raise ConfigError(f"{where}: '*' is only allowed as a trailing /* or /** segment")
    _check_spiffe_id(pattern, where, trust_domain)


def _check_unique(services: tuple[ServiceConfig, ...]) -> None:
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
