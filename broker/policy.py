"""Policy: a pure function from (identity, service) to a Decision. Deny by default.

Rules are SPIFFE IDs, matched exactly, or with a trailing ``/*`` (exactly one more path
segment) or ``/**`` (one or more more segments).
"""

from __future__ import annotations

from collections.abc import Container
from dataclasses import dataclass

from broker.config import ServiceConfig
from broker.identity import WorkloadIdentity


@dataclass(frozen=True, slots=True)
class Decision:
    allow: bool
    # Why: the matched rule for an allow, the reason for a deny. Safe to show the client.
    reason: str
    rule: str | None = None


def rule_matches(rule: str, spiffe_id: str) -> bool:
    if rule.endswith("/**"):
        prefix = rule[:-2]
        return spiffe_id.startswith(prefix) and len(spiffe_id) > len(prefix)
    if rule.endswith("/*"):
        prefix = rule[:-1]
        rest = spiffe_id[len(prefix) :]
        return spiffe_id.startswith(prefix) and bool(rest) and "/" not in rest
    return rule == spiffe_id


def evaluate(
    identity: WorkloadIdentity | None,
    service: ServiceConfig,
    *,
    denied: Container[str] = frozenset(),
) -> Decision:
    """Decide whether `identity` may use `service`. Never raises; never allows by default.

    `denied` holds offboarded SPIFFE IDs (the deny list): refused whatever the rules say.
    """
    if identity is None:
        return Decision(False, "no proven workload identity")
    if identity.spiffe_id in denied:
        return Decision(False, f"{identity.spiffe_id} is offboarded")
    for rule in service.allow:
        if rule_matches(rule, identity.spiffe_id):
            return Decision(True, f"allowed by rule {rule}", rule)
    return Decision(False, f"{identity.spiffe_id} is not allowed to use service {service.name}")
