"""Governance keys: allow rules with conditions and owners, the `identities` section (who owns
which workload), and the `governance` section (the shared deny list).

    identities:
      - id: spiffe://example.org/ns/prod/sa/orders      # or a pattern: .../sa/*, .../**
        owner: team-orders@example.org
        purpose: order service
        labels: {env: prod}
        expires: 2027-06-30
    governance:
      deny_list: {mount: secret, path: sidekey/deny}    # KV v2, shared by every broker
      watch_interval: 2                                 # seconds between reads of it
    services:
      - allow:
          - spiffe://example.org/ns/prod/sa/orders
          - {id: "spiffe://ci.example.org/gh/acme/shop/**", claims: {ref: refs/heads/main},
             hours: "Mon-Fri 08:00-18:00 Europe/Paris", from: [10.0.0.0/8], owner: team-ci}
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date
from types import MappingProxyType
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from broker.errors import ConfigError

from .section import Section

# Read the deny list this often: an offboarding reaches every broker within about this long.
DEFAULT_WATCH_INTERVAL_SECONDS = 2.0
DEFAULT_DENY_MOUNT = "secret"
DEFAULT_DENY_PATH = "sidekey/deny"
DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_EMPTY: Mapping[str, Any] = MappingProxyType({})
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_WINDOW = re.compile(
    r"^\s*(?:(?P<days>[A-Za-z,\- ]+?)\s+)?(?P<start>\d{1,2}:\d{2})\s*-\s*(?P<end>\d{1,2}:\d{2})"
    r"(?:\s+(?P<zone>\S+))?\s*$"
)


@dataclass(frozen=True, slots=True)
class TimeWindow:
    """Days of the week and a time of day in a zone: ``Mon-Fri 08:00-18:00 Europe/Paris``.

    `start`/`end` are minutes after midnight; an end at or before the start spans midnight
    (the window belongs to the day it starts on). No zone means UTC.
    """

    text: str
    days: frozenset[int]  # 0 = Monday
    start: int
    end: int
    zone: str = "UTC"


@dataclass(frozen=True, slots=True)
class AllowRule:
    """One allow rule: a SPIFFE ID or pattern, its conditions, and who owns it."""

    id: str
    claims: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: _EMPTY)
    hours: TimeWindow | None = None
    sources: tuple[IPNetwork, ...] = ()
    owner: str | None = None
    purpose: str | None = None
    labels: Mapping[str, str] = field(default_factory=lambda: _EMPTY)

    @property
    def conditional(self) -> bool:
        return bool(self.claims or self.hours or self.sources)

    def to_json(self) -> dict[str, Any]:
        """The rule as the audit trail's `policy` event and `explain` show it (and as
        `parse_rule` reads it back)."""
        out: dict[str, Any] = {"id": self.id}
        if self.claims:
            out["claims"] = {k: list(v) if len(v) > 1 else v[0] for k, v in self.claims.items()}
        if self.hours is not None:
            out["hours"] = self.hours.text
        if self.sources:
            out["from"] = [str(n) for n in self.sources]
        for key in ("owner", "purpose"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.labels:
            out["labels"] = dict(self.labels)
        return out


@dataclass(frozen=True, slots=True)
class IdentityInfo:
    """What `identities:` says about one workload (or a pattern of them)."""

    id: str
    owner: str | None = None
    purpose: str | None = None
    labels: Mapping[str, str] = field(default_factory=lambda: _EMPTY)
    expires: date | None = None
    where: str = ""


@dataclass(frozen=True, slots=True)
class DenyListConfig:
    mount: str = DEFAULT_DENY_MOUNT
    path: str = DEFAULT_DENY_PATH
    # `deny_list: false` turns it off (a broker without a vault has none either).
    enabled: bool = True


@dataclass(frozen=True, slots=True)
class GovernanceConfig:
    deny_list: DenyListConfig = DenyListConfig()
    watch_interval: float = DEFAULT_WATCH_INTERVAL_SECONDS


def parse_time_window(text: str, where: str) -> TimeWindow:
    match = _WINDOW.match(text)
    if match is None:
        raise ConfigError(
            f"{where}: must look like 'Mon-Fri 08:00-18:00 Europe/Paris' (days optional, "
            f"zone optional, UTC by default), got {text!r}"
        )
    days = _parse_days(match["days"], where) if match["days"] else frozenset(range(7))
    start, end = _minutes(match["start"], where), _minutes(match["end"], where)
    if start == end:
        raise ConfigError(f"{where}: the window is empty ({match['start']}-{match['end']})")
    zone = match["zone"] or "UTC"
    try:
        ZoneInfo(zone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f"{where}: unknown time zone {zone!r} (an IANA name)") from None
    return TimeWindow(text, days, start, end, zone)


def _parse_days(text: str, where: str) -> frozenset[int]:
    days: set[int] = set()
    for part in text.replace(" ", "").lower().split(","):
        first, _, last = part.partition("-")
        try:
            a = DAYS.index(first[:3]) if len(first) >= 3 else -1
            b = DAYS.index(last[:3]) if last else a
        except ValueError:
            a = b = -1
        if a < 0 or b < 0:
            raise ConfigError(f"{where}: {part!r} is not a day or a day range like Mon-Fri")
        i = a
        while True:
            days.add(i)
            if i == b:
                break
            i = (i + 1) % 7
    return frozenset(days)


def _minutes(hhmm: str, where: str) -> int:
    hours, minutes = (int(p) for p in hhmm.split(":"))
    if hours == 24 and minutes == 0:
        return 24 * 60
    if not (0 <= hours < 24 and 0 <= minutes < 60):
        raise ConfigError(f"{where}: {hhmm} is not a time of day")
    return hours * 60 + minutes


def _parse_claims(raw: Any, where: str) -> Mapping[str, tuple[str, ...]]:
    if not isinstance(raw, Mapping) or not raw:
        raise ConfigError(f"{where}: must be a mapping of claim names to values")
    claims: dict[str, tuple[str, ...]] = {}
    for name, value in raw.items():
        values = value if isinstance(value, list) else [value]
        if not isinstance(name, str) or not name or not values:
            raise ConfigError(f"{where}: claim names must be non-empty strings")
        if not all(isinstance(v, str | int | bool) and not isinstance(v, float) for v in values):
            raise ConfigError(f"{where}.{name}: a value or a list of values (strings)")
        claims[name] = tuple(str(v).lower() if isinstance(v, bool) else str(v) for v in values)
    return MappingProxyType(claims)


def _parse_sources(raw: Any, where: str) -> tuple[IPNetwork, ...]:
    items = [raw] if isinstance(raw, str) else raw
    if not isinstance(items, list) or not items:
        raise ConfigError(f"{where}: must be a list of address ranges like 10.0.0.0/8")
    out: list[IPNetwork] = []
    for i, item in enumerate(items):
        try:
            out.append(ipaddress.ip_network(str(item), strict=False))
        except ValueError:
            raise ConfigError(f"{where}[{i}]: not an address range: {item!r}") from None
    return tuple(out)


def parse_labels(s: Section, key: str = "labels") -> Mapping[str, str]:
    labels: Mapping[str, str] = s.string_map(key, _EMPTY)
    return labels


def parse_rule(raw: Any, where: str) -> AllowRule:
    """One entry of `allow`: a SPIFFE ID (or pattern) string, or a mapping with conditions.
    The ID's syntax and trust domain are checked by the caller."""
    if isinstance(raw, str):
        if not raw:
            raise ConfigError(f"{where}: must be a non-empty string")
        return AllowRule(raw)
    s = Section(raw, where)
    rule = AllowRule(
        id=s.text("id"),
        claims=_parse_claims(s.raw("claims"), s.at("claims")) if s.has("claims") else _EMPTY,
        hours=parse_time_window(s.text("hours"), s.at("hours")) if s.has("hours") else None,
        sources=_parse_sources(s.raw("from"), s.at("from")) if s.has("from") else (),
        owner=s.text("owner", None),
        purpose=s.text("purpose", None),
        labels=parse_labels(s),
    )
    s.finish()
    return rule


