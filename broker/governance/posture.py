"""Inventory and posture: who the policy lets in, who owns them, and what an auditor would
flag, mapped to the OWASP Non-Human Identities Top 10 (2025).

Pure: the caller hands in the config, usage (from the live broker or from audit trails) and
the age of each static secret (from the vault); nothing here does IO.

Findings (`sidekey posture`):
- NHI-01 improper offboarding: an identity allowed but unseen for `stale_days`, or past the
  `expires` date its `identities:` entry gives;
- NHI-05 overprivileged NHI: a wildcard rule across namespaces (`spiffe://td/**`,
  `spiffe://td/ns/**`, `spiffe://td/*`);
- NHI-07 long-lived secrets: a static credential (vault-kv version older than
  `secret_max_days`, or env/file, which never rotate by themselves);
- NHI-09 NHI reuse: one identity seen from more than `max_hosts` source hosts, or reaching
  services of more than one owner.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any

from broker.config import Config, IdentityInfo, ServiceConfig
from broker.policy import rule_matches

SEVERITIES = ("low", "medium", "high")
DEFAULT_STALE_DAYS = 30
DEFAULT_SECRET_MAX_DAYS = 90
DEFAULT_MAX_HOSTS = 20
# Path segments a wildcard rule must keep before it: spiffe://td/ns/prod/** is one
# namespace; spiffe://td/ns/** spans them all.
MIN_WILDCARD_SEGMENTS = 2


@dataclass(frozen=True, slots=True)
class Use:
    """One identity's use of one service, from the broker or the trails."""

    first: datetime
    last: datetime
    calls_24h: int
    hosts: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Finding:
    id: str  # NHI-01 ...
    title: str
    severity: str
    subject: str
    evidence: str

    def to_json(self) -> dict[str, str]:
        return {"id": self.id, "title": self.title, "severity": self.severity,
                "subject": self.subject, "evidence": self.evidence}  # fmt: skip


def describe_identity(config: Config, spiffe_id: str) -> IdentityInfo | None:
    return next((i for i in config.identities if rule_matches(i.id, spiffe_id) or
                 i.id == spiffe_id), None)  # fmt: skip


def known_identities(config: Config, usage: Mapping[tuple[str, str], Use]) -> list[str]:
    """Exact IDs from the rules and `identities:`, and every identity seen in traffic."""
    found = {r.id for s in config.services for r in s.rules if not r.id.endswith("*")}
    found |= {i.id for i in config.identities if not i.id.endswith("*")}
    found |= {spiffe_id for spiffe_id, _ in usage}
    return sorted(found)


def reachable(config: Config, spiffe_id: str) -> list[tuple[ServiceConfig, Any]]:
    return [
        (s, rule) for s in config.services for rule in s.rules if rule_matches(rule.id, spiffe_id)
    ]


def inventory(
    config: Config,
    usage: Mapping[tuple[str, str], Use],
    *,
    now: datetime,
    leases: Mapping[str, Mapping[str, list[str]]] | None = None,
    secret_ages: Mapping[str, float] | None = None,
    stale_days: int = DEFAULT_STALE_DAYS,
) -> dict[str, Any]:
    """Every known identity with its owner, what it may reach and through which credential,
    its use, and a stale flag."""
    leases = leases or {}
    secret_ages = secret_ages or {}
    out: list[dict[str, Any]] = []
    for spiffe_id in known_identities(config, usage):
        info = describe_identity(config, spiffe_id)
        services = []
        last_use: datetime | None = None
        for svc, rule in reachable(config, spiffe_id):
            use = usage.get((spiffe_id, svc.name))
            if use is not None:
                last_use = max(last_use or use.last, use.last)
            creds = svc.credentials
            credential: dict[str, Any] = {"ref": creds.describe()}
            if creds.provider == "vault-database":
                held = list(leases.get(svc.name, {}).get(spiffe_id, []))
                credential.update(kind="dynamic", ttl=creds.ttl, live_leases=held)
            elif creds.oauth2 is not None:
                # An access token fetched with a client secret held elsewhere.
                credential.update(kind="token", client=creds.oauth2.client.describe())
            else:
                credential["kind"] = "static"
                if svc.name in secret_ages:
                    credential["version_age_days"] = round(secret_ages[svc.name], 1)
            services.append({
                "service": svc.name, "rule": rule.id,
                "owner": rule.owner or svc.owner, "conditional": rule.conditional,
                "credential": credential,
                "first_use": use.first.isoformat() if use else None,
                "last_use": use.last.isoformat() if use else None,
                "calls_24h": use.calls_24h if use else 0,
            })  # fmt: skip
        stale = bool(services) and (last_use is None or now - last_use > timedelta(days=stale_days))
        out.append({
            "id": spiffe_id,
            "owner": info.owner if info else None,
            "purpose": info.purpose if info else None,
            "labels": dict(info.labels) if info else {},
            "expires": info.expires.isoformat() if info and info.expires else None,
            "expired": bool(info and info.expires and info.expires < now.date()),
            "services": services,
            "stale": stale,
            "last_use": last_use.isoformat() if last_use else None,
        })  # fmt: skip
    return {"trust_domain": config.identity.trust_domain, "identities": out,
            "stale_days": stale_days}  # fmt: skip


