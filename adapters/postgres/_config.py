"""The `upstream` section of a postgres service, parsed once into a frozen object.

```yaml
upstream:
  address: db.internal:5432          # host:port of the PostgreSQL server
  database: orders                   # or a list: the databases clients may ask for
  tls: {mode: verify-full, ca: certs/db-ca.pem, server_name: db.internal}
  connect_timeout: 5                 # seconds, TCP connect plus TLS handshake
  set_role: orders_owner             # SET ROLE after the login, before the client's first
                                     # message: objects belong to this group role, not to
                                     # the lease's dynamic user (docs/adapters/postgres.md)
```

`address`, `tls` and `connect_timeout` are the core's (broker.session.upstream), as for every
TCP adapter; `database` is PostgreSQL's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from broker.config import Section
from broker.errors import ConfigError
from broker.session.upstream import UpstreamTarget, parse_target

# PostgreSQL's default port.
DEFAULT_PORT = 5432
# PostgreSQL truncates identifiers to NAMEDATALEN - 1 = 63 bytes; a longer database (or role)
# name in the config cannot match anything the server has.
MAX_DATABASE_NAME_BYTES = 63


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    target: UpstreamTarget
    # Databases clients may ask for; the first is used when a client names none.
    databases: tuple[str, ...]
    # The role every session switches to right after the upstream login, or None.
    set_role: str | None = None


def parse_upstream(section: Section, base: Path) -> UpstreamConfig:
    target = parse_target(section, base, DEFAULT_PORT)
    databases = section.strings("database")
    if not databases:
        raise ConfigError(f"{section.at('database')}: must name at least one database")
    for i, name in enumerate(databases):
        if len(name.encode()) > MAX_DATABASE_NAME_BYTES:
            raise ConfigError(
                f"{section.at('database')}[{i}]: longer than {MAX_DATABASE_NAME_BYTES} bytes"
            )
    set_role: str | None = section.text("set_role", None)
    if set_role is not None and (
        len(set_role.encode()) > MAX_DATABASE_NAME_BYTES or "\0" in set_role
    ):
        raise ConfigError(
            f"{section.at('set_role')}: must be a role name of at most "
            f"{MAX_DATABASE_NAME_BYTES} bytes"
        )
    section.finish()
    return UpstreamConfig(target, databases, set_role)
