"""Policy conditions (hours, from, claims) and `explain`, as tables. Pure: no IO."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from broker.config import ServiceConfig, parse_config
from broker.errors import ConfigError
from broker.identity import WorkloadIdentity
from broker.policy import evaluate, explain, source_address

CI = "spiffe://example.org/gh/acme/shop/deploy"
ORDERS = "spiffe://example.org/ns/prod/sa/orders"


def service(*allow: Any) -> ServiceConfig:
    raw = {
        "version": 1,
        "identity": {"trust_domain": "example.org", "x509_bundle": __file__},
        "tls": {"cert": __file__, "key": __file__},
        "services": [{
            "name": "api", "adapter": "http", "listen": "127.0.0.1:0",
            "credentials": {"from": "env", "fields": {"t": "T"}}, "allow": list(allow),
        }],
    }  # fmt: skip
    return parse_config(raw, Path(__file__)).services[0]


def at(text: str) -> datetime:
    return datetime.fromisoformat(text)


WINDOW = {"id": "spiffe://example.org/gh/acme/shop/**", "hours": "Mon-Fri 08:00-18:00 Europe/Paris"}
# 2026-12-01 is a Tuesday; Paris is UTC+1 in winter, UTC+2 in summer.
HOURS_CASES = [
    ("2026-12-01T07:00:00+00:00", True),  # 08:00 Paris: the window opens
    ("2026-12-01T06:59:59+00:00", False),  # 07:59 Paris
    ("2026-12-01T16:59:00+00:00", True),  # 17:59 Paris
    ("2026-12-01T17:00:00+00:00", False),  # 18:00 Paris: the end is excluded
    ("2026-07-07T06:30:00+00:00", True),  # 08:30 Paris in summer (UTC+2)
    ("2026-07-07T16:30:00+00:00", False),  # 18:30 Paris in summer
    ("2026-12-05T10:00:00+00:00", False),  # Saturday
    ("2026-12-04T23:30:00+00:00", False),  # Saturday 00:30 in Paris, Friday in UTC
]


@pytest.mark.parametrize(("when", "allowed"), HOURS_CASES)
def test_hours(when: str, allowed: bool) -> None:
    decision = evaluate(WorkloadIdentity(CI, "x509-svid"), service(WINDOW), at=at(when))
    assert decision.allow is allowed
    if not allowed:
        assert "only when the time is within Mon-Fri 08:00-18:00 Europe/Paris" in decision.reason


OVERNIGHT = {"id": ORDERS, "hours": "Sat 22:00-06:00"}  # UTC, across midnight


@pytest.mark.parametrize(
    ("when", "allowed"),
    [
        ("2026-12-05T22:00:00+00:00", True),  # Saturday evening
        ("2026-12-06T05:59:00+00:00", True),  # Sunday morning, the same window
        ("2026-12-06T06:00:00+00:00", False),
        ("2026-12-06T22:30:00+00:00", False),  # Sunday evening: not listed
        ("2026-12-05T05:00:00+00:00", False),  # Saturday morning belongs to Friday's window
    ],
)
def test_hours_across_midnight(when: str, allowed: bool) -> None:
    identity = WorkloadIdentity(ORDERS, "x509-svid")
    assert evaluate(identity, service(OVERNIGHT), at=at(when)).allow is allowed


SOURCES = {"id": ORDERS, "from": ["10.0.0.0/8", "2001:db8::/32"]}


@pytest.mark.parametrize(
    ("peer", "allowed"),
    [
        ("10.1.2.3:5432", True),
        ("11.1.2.3:5432", False),
        ("[2001:db8::7]:443", True),
        ("[2001:db9::7]:443", False),
        ("[::ffff:10.0.0.1]:443", True),  # a v4-mapped peer is its v4 address
        ("unix:pid=1,uid=0,gid=0", False),  # no address: fail closed
        ("garbage", False),
        (None, False),
    ],
)
def test_source_ranges(peer: str | None, allowed: bool) -> None:
    decision = evaluate(WorkloadIdentity(ORDERS, "x509-svid"), service(SOURCES), source=peer)
    assert decision.allow is allowed


CLAIMS = {
    "id": "spiffe://example.org/gh/**",
    "claims": {
        "ref": "refs/heads/main",
        "repository_owner": ["acme", "acme-ops"],
        "kubernetes.io.namespace": "prod",
    },
}
GOOD = {"ref": "refs/heads/main", "repository_owner": "acme",
        "kubernetes.io": {"namespace": "prod"}}  # fmt: skip


@pytest.mark.parametrize(
    ("claims", "allowed"),
    [
        (GOOD, True),
        ({**GOOD, "repository_owner": "acme-ops"}, True),
        ({**GOOD, "ref": "refs/heads/feature"}, False),
        ({**GOOD, "repository_owner": "evil"}, False),
        ({k: v for k, v in GOOD.items() if k != "ref"}, False),
        ({**GOOD, "kubernetes.io": {"namespace": "dev"}}, False),
        ({**GOOD, "kubernetes.io.namespace": "prod", "kubernetes.io": {}}, True),  # flat name
        ({**GOOD, "repository_owner": ["x", "acme"]}, True),  # a list claim: any element
        (None, False),  # an X.509 caller has no claims
    ],
)
def test_claims(claims: dict[str, Any] | None, allowed: bool) -> None:
    identity = WorkloadIdentity(CI, "jwt-svid", token_claims=claims)
    assert evaluate(identity, service(CLAIMS)).allow is allowed


def test_all_conditions_must_hold_and_a_later_rule_may_allow() -> None:
    svc = service({"id": ORDERS, "from": ["10.0.0.0/8"], "hours": "Mon-Fri 08:00-18:00"},
                  {"id": ORDERS, "from": ["192.168.0.0/16"]})  # fmt: skip
    identity = WorkloadIdentity(ORDERS, "x509-svid")
    tuesday_noon = at("2026-12-01T12:00:00+00:00")
    saturday = at("2026-12-05T12:00:00+00:00")
    assert evaluate(identity, svc, source="10.0.0.1:1", at=tuesday_noon).allow
    assert not evaluate(identity, svc, source="10.0.0.1:1", at=saturday).allow
    assert evaluate(identity, svc, source="192.168.1.1:1", at=saturday).allow
    assert evaluate(identity, svc, denied={ORDERS}, source="192.168.1.1:1").reason.endswith(
        "is offboarded"
    )


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ({"id": ORDERS, "hours": "weekdays"}, "allow[0].hours: must look like"),
        ({"id": ORDERS, "hours": "Mon-Fri 08:00-18:00 Mars/Olympus"}, "unknown time zone"),
        ({"id": ORDERS, "hours": "Mon-Fry 08:00-18:00"}, "'mon-fry' is not a day"),
        ({"id": ORDERS, "hours": "Mon 25:00-26:00"}, "25:00 is not a time of day"),
        ({"id": ORDERS, "hours": "Mon 08:00-08:00"}, "the window is empty"),
        ({"id": ORDERS, "from": ["10.0.0.0/33"]}, "allow[0].from[0]: not an address range"),
        ({"id": ORDERS, "claims": {}}, "allow[0].claims: must be a mapping"),
        ({"id": ORDERS, "claims": {"ref": 1.5}}, "allow[0].claims.ref: a value"),
        ({"id": ORDERS, "colour": "red"}, "allow[0].colour: unknown key"),
        ({"hours": "Mon 08:00-09:00"}, "allow[0].id: required"),
        ({"id": "spiffe://other.org/x"}, "allow[0].id: 'spiffe://other.org/x' is outside"),
    ],
)
def test_condition_config_errors(rule: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        service(rule)


def test_rules_round_trip_through_json() -> None:
    svc = service(ORDERS, WINDOW, SOURCES, CLAIMS)
    from broker.config import parse_rule

    for rule in svc.rules:
        assert parse_rule(rule.to_json(), "x") == rule


@pytest.mark.parametrize(
    ("kwargs", "decision", "matched", "nearest", "why_not"),
    [
        ({"spiffe_id": ORDERS}, "allow", ORDERS, None, None),
        (
            {"spiffe_id": CI, "context_at": "2026-12-05T10:00:00+00:00"},
            "deny", None, WINDOW["id"], "the time is within Mon-Fri 08:00-18:00 Europe/Paris",
        ),
        (
            {"spiffe_id": CI, "context_at": "2026-12-01T10:00:00+00:00"},
            "allow", WINDOW["id"], None, None,
        ),
        (
            {"spiffe_id": "spiffe://example.org/ns/prod/sa/order"},
            "deny", None, ORDERS, f"the ID does not match {ORDERS}",
        ),
    ],
)  # fmt: skip
def test_explain(
    kwargs: dict[str, Any], decision: str, matched: str | None, nearest: str | None,
    why_not: str | None,
) -> None:  # fmt: skip
    from broker.policy import Context

    svc = service(ORDERS, WINDOW)
    when = kwargs.pop("context_at", None)
    result = explain(kwargs["spiffe_id"], svc, context=Context(at=at(when) if when else None))
    out = result.to_json()
    assert out["decision"] == decision
    assert (out["rule"] or {}).get("id") == matched
    assert (out.get("nearest") or {}).get("rule", {}).get("id") == nearest
    assert (out.get("nearest") or {}).get("why_not") == why_not


def test_source_address_spellings() -> None:
    assert str(source_address("127.0.0.1:5")) == "127.0.0.1"
    assert str(source_address("[::1]:5")) == "::1"
    assert str(source_address("::1")) == "::1"
    assert source_address("unix") is None
