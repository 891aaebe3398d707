"""The `upstream` section of a redis service.

```yaml
upstream:
  address: cache.internal:6380       # host:port of the Redis or Valkey server
  tls: {mode: verify-full, ca: certs/redis-ca.pem}   # TLS from the first byte, or disable
  connect_timeout: 5
```
"""

from __future__ import annotations

from pathlib import Path

from broker.config import Section
from broker.session.upstream import UpstreamTarget, parse_target

# Redis's default port.
DEFAULT_PORT = 6379


def parse_upstream(section: Section, base: Path) -> UpstreamTarget:
    target = parse_target(section, base, DEFAULT_PORT)
    section.finish()
    return target