def posture(
    config: Config,
    usage: Mapping[tuple[str, str], Use],
    *,
    now: datetime,
    secret_ages: Mapping[str, float] | None = None,
    stale_days: int = DEFAULT_STALE_DAYS,
    secret_max_days: int = DEFAULT_SECRET_MAX_DAYS,
    max_hosts: int = DEFAULT_MAX_HOSTS,
    have_usage: bool = True,
) -> list[Finding]:
    findings: list[Finding] = []
    secret_ages = secret_ages or {}
    inv = inventory(config, usage, now=now, secret_ages=secret_ages, stale_days=stale_days)
    for ident in inv["identities"]:
        if ident["expired"]:
            why = f"allowed past its expires date {ident['expires']}"
            findings.append(Finding("NHI-01", "Improper offboarding", "high", ident["id"], why))
        elif have_usage and ident["stale"] and ident["services"]:
            seen = f"last seen {ident['last_use']}" if ident["last_use"] else "never seen"
            reach = ", ".join(s["service"] for s in ident["services"])
            why = f"allowed on {reach} but {seen} (over {stale_days} days)"
            findings.append(Finding("NHI-01", "Improper offboarding", "medium", ident["id"], why))
    for svc in config.services:
        for rule in svc.rules:
            if _spans_namespaces(rule.id, config.identity.trust_domain):
                findings.append(Finding("NHI-05", "Overprivileged NHI", "high",
                                        f"{svc.name}: {rule.id}",
                                        "a wildcard rule across namespaces lets every "
                                        "workload under it in"))  # fmt: skip
        creds = svc.credentials
        if creds.oauth2 is not None:
            creds = creds.oauth2.client  # the token is short-lived; its client secret is not
        if creds.provider in ("env", "file"):
            findings.append(Finding("NHI-07", "Long-lived secrets", "medium", svc.name,
                                    f"a static {creds.provider} credential "
                                    f"({creds.describe()}) never rotates by itself"))  # fmt: skip
        elif creds.provider == "vault-kv" and secret_ages.get(svc.name, 0) > secret_max_days:
            findings.append(Finding("NHI-07", "Long-lived secrets", "high", svc.name,
                                    f"{creds.describe()} current version is "
                                    f"{secret_ages[svc.name]:.0f} days old "
                                    f"(over {secret_max_days})"))  # fmt: skip
    by_identity: dict[str, tuple[set[str], set[str]]] = {}
    owners = {s.name: s.owner for s in config.services}
    for (spiffe_id, service), use in usage.items():
        hosts, svc_owners = by_identity.setdefault(spiffe_id, (set(), set()))
        hosts |= use.hosts
        if owners.get(service):
            svc_owners.add(str(owners[service]))
    for spiffe_id, (hosts, svc_owners) in sorted(by_identity.items()):
        if len(hosts) > max_hosts:
            findings.append(Finding("NHI-09", "NHI reuse", "medium", spiffe_id,
                                    f"seen from {len(hosts)} source hosts (over {max_hosts}): "
                                    "one identity shared by many workloads?"))  # fmt: skip
        if len(svc_owners) > 1:
            findings.append(Finding("NHI-09", "NHI reuse", "low", spiffe_id,
                                    f"reaches services of {len(svc_owners)} owners: "
                                    f"{', '.join(sorted(svc_owners))}"))  # fmt: skip
    return findings


def _spans_namespaces(pattern: str, trust_domain: str) -> bool:
    if not pattern.endswith("*"):
        return False
    path = pattern.removeprefix(f"spiffe://{trust_domain}").rstrip("*").strip("/")
    segments = [p for p in path.split("/") if p]
    return len(segments) < MIN_WILDCARD_SEGMENTS


def unowned_rules(config: Config) -> list[str]:
    """`sidekey check`'s warnings: allow rules with no owner (on the rule or its service)."""
    return [
        f"{svc.where}.allow: rule {rule.id} has no owner (set owner on the rule or the service)"
        for svc in config.services
        for rule in svc.rules
        if not (rule.owner or svc.owner)
    ]


def local_warnings(config: Config) -> list[str]:
    """`sidekey check`'s warnings about `client_auth: local` services whose one
    `local_identity` reaches further than one application: over loopback TCP (every local
    process may connect), or on a socket whose mode lets any user connect."""
    warnings = []
    for svc in config.services:
        if svc.client_auth != "local" or svc.local_identity is None:
            continue
        if svc.listen.path is None:
            warnings.append(
                f"{svc.where}.local_identity: every process on the host that can reach "
                f"{svc.listen} is {svc.local_identity}; prefer a unix socket with local: "
                "rules (by uid, gid, exe or pod)"
            )
        elif svc.socket_mode & 0o007:
            warnings.append(
                f"{svc.where}.socket_mode: {svc.socket_mode:04o} lets any user connect, and "
                f"every caller is {svc.local_identity}; use local: rules, or a mode without "
                "access for others"
            )
    return warnings


def today(now: datetime) -> date:
    return now.date()
