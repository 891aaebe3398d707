"""Policy: a pure function from (identity, service, context) to a Decision. Deny by default.

Rules are SPIFFE IDs, matched exactly, or with a trailing ``/*`` (exactly one more path
segment) or ``/**`` (one or more more segments), and may carry conditions, all of which must
hold: `hours` (a weekly time window in a zone), `from` (source address ranges) and `claims`
(values the caller's verified JWT/OIDC claims must have). `explain` says which rule decided,
or why none did and which came nearest.

Rules without conditions cost what they always did (a prefix compare); the clock is read and
the peer's address parsed only when a rule that matches the ID has such a condition.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Container, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any
from zoneinfo import ZoneInfo

from broker.config import AllowRule, ServiceConfig, TimeWindow
from broker.identity import WorkloadIdentity


@dataclass(frozen=True, slots=True)
class Decision:
    allow: bool
    # Why: the matched rule for an allow, the reason for a deny. Safe to show the client.
    reason: str
    rule: str | None = None


@dataclass(frozen=True, slots=True)
class Context:
    """What conditions look at besides the identity: when, and from where."""

    at: datetime | None = None  # None: now
    source: str | None = None  # the peer: "10.1.2.3:5000", "[::1]:5000", an address, "unix:..."


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
    source: str | None = None,
    at: datetime | None = None,
) -> Decision:
    """Decide whether `identity` may use `service`. Never raises; never allows by default.

    `denied` holds offboarded SPIFFE IDs (the deny list): refused whatever the rules say.
    `source` (the peer) and `at` (default: now) are what `from` and `hours` look at.
    """
    if identity is None:
        return Decision(False, "no proven workload identity")
    spiffe_id = identity.spiffe_id
    if spiffe_id in denied:
        return Decision(False, f"{spiffe_id} is offboarded")
    unmet: str | None = None
    for rule in service.rules:
        if not rule_matches(rule.id, spiffe_id):
            continue
        if rule.conditional:
            claims = identity.token_claims
            if claims is None and identity.claims:
                claims = dict(identity.claims)  # only the claims its SPIFFE ID was made of
            why = unmet_condition(rule, claims, Context(at, source))
            if why is not None:
                unmet = unmet or why
                continue
        return Decision(True, f"allowed by rule {rule.id}", rule.id)
    if unmet is not None:
        return Decision(False, f"{spiffe_id} may use service {service.name} only when {unmet}")
    return Decision(False, f"{spiffe_id} is not allowed to use service {service.name}")


def unmet_condition(
    rule: AllowRule, claims: Mapping[str, Any] | None, context: Context
) -> str | None:
    """None when every condition of `rule` holds; else the first one that does not, worded
    as what it requires (``"the source address is in 10.0.0.0/8"``)."""
    if rule.hours is not None and not in_window(rule.hours, context.at):
        return f"the time is within {rule.hours.text}"
    if rule.sources:
        address = source_address(context.source)
        if address is None or not any(address in net for net in rule.sources):
            ranges = ", ".join(str(n) for n in rule.sources)
            return f"the source address is in {ranges}"
    for name, accepted in rule.claims.items():
        if not claim_matches(claims, name, accepted):
            wanted = accepted[0] if len(accepted) == 1 else f"one of {', '.join(accepted)}"
            return f"claim {name} is {wanted}"
    return None


def in_window(window: TimeWindow, at: datetime | None) -> bool:
    now = (at or datetime.now(UTC)).astimezone(_zone(window.zone))
    minute = now.hour * 60 + now.minute
    day = now.weekday()
    if window.start < window.end:
        return day in window.days and window.start <= minute < window.end
    # Spans midnight: the evening part on a listed day, the morning part on the day after.
    return (day in window.days and minute >= window.start) or (
        (day - 1) % 7 in window.days and minute < window.end
    )


@lru_cache(maxsize=64)
def _zone(name: str) -> ZoneInfo:
    return ZoneInfo(name)


def source_address(source: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The IP address in a peer string as the audit trail writes it; None for a unix socket
    or anything unparsable (a `from` condition then does not hold: fail closed)."""
    if not source or source.startswith("unix"):
        return None
    host = source
    if host.startswith("["):
        host = host[1 : host.find("]")]
    elif host.count(":") == 1:
        host = host.rsplit(":", 1)[0]
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def claim_matches(claims: Mapping[str, Any] | None, name: str, accepted: Sequence[str]) -> bool:
    """The claim (a top-level name, else a dotted path into nested objects) has one of the
    accepted values; a list claim (groups) matches when any element does."""
    if not claims:
        return False
    value = _lookup(claims, name, depth=0)
    if value is _MISSING:
        return False
    values = value if isinstance(value, list) else [value]
    return any(_text(v) in accepted for v in values)


