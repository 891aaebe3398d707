from pathlib import Path
from types import MappingProxyType

import pytest

from broker.config import CredentialsConfig, ListenAddress, ServiceConfig
from broker.identity import WorkloadIdentity
from broker.policy import evaluate, rule_matches


def service(*allow: str) -> ServiceConfig:
    return ServiceConfig(
        name="orders-api",
        index=0,
        adapter="http",
        listen=ListenAddress("127.0.0.1", 0),
        client_auth="mtls",
        allow=allow,
        credentials=CredentialsConfig("env", "", fields=MappingProxyType({"t": "T"})),
        upstream=MappingProxyType({}),
        inject=MappingProxyType({}),
    )


def ident(spiffe_id: str) -> WorkloadIdentity:
    return WorkloadIdentity(spiffe_id, "x509-svid")


@pytest.mark.parametrize(
    ("rule", "spiffe_id", "expected"),
    [
        ("spiffe://ex.org/ns/prod/sa/orders", "spiffe://ex.org/ns/prod/sa/orders", True),
        ("spiffe://ex.org/ns/prod/sa/orders", "spiffe://ex.org/ns/prod/sa/orders2", False),
        ("spiffe://ex.org/ns/prod/sa/orders", "spiffe://ex.org/ns/prod/sa", False),
        ("spiffe://ex.org/ns/prod/*", "spiffe://ex.org/ns/prod/sa", True),
        ("spiffe://ex.org/ns/prod/*", "spiffe://ex.org/ns/prod/sa/orders", False),
        ("spiffe://ex.org/ns/prod/*", "spiffe://ex.org/ns/prod", False),
        ("spiffe://ex.org/ns/prod/*", "spiffe://ex.org/ns/prod/", False),
        ("spiffe://ex.org/ns/prod/*", "spiffe://ex.org/ns/production", False),
        ("spiffe://ex.org/ns/prod/**", "spiffe://ex.org/ns/prod/sa/orders", True),
        ("spiffe://ex.org/ns/prod/**", "spiffe://ex.org/ns/prod/sa", True),
        ("spiffe://ex.org/ns/prod/**", "spiffe://ex.org/ns/prod", False),
        ("spiffe://ex.org/ns/prod/**", "spiffe://ex.org/ns/prodx/sa", False),
        ("spiffe://ex.org/**", "spiffe://other.org/ns/prod", False),
    ],
)
def test_rule_matching(rule: str, spiffe_id: str, expected: bool) -> None:
    assert rule_matches(rule, spiffe_id) is expected


def test_deny_by_default() -> None:
    decision = evaluate(ident("spiffe://ex.org/a"), service())
    assert not decision.allow
    assert decision.rule is None
    assert "spiffe://ex.org/a" in decision.reason and "orders-api" in decision.reason


def test_no_identity_is_denied_even_with_wildcards() -> None:
    assert not evaluate(None, service("spiffe://ex.org/**")).allow


def test_allow_names_the_matching_rule() -> None:
    decision = evaluate(
        ident("spiffe://ex.org/ns/prod/sa/orders"),
        service("spiffe://ex.org/ns/dev/*", "spiffe://ex.org/ns/prod/**"),
    )
    assert decision.allow
    assert decision.rule == "spiffe://ex.org/ns/prod/**"


def test_policy_module_has_no_io(tmp_path: Path) -> None:
    # The layering contract (import-linter) also enforces this; this documents it.
    import broker.policy

    assert "asyncio" not in vars(broker.policy)
