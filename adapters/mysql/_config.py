"""The `upstream` section of a mysql service.

```yaml
upstream:
  address: db.internal:3306          # host:port of the MySQL or MariaDB server
  database: orders                   # or a list: the databases clients may use
  tls: {mode: verify-full, ca: certs/db-ca.pem}
  connect_timeout: 5
  server_version: 10.11.6-MariaDB    # optional: what the broker's greeting says
```
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from broker.config import Section
from broker.errors import ConfigError
from broker.session.upstream import UpstreamTarget, parse_target

# MySQL's default port.
DEFAULT_PORT = 3306
# MySQL identifiers are at most 64 characters.
MAX_DATABASE_NAME_CHARS = 64
# A server version string is a few dozen bytes ("10.11.6-MariaDB-0+deb12u1").
MAX_SERVER_VERSION = 100


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    target: UpstreamTarget
    # Databases clients may use; the first when a client names none.
    databases: tuple[str, ...]
    # What the broker's greeting names as the server version before it has seen the
    # upstream's own (from then on, the upstream's); None: learn it.
    server_version: str | None


def parse_upstream(section: Section, base: Path) -> UpstreamConfig:
    target = parse_target(section, base, DEFAULT_PORT)
    databases = section.strings("database")
    if not databases:
        raise ConfigError(f"{section.at('database')}: must name at least one database")
    for i, name in enumerate(databases):
        if len(name) > MAX_DATABASE_NAME_CHARS or "\0" in name:
            raise ConfigError(
                f"{section.at('database')}[{i}]: not a MySQL database name (at most "
                f"{MAX_DATABASE_NAME_CHARS} characters)"
            )
    version: str | None = section.text("server_version", None)
    if version is not None and (len(version) > MAX_SERVER_VERSION or "\0" in version):
        raise ConfigError(
            f"{section.at('server_version')}: at most {MAX_SERVER_VERSION} characters"
        )
    section.finish()
    return UpstreamConfig(target, databases, version)
