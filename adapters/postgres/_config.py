"""The `upstream` section of a postgres service, parsed once into a frozen object.

```yaml
upstream:
  address: db.internal:5432          # host:port of the PostgreSQL server
  database: orders                   # or a list: the databases clients may ask for
  tls: {mode: verify-full, ca: certs/db-ca.pem, server_name: db.internal}
  connect_timeout: 5                 # seconds, TCP connect plus TLS handshake
```
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from pathlib import Path

from broker.config import Section
from broker.errors import ConfigError
from broker.identity.tls import client_context

TLS_MODES = ("disable", "require", "verify-ca", "verify-full")
# Secure unless told otherwise: libpq's own default (prefer) would let an active attacker
# strip TLS and read the credential the broker sends.
DEFAULT_TLS_MODE = "verify-full"
# PostgreSQL's default port.
DEFAULT_PORT = 5432
# A reachable server accepts a TCP connection in milliseconds; a few seconds covers a loaded
# or distant one, and the client gets its 08001 error well before its own libpq timeout.
DEFAULT_CONNECT_TIMEOUT = 5.0
MAX_CONNECT_TIMEOUT = 120.0
# PostgreSQL truncates identifiers to NAMEDATALEN - 1 = 63 bytes; a longer database name in
# the config cannot match anything the server has.
MAX_DATABASE_NAME_BYTES = 63


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    host: str
    port: int
    # Databases clients may ask for; the first is used when a client names none.
    databases: tuple[str, ...]
    tls_mode: str
    # The context for the upstream TLS handshake; None with mode disable.
    ssl_context: ssl.SSLContext | None = field(repr=False)
    # Name sent as SNI (not for IP addresses) and, with verify-full, checked against the
    # server certificate: tls.server_name, else the host of `address`.
    server_name: str
    connect_timeout: float

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_upstream(section: Section, base: Path) -> UpstreamConfig:
    host, port = _parse_address(section.text("address"), section.at("address"))
    databases = section.strings("database")
    if not databases:
        raise ConfigError(f"{section.at('database')}: must name at least one database")
    for i, name in enumerate(databases):
        if len(name.encode()) > MAX_DATABASE_NAME_BYTES:
            raise ConfigError(
                f"{section.at('database')}[{i}]: longer than {MAX_DATABASE_NAME_BYTES} bytes"
            )
    connect_timeout = section.number(
        "connect_timeout", 0.1, MAX_CONNECT_TIMEOUT, DEFAULT_CONNECT_TIMEOUT
    )

    tls = section.section("tls", {})
    mode = tls.choice("mode", TLS_MODES, DEFAULT_TLS_MODE)
    ca: Path | None = tls.path("ca", base, None)
    server_name: str | None = tls.text("server_name", None)
    if ca is not None and mode in ("disable", "require"):
        raise ConfigError(
            f"{tls.at('ca')}: only used with mode verify-ca or verify-full (mode is {mode})"
        )
    if server_name is not None and mode == "disable":
        raise ConfigError(f"{tls.at('server_name')}: not used with mode disable")
    tls.finish()
    section.finish()

    ssl_context: ssl.SSLContext | None = None
    if mode != "disable":
        ssl_context = client_context(verify=mode != "require", ca=ca, where=tls.where)
        if mode == "verify-ca":
            # The chain is verified; the name is not (libpq's verify-ca).
            ssl_context.check_hostname = False
    return UpstreamConfig(
        host=host,
        port=port,
        databases=databases,
        tls_mode=mode,
        ssl_context=ssl_context,
        server_name=server_name or host,
        connect_timeout=connect_timeout,
    )


def _parse_address(value: str, where: str) -> tuple[str, int]:
    host, sep, port_text = value.rpartition(":")
    if not sep:
        host, port_text = value, str(DEFAULT_PORT)
    host = host.strip("[]")
    if not host or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ConfigError(f"{where}: must be HOST:PORT (port 1-65535), got {value!r}")
    return host, int(port_text)
