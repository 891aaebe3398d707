"""`identity.jwt` and `services[].jwt` (broker/config/jwt.py): typed results and located errors,
through `load_config` and through `sidekey check`."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from broker.cli import main
from broker.config.jwt import DEFAULT_CLOCK_SKEW
from broker.errors import ConfigError
from tests.test_config import files, load, minimal  # noqa: F401  (files is a fixture)

AGENT = "unix:///run/spire/agent.sock"
K8S = "spiffe://example.org/ns/{kubernetes.io.namespace}/sa/{kubernetes.io.serviceaccount.name}"


def with_jwt(
    issuers: list[dict[str, Any]] | None = None, jwt: dict[str, Any] | None = None, **service: Any
) -> dict[str, Any]:
    config = minimal()
    config["identity"]["workload_api"] = AGENT
    config["identity"]["jwt"] = {
        "issuers": issuers if issuers is not None else [{"name": "spire", "jwks": "workload_api"}]
    }
    svc = config["services"][0]
    svc["client_auth"] = service.pop("client_auth", "jwt")
    if jwt is not None:
        svc["jwt"] = jwt
    svc.update(service)
    return config


def test_issuers_parse_into_typed_objects(files: Path) -> None:  # noqa: F811
    (files / "jwks.json").write_text(json.dumps({"keys": []}))
    config = load(
        files,
        with_jwt(
            [
                {"name": "spire", "jwks": "workload_api"},
                {
                    "name": "mesh",
                    "jwks": "https://spire.example.org/bundle",
                    "trust_domain": "partner.org",
                },
                {"name": "k8s", "issuer": "https://kubernetes.default.svc", "spiffe_id": K8S},
                {
                    "name": "ci",
                    "issuer": "https://token.actions.githubusercontent.com",
                    "jwks": "jwks.json",
                    "algorithms": ["RS256"],
                    "refresh": 60,
                    "spiffe_id": "spiffe://ci.example.org/gh/{repository}/{ref}",
                },
            ],
            allow=[
                "spiffe://ci.example.org/gh/acme/shop/**",
                "spiffe://example.org/ns/prod/sa/orders",
            ],
        ),
    )
    jwt = config.identity.jwt
    assert jwt is not None and jwt.clock_skew == DEFAULT_CLOCK_SKEW
    spire, mesh, k8s, ci = jwt.issuers
    assert (spire.source, spire.method, spire.trust_domain) == ("workload_api", "jwt-svid", None)
    assert (mesh.source, mesh.jwks_url, mesh.trust_domain) == (
        "url",
        "https://spire.example.org/bundle",
        "partner.org",
    )
    assert (k8s.source, k8s.method, k8s.issuer) == (
        "discovery",
        "oidc",
        "https://kubernetes.default.svc",
    )
    assert k8s.spiffe_id is not None
    assert k8s.spiffe_id.claims == ("kubernetes.io.namespace", "kubernetes.io.serviceaccount.name")
    assert k8s.spiffe_id.trust_domain == "example.org"
    assert "EdDSA" in k8s.algorithms and "EdDSA" not in spire.algorithms  # JWT-SVIDs: no EdDSA
    assert (ci.source, ci.jwks_file, ci.algorithms, ci.refresh) == (
        "file",
        files / "jwks.json",
        ("RS256",),
        60.0,
    )
    assert jwt.trust_domains == {"partner.org", "example.org", "ci.example.org"}
    (service,) = config.services
    assert service.jwt is not None
    assert (service.jwt.audience, service.jwt.header) == ("orders-api", "Authorization")


def test_service_jwt_section(files: Path) -> None:  # noqa: F811
    config = load(
        files,
        with_jwt(jwt={"audience": "api://orders", "header": "X-Token"}, client_auth="mtls+jwt"),
    )
    (service,) = config.services
    assert service.client_auth == "mtls+jwt"
    assert service.jwt is not None
    assert (service.jwt.audience, service.jwt.header) == ("api://orders", "X-Token")


def issuer(**fields: Any) -> list[dict[str, Any]]:
    return [{"name": "i", **fields}]


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (with_jwt(issuer()), "identity.jwt.issuers[0].jwks: required without an issuer"),
        (with_jwt(issuer(jwks="missing.json")), "identity.jwt.issuers[0].jwks: file not found"),
        (with_jwt(issuer(jwks="http://keys.example.org/jwks")), "issuers[0].jwks: must be https"),
        (with_jwt(issuer(issuer="http://10.0.0.1/oidc")), "issuers[0].issuer: must be https"),
        (with_jwt(issuer(issuer="ftp://x")), "issuers[0].issuer: must be an issuer"),
        (with_jwt(issuer(issuer="https://u:p@x")), "must not carry user info"),
        (
            with_jwt(issuer(jwks="workload_api", spiffe_id="spiffe://example.org/{sub}")),
            "issuers[0].issuer: required with spiffe_id",
        ),
        (
            with_jwt(
                issuer(
                    jwks="workload_api", issuer="https://x", spiffe_id="spiffe://example.org/{sub}"
                )
            ),
            "issuers[0].spiffe_id: tokens verified by the Workload API",
        ),
        (
            with_jwt(issuer(issuer="https://x", spiffe_id="spiffe://example.org/fixed")),
            "issuers[0].spiffe_id: names no claim",
        ),
        (
            with_jwt(issuer(issuer="https://x", spiffe_id="spiffe://{tenant}.org/{sub}")),
            "must start with spiffe://<trust domain>/ before any placeholder",
        ),
        (
            with_jwt(issuer(issuer="https://x", spiffe_id="spiffe://example.org/{sub")),
            "unbalanced brace",
        ),
        (
            with_jwt(issuer(issuer="https://x", spiffe_id="spiffe://example.org/{a b}")),
            "{a b} is not a claim name",
        ),
        (
            with_jwt(issuer(issuer="https://x", spiffe_id="spiffe://example.org/a b/{sub}")),
            "does not make a valid SPIFFE ID",
        ),
        (
            with_jwt(
                issuer(
                    issuer="https://x", spiffe_id="spiffe://example.org/{sub}", algorithms=["HS256"]
                )
            ),
            "issuers[0].algorithms[0]: 'HS256' is not accepted",
        ),
        (with_jwt(issuer(jwks="workload_api", algorithms=["none"])), "'none' is not accepted"),
        (with_jwt(issuer(jwks="workload_api", algorithms=["EdDSA"])), "'EdDSA' is not accepted"),
        (
            with_jwt(issuer(jwks="workload_api", trust_domain="example.org")),
            "issuers[0].trust_domain: only for JWT-SVIDs with keys from a URL",
        ),
        (with_jwt(issuer(jwks="workload_api", ca="bundle.pem")), "issuers[0].ca: only used"),
        (with_jwt(issuer(jwks="workload_api", refresh=1)), "issuers[0].refresh: must be a number"),
        (with_jwt(issuer(jwks="workload_api", extra=1)), "issuers[0].extra: unknown key"),
        (
            with_jwt(
                [
                    {"name": "a", "jwks": "workload_api"},
                    {"name": "a", "issuer": "https://x", "spiffe_id": "spiffe://example.org/{sub}"},
                ]
            ),
            "issuers[1].name: 'a' already used by identity.jwt.issuers[0]",
        ),
        (
            with_jwt(
                [{"name": "a", "jwks": "workload_api"}, {"name": "b", "jwks": "workload_api"}]
            ),
            "issuers[1].jwks: the Workload API is already used",
        ),
        (
            with_jwt(
                [{"name": "a", "jwks": "https://a/keys"}, {"name": "b", "jwks": "https://b/keys"}]
            ),
            "issuers[1].trust_domain: JWT-SVIDs of 'example.org' are already verified",
        ),
        (
            with_jwt(
                [
                    {"name": "a", "issuer": "https://x", "spiffe_id": "spiffe://example.org/{sub}"},
                    {"name": "b", "issuer": "https://x", "spiffe_id": "spiffe://example.org/{sub}"},
                ]
            ),
            "issuers[1].issuer: 'https://x' already used",
        ),
        (
            with_jwt(jwt={"header": "Content-Length"}),
            "services[0].jwt.header: must be an HTTP header",
        ),
        (with_jwt(jwt={"header": "X Token"}), "services[0].jwt.header: must be an HTTP header"),
        (with_jwt(jwt={"audience": ""}), "services[0].jwt.audience: must be a non-empty string"),
        (with_jwt(jwt={"aud": "x"}), "services[0].jwt.aud: unknown key"),
        (
            with_jwt(jwt={"audience": "x"}, client_auth="mtls"),
            "services[0].jwt: only used with client_auth",
        ),
        (
            with_jwt(issuer(jwks="workload_api"), allow=["spiffe://other.org/x"]),
            "services[0].allow[0]: 'spiffe://other.org/x' is outside trust domain",
        ),
        (with_jwt(issuer(jwks="workload_api"), client_auth="mTLS"), "client_auth: must be one of"),
    ],
)
def test_located_errors(files: Path, config: dict[str, Any], message: str) -> None:  # noqa: F811
    with pytest.raises(ConfigError) as info:
        load(files, config)
    assert message in str(info.value)


def test_workload_api_keys_need_the_workload_api(files: Path) -> None:  # noqa: F811
    config = with_jwt()
    del config["identity"]["workload_api"]
    with pytest.raises(ConfigError, match=r"issuers\[0\].jwks: workload_api needs identity"):
        load(files, config)


def test_a_token_service_needs_issuers(files: Path) -> None:  # noqa: F811
    config = minimal()
    config["services"][0]["client_auth"] = "jwt"
    with pytest.raises(ConfigError, match=r"services\[0\].client_auth: jwt needs identity.jwt"):
        load(files, config)


def test_an_issuers_trust_domain_is_not_allowed_to_mtls_services(files: Path) -> None:  # noqa: F811
    config = with_jwt(
        issuer(issuer="https://ci", spiffe_id="spiffe://ci.example.org/{repository}"),
        client_auth="mtls",
        allow=["spiffe://ci.example.org/acme"],
    )
    with pytest.raises(ConfigError, match="outside trust domain"):
        load(files, config)


def test_sidekey_check_reports_a_bad_jwks_file(
    files: Path,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
    pki: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("VAULT_TOKEN", "t")
    config = copy.deepcopy(with_jwt(issuer(jwks="jwks.json")))
    config["identity"]["x509_bundle"] = str(pki.bundle)
    config["tls"] = {"cert": str(pki.server.cert), "key": str(pki.server.key)}
    config["services"][0]["upstream"] = {"url": "http://127.0.0.1:9"}
    (files / "jwks.json").write_text('{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}')
    path = files / "sidekey.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["check", "--config", str(path)]) != 0
    err = capsys.readouterr().err
    assert "identity.jwt.issuers[0].jwks" in err and "not an asymmetric signing key" in err
    (files / "jwks.json").write_text(json.dumps({"keys": []}))
    assert main(["check", "--config", str(path)]) == 0