def parse_identities(top: Section) -> tuple[IdentityInfo, ...]:
    if not top.has("identities"):
        return ()
    out: list[IdentityInfo] = []
    for s in top.sections("identities"):
        expires = s.raw("expires", None)
        if isinstance(expires, str):
            try:
                expires = date.fromisoformat(expires)
            except ValueError:
                expires = False
        if expires is not None and not isinstance(expires, date):
            raise ConfigError(f"{s.at('expires')}: must be a date like 2027-06-30")
        out.append(
            IdentityInfo(
                id=s.text("id"),
                owner=s.text("owner", None),
                purpose=s.text("purpose", None),
                labels=parse_labels(s),
                expires=expires,
                where=s.where,
            )
        )
        s.finish()
    return tuple(out)


def parse_governance(top: Section) -> GovernanceConfig:
    if not top.has("governance"):
        return GovernanceConfig()
    s = top.section("governance")
    deny = DenyListConfig()
    if s.has("deny_list") and s.raw("deny_list") is False:
        deny = DenyListConfig(enabled=False)
    elif s.has("deny_list"):
        d = s.section("deny_list")
        deny = DenyListConfig(
            d.text("mount", DEFAULT_DENY_MOUNT), d.text("path", DEFAULT_DENY_PATH)
        )
        d.finish()
    config = GovernanceConfig(
        deny, s.number("watch_interval", 0.1, 3600, DEFAULT_WATCH_INTERVAL_SECONDS)
    )
    s.finish()
    return config
