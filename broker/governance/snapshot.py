"""The effective policy of a config, as the `policy` audit event records it.

`sidekey access` reads these snapshots back from the trail to answer which identities could
reach which services at a time T, so a snapshot holds every rule with its conditions, in the
form `broker.config.parse_rule` reads.
"""

from __future__ import annotations

from typing import Any

from broker.config import Config


def effective_policy(config: Config) -> dict[str, Any]:
    """The fields of a `policy` event: config path and hash, every service's rules."""
    return {
        "config": str(config.path),
        "config_sha256": config.digest,
        "trust_domain": config.identity.trust_domain,
        "services": [
            {
                "name": s.name,
                "adapter": s.adapter,
                "credentials": s.credentials.describe(),
                **({"owner": s.owner} if s.owner else {}),
                "rules": [rule.to_json() for rule in s.rules],
            }
            for s in config.services
        ],
        "identities": [
            {
                "id": i.id,
                **({"owner": i.owner} if i.owner else {}),
                **({"expires": i.expires.isoformat()} if i.expires else {}),
            }
            for i in config.identities
        ],
    }
