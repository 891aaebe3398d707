"""Configuration: parsed once into frozen, typed objects with located error messages.

The runtime never reads raw dicts. One module per top-level section (`identity`, `vault`,
`services`), all read with `section.Section`, so every error names its path:
``services[1].upstream.url: must be an http or https URL``. Adapter-specific sections
(`upstream`, `inject`) are parsed by the adapter with the same reader.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from broker.errors import ConfigError

from .audit_sinks import OtlpConfig, SyslogConfig, parse_otlp, parse_syslog
from .governance import (
    AllowRule,
    DenyListConfig,
    GovernanceConfig,
    IdentityInfo,
    TimeWindow,
    parse_governance,
    parse_identities,
    parse_rule,
    parse_time_window,
)
from .identity import (
    SPIFFE_ENDPOINT_SOCKET,
    WORKLOAD_API,
    IdentityConfig,
    TLSConfig,
    parse_identity,
    parse_tls,
)
from .jwt import JwtConfig, JwtIssuerConfig, ServiceJwtConfig, SpiffeIdTemplate
from .oauth2 import OAUTH2_AUTH_METHODS, OAuth2Config
from .section import ListenAddress, Section, parse_listen
from .services import (
    CLIENT_AUTH_MODES,
    CREDENTIAL_PROVIDERS,
    DEFAULT_CREDENTIAL_TTL_SECONDS,
    DEFAULT_LEASE_IDLE_SECONDS,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_SOCKET_MODE,
    LOCAL_SELECTORS,
    MAX_CREDENTIAL_TTL_SECONDS,
    TOKEN_AUTH_MODES,
    CredentialsConfig,
    LocalRule,
    ServiceConfig,
    check_unique,
    parse_service,
)
from .vault import (
    VAULT_AUTH_METHODS,
    VaultAuthConfig,
    VaultConfig,
    check_vault_identity,
    parse_vault,
)

__all__ = [
    "CLIENT_AUTH_MODES",
    "CREDENTIAL_PROVIDERS",
    "DEFAULT_CREDENTIAL_TTL_SECONDS",
    "DEFAULT_DRAIN_SECONDS",
    "DEFAULT_LEASE_IDLE_SECONDS",
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_SOCKET_MODE",
    "EVENT_LOOPS",
    "LOCAL_SELECTORS",
    "MAX_CREDENTIAL_TTL_SECONDS",
    "MAX_WORKERS",
    "OAUTH2_AUTH_METHODS",
    "SPIFFE_ENDPOINT_SOCKET",
    "TOKEN_AUTH_MODES",
    "VAULT_AUTH_METHODS",
    "WORKLOAD_API",
    "AdminConfig",
    "AllowRule",
    "AuditConfig",
    "Config",
    "CredentialsConfig",
    "DenyListConfig",
    "GovernanceConfig",
    "IdentityConfig",
    "IdentityInfo",
    "JwtConfig",
    "JwtIssuerConfig",
    "ListenAddress",
    "LocalRule",
    "OAuth2Config",
    "Section",
    "ServiceConfig",
    "ServiceJwtConfig",
    "SpiffeIdTemplate",
    "TLSConfig",
    "TimeWindow",
    "VaultAuthConfig",
    "VaultConfig",
    "default_workers",
    "load_config",
    "parse_config",
    "parse_listen",
    "parse_rule",
    "parse_time_window",
]

# In-flight requests and sessions get this long to finish on SIGTERM before they are cut
# (`sidekey run --drain-timeout`).
DEFAULT_DRAIN_SECONDS = 10.0
# A config file larger than this is a mistake (or an attack on the parser).
MAX_CONFIG_BYTES = 1024 * 1024
# `event_loop`: auto is uvloop where it is installed (a dependency on Linux), else asyncio's.
EVENT_LOOPS = ("auto", "uvloop", "asyncio")
# More worker processes than this is a typo: each one holds its own vault token and leases.
MAX_WORKERS = 256


def default_workers() -> int:
    """The CPUs this process may run on: its affinity mask (a container's cpuset), and no
    more than a cgroup v2 CPU quota allows (a Kubernetes CPU limit of 1.5 gives 2); at least
    1."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    try:
        quota, period = CGROUP_CPU_MAX.read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, -(-int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return max(1, cpus)


# The CPU quota of this process's cgroup (v2): "QUOTA PERIOD" or "max PERIOD".
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


@dataclass(frozen=True, slots=True)
class AdminConfig:
    listen: ListenAddress


# `audit.refusal_lines_per_minute`'s default (broker.observe.refusals).
DEFAULT_REFUSAL_LINES_PER_MINUTE = 60


@dataclass(frozen=True, slots=True)
class AuditConfig:
    file: Path | None
    chain: bool = True
    syslog: SyslogConfig | None = None
    # Fail closed: refuse requests and sessions while the audit file cannot be written.
    required: bool = False
    otlp: OtlpConfig | None = None
    # `deny` lines per service and peer address per minute for callers that proved no
    # identity; the rest go into one `deny_suppressed` line (broker.observe.refusals). 0: all.
    refusal_lines_per_minute: int = DEFAULT_REFUSAL_LINES_PER_MINUTE


@dataclass(frozen=True, slots=True)
class Config:
    path: Path
    identity: IdentityConfig
    # None: the broker's certificate is its X.509-SVID from the Workload API.
    tls: TLSConfig | None
    services: tuple[ServiceConfig, ...]
    vault: VaultConfig | None = None
    admin: AdminConfig | None = None
    audit: AuditConfig = AuditConfig(file=None)
    identities: tuple[IdentityInfo, ...] = ()
    governance: GovernanceConfig = field(default_factory=GovernanceConfig)
    # SHA-256 of the config file's bytes (hex), as the audit trail's `policy` events name it.
    digest: str = ""
    # Which event loop `sidekey run` starts: auto, uvloop or asyncio (EVENT_LOOPS).
    event_loop: str = "auto"
    # Worker processes sharing every listener (broker.workers); None: one per usable CPU
    # (`default_workers()`). 1 runs the broker in this one process, as before workers existed.
    workers: int | None = None
    # Where the broker keeps what must outlive its process: the lease journals a broker (or
    # worker) killed outright leaves for the next one to revoke (broker.credentials.journal).
    # None: under `workers: N` the parent's run directory, which outlives only a worker.
    state_dir: Path | None = None

    @property
    def worker_count(self) -> int:
        return self.workers if self.workers is not None else default_workers()

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
    return dataclasses.replace(parse_config(raw, path), digest=hashlib.sha256(data).hexdigest())


def parse_config(raw: object, path: Path, environ: Mapping[str, str] | None = None) -> Config:
    """Parse a loaded YAML document; `environ` (default: os.environ) is where
    SPIFFE_ENDPOINT_SOCKET is looked up."""
    base = path.parent
    top = Section(raw, "")
    version = top.raw("version")
    if version != 1:
        raise ConfigError(f"version: must be 1 (the only config version so far), got {version!r}")
    event_loop = top.choice("event_loop", EVENT_LOOPS, "auto")

    tls = parse_tls(top.section("tls"), base) if top.raw("tls", None) is not None else None
    identity = parse_identity(top.section("identity"), base, tls=tls, environ=environ)

    vault = parse_vault(top.section("vault"), base) if top.has("vault") else None
    top.raw("vault", None)
    if vault is not None:
        check_vault_identity(vault, identity)

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
        audit = AuditConfig(
            file=(base / audit_file).resolve() if audit_file else None,
            chain=audit_section.boolean("chain", True),
            required=audit_section.boolean("required", False),
            refusal_lines_per_minute=audit_section.integer(
                "refusal_lines_per_minute", 0, 1_000_000, DEFAULT_REFUSAL_LINES_PER_MINUTE
            ),
            syslog=parse_syslog(audit_section.section("syslog"))
            if audit_section.has("syslog")
            else None,
            otlp=parse_otlp(audit_section.section("otlp")) if audit_section.has("otlp") else None,
        )
        audit_section.finish()

    # Trust domains tokens can prove IDs of, besides the broker's own (spiffe_id templates).
    token_domains = identity.jwt.trust_domains if identity.jwt else frozenset()
    identities = parse_identities(top)
    for info in identities:
        _check_identity_pattern(info, (*identity.trust_domains, *sorted(token_domains)))
    governance = parse_governance(top)
    workers = top.integer("workers", 1, MAX_WORKERS, None)
    state_dir_text = top.text("state_dir", None)
    state_dir = (base / state_dir_text).resolve() if state_dir_text else None

    services = tuple(
        parse_service(s, i, base, identity.trust_domains, token_domains)
        for i, s in enumerate(top.sections("services"))
    )
    check_unique(services)
    for service in services:
        if service.jwt is not None and identity.jwt is None:
            raise ConfigError(
                f"{service.where}.client_auth: {service.client_auth} needs identity.jwt.issuers "
                "(who signs the tokens this service accepts)"
            )
        if service.credentials.provider.startswith("vault-") and vault is None:
            raise ConfigError(
                f"{service.where}.credentials.from: {service.credentials.provider} needs a "
                "top-level vault section"
            )
    top.finish()
    return Config(
        path, identity, tls, services, vault, admin, audit, identities, governance,
        workers=workers,
        event_loop=event_loop,
        state_dir=state_dir,
    )  # fmt: skip


def _check_identity_pattern(info: IdentityInfo, trust_domains: tuple[str, ...]) -> None:
    from .services import _check_allow_pattern  # noqa: PLC0415 - one checker for both

    _check_allow_pattern(info.id, f"{info.where}.id", trust_domains)
