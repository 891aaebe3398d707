"""Config errors of `credentials: {from: oauth2}` and `inject.aws_sigv4`: located messages,
raised before anything binds or fetches."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from broker.config import parse_config
from broker.errors import ConfigError
from broker.runtime import Broker
from tests.brokers import base_config
from tests.pki import Pki
from tests.test_http_config import build, service

OAUTH = {
    "from": "oauth2",
    "token_url": "https://auth.example/oauth2/token",
    "client": {"from": "env", "fields": {"client_id": "ID", "client_secret": "SECRET"}},
}
SIGV4 = {"aws_sigv4": {"service": "s3", "region": "us-east-1"}}


def oauth(**overrides: Any) -> dict[str, Any]:
    return service(credentials={**OAUTH, **overrides},
                   inject={"headers": {"Authorization": "Bearer {access_token}"}})  # fmt: skip


def test_valid_oauth2_and_sigv4_configs_build(tmp_path: Path, pki: Pki) -> None:
    broker = build(
        tmp_path, pki,
        oauth(scope=["orders.read", "orders.write"], audience="https://api.example",
              auth_method="private_key_jwt", ttl=600),
        service(name="s3", inject=SIGV4),
    )  # fmt: skip
    creds = broker.services["api"].context.service.credentials
    assert creds.oauth2 is not None
    assert creds.oauth2.scope == ("orders.read", "orders.write")
    assert creds.ttl == 600
    assert creds.describe() == "oauth2:https://auth.example/oauth2/token"
    s3: Any = broker.services["s3"].adapter
    assert s3.settings.headers == ()
    # https to S3: bodies stream unsigned unless told otherwise.
    assert s3.settings.injector.unsigned_payload is True


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"credentials": {**OAUTH, "issuer": "https://auth.example"}},
         "services[1].credentials.token_url: set token_url, or issuer to discover it from, not b"),
        ({"credentials": {k: v for k, v in OAUTH.items() if k != "token_url"}},
         "services[1].credentials.token_url: set token_url, or issuer to discover it from, not n"),
        ({"credentials": {**OAUTH, "token_url": "http://auth.example/token"}},
         "services[1].credentials.token_url: must be https (http only to a loopback address)"),
        ({"credentials": {**OAUTH, "token_url": "https://u:p@auth.example/token"}},
         "services[1].credentials.token_url: must not carry user info"),
        ({"credentials": {**OAUTH, "client": {"from": "vault-database", "role": "x"}}},
         "services[1].credentials.client.from: must be one of vault-kv, env, file"),
        ({"credentials": {k: v for k, v in OAUTH.items() if k != "client"}},
         "services[1].credentials.client: required"),
        ({"credentials": {**OAUTH, "auth_method": "client_secret_jwt"}},
         "services[1].credentials.auth_method: must be one of client_secret_basic"),
        ({"credentials": {**OAUTH, "scope": 'orders"read'}},
         "services[1].credentials.scope: not a valid scope token"),
        ({"credentials": {**OAUTH, "timeout": 0}},
         "services[1].credentials.timeout: must be a number"),
        ({"credentials": {**OAUTH, "bogus": 1}}, "services[1].credentials.bogus: unknown key"),
        ({"inject": {"aws_sigv4": {"region": "us-east-1"}}},
         "services[1].inject.aws_sigv4.service: required"),
        ({"inject": {"aws_sigv4": {"service": "S3!", "region": "us-east-1"}}},
         "services[1].inject.aws_sigv4.service: must be an AWS name"),
        ({"inject": {"aws_sigv4": {"service": "execute-api", "region": "us-east-1",
                                   "unsigned_payload": True}}},
         "services[1].inject.aws_sigv4.unsigned_payload: only S3 accepts UNSIGNED-PAYLOAD"),
        ({"inject": {"aws_sigv4": {"service": "s3", "region": "us-east-1", "x": 1}}},
         "services[1].inject.aws_sigv4.x: unknown key"),
        ({"inject": {**SIGV4, "headers": {"X-Amz-Date": "{token}"}}},
         "services[1].inject.headers.X-Amz-Date: aws_sigv4 sets this header itself"),
    ],
)  # fmt: skip
def test_config_errors_are_located(
    tmp_path: Path, pki: Pki, overrides: dict[str, Any], message: str
) -> None:
    first = service(name="first")
    with pytest.raises(ConfigError) as info:
        build(tmp_path, pki, first, service(**overrides))
    assert str(info.value).startswith(message), str(info.value)


DOC = Path(__file__).resolve().parent.parent / "docs" / "adapters" / "http.md"


@pytest.mark.parametrize("section", ["## OAuth2 access tokens", "## AWS Signature Version 4"])
def test_documented_service_entries_parse(
    tmp_path: Path, pki: Pki, monkeypatch: pytest.MonkeyPatch, section: str
) -> None:
    """The service entries docs/adapters/http.md shows for each mode are valid as written."""
    text = DOC.read_text()
    block = text[text.index(section) :].split("```yaml\n", 1)[1].split("```", 1)[0]
    entry = yaml.safe_load(block)[0]
    config = base_config(pki, services=[entry], admin=False)
    config["vault"] = {"address": "http://127.0.0.1:8200",
                       "auth": {"method": "token", "token_env": "T"}}  # fmt: skip
    monkeypatch.setenv("T", "token-that-is-never-used")
    # Built as the broker builds it (the adapter parses upstream and inject), not started.
    broker = Broker(parse_config(config, tmp_path / "x.yaml"))
    assert list(broker.services) == [entry["name"]]
