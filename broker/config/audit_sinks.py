"""Where audit lines go besides the file: syslog (RFC 5424) and OpenTelemetry (OTLP/HTTP).

audit:
  file: audit.jsonl
  chain: true                     # the hash chain (docs/governance.md)
  syslog: {address: "udp://127.0.0.1:514", facility: auth, app_name: sidekey}
  otlp: {endpoint: "http://127.0.0.1:4318/v1/logs", headers: {x-tenant: ops}}
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from broker.errors import ConfigError

from .section import Section

# RFC 5424 section 6.2.1 facility codes.
FACILITIES = {
    "kern": 0, "user": 1, "mail": 2, "daemon": 3, "auth": 4, "syslog": 5, "lpr": 6,
    "news": 7, "uucp": 8, "cron": 9, "authpriv": 10, "ftp": 11,
    **{f"local{i}": 16 + i for i in range(8)},
}  # fmt: skip
DEFAULT_OTLP_TIMEOUT = 5.0


@dataclass(frozen=True, slots=True)
class SyslogConfig:
    transport: str  # udp | tcp | unix
    host: str = ""
    port: int = 514
    path: str = ""
    facility: int = FACILITIES["auth"]
    app_name: str = "sidekey"


@dataclass(frozen=True, slots=True)
class OtlpConfig:
    endpoint: str
    headers: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    timeout: float = DEFAULT_OTLP_TIMEOUT


def parse_syslog(s: Section) -> SyslogConfig:
    address = s.text("address")
    where = s.at("address")
    facility = s.choice("facility", tuple(FACILITIES), "auth")
    app = s.text("app_name", "sidekey")
    if not app.isprintable() or " " in app or len(app) > 48:
        raise ConfigError(f"{s.at('app_name')}: printable, no spaces, at most 48 characters")
    s.finish()
    scheme, _, rest = address.partition("://")
    if address.startswith("unix:"):
        return SyslogConfig("unix", path=address[5:], facility=FACILITIES[facility], app_name=app)
    host, _, port = rest.rpartition(":")
    if scheme not in ("udp", "tcp") or not host or not port.isdigit():
        raise ConfigError(
            f"{where}: must be udp://HOST:PORT, tcp://HOST:PORT or unix:/dev/log, got {address!r}"
        )
    return SyslogConfig(scheme, host.strip("[]"), int(port), facility=FACILITIES[facility],
                        app_name=app)  # fmt: skip


def parse_otlp(s: Section) -> OtlpConfig:
    endpoint = s.text("endpoint")
    if not endpoint.startswith(("http://", "https://")):
        raise ConfigError(f"{s.at('endpoint')}: must be an http(s) URL (OTLP/HTTP, /v1/logs)")
    config = OtlpConfig(endpoint, s.string_map("headers", MappingProxyType({})),
                        s.number("timeout", 0.1, 60, DEFAULT_OTLP_TIMEOUT))  # fmt: skip
    s.finish()
    return config