_MISSING: Any = object()
# Claim objects nest a few levels (Kubernetes: kubernetes.io -> pod -> name); deeper is not
# a claim anyone writes a rule on, and the bound keeps a hostile token from costing much.
MAX_CLAIM_DEPTH = 8


def _lookup(claims: Mapping[str, Any], name: str, depth: int) -> Any:
    """`name` as a key, else as a key followed by ``.`` and a name inside it (keys may hold
    dots themselves: ``kubernetes.io.namespace`` is ``{"kubernetes.io": {"namespace"}}``)."""
    if name in claims:
        return claims[name]
    if depth >= MAX_CLAIM_DEPTH:
        return _MISSING
    for key, inner in claims.items():
        if isinstance(inner, Mapping) and name.startswith(f"{key}."):
            found = _lookup(inner, name[len(key) + 1 :], depth + 1)
            if found is not _MISSING:
                return found
    return _MISSING


def _text(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


# --------------------------------------------------------------------------- explain


@dataclass(frozen=True, slots=True)
class RuleCheck:
    rule: AllowRule
    id_matches: bool
    unmet: str | None  # the condition that failed (None: all held, or the ID did not match)


@dataclass(frozen=True, slots=True)
class Explanation:
    decision: Decision
    matched: AllowRule | None
    # The rule that came closest without deciding: its ID matched but a condition failed,
    # else the rule whose ID shares the longest prefix with the identity.
    nearest: RuleCheck | None
    checks: tuple[RuleCheck, ...] = field(default=())

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "decision": "allow" if self.decision.allow else "deny",
            "reason": self.decision.reason,
            "rule": self.matched.to_json() if self.matched else None,
        }
        if self.nearest is not None:
            out["nearest"] = {
                "rule": self.nearest.rule.to_json(),
                "why_not": self.nearest.unmet or f"the ID does not match {self.nearest.rule.id}",
            }
        return out


def explain(
    spiffe_id: str,
    service: ServiceConfig,
    *,
    claims: Mapping[str, Any] | None = None,
    context: Context | None = None,
    denied: Container[str] = frozenset(),
) -> Explanation:
    """The decision for `spiffe_id` on `service`, the rule that made it, and the nearest rule
    that did not (what `sidekey explain` prints)."""
    identity = WorkloadIdentity(
        spiffe_id, "jwt-svid" if claims else "x509-svid", token_claims=claims
    )
    context = context or Context()
    decision = evaluate(identity, service, denied=denied, source=context.source, at=context.at)
    checks: list[RuleCheck] = []
    for rule in service.rules:
        matches = rule_matches(rule.id, spiffe_id)
        unmet = unmet_condition(rule, claims, context) if matches and rule.conditional else None
        checks.append(RuleCheck(rule, matches, unmet))
    matched = next(
        (c.rule for c in checks if decision.allow and c.rule.id == decision.rule and not c.unmet),
        None,
    )
    nearest: RuleCheck | None = None
    if matched is None:
        nearest = next((c for c in checks if c.id_matches), None)
        if nearest is None and checks:
            nearest = max(checks, key=lambda c: _common_prefix(c.rule.id, spiffe_id))
    return Explanation(decision, matched, nearest, tuple(checks))


def _common_prefix(pattern: str, spiffe_id: str) -> int:
    pattern = pattern.removesuffix("**").removesuffix("*")
    n = 0
    for a, b in zip(pattern, spiffe_id, strict=False):
        if a != b:
            break
        n += 1
    return n
