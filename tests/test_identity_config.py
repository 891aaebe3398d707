"""The `identity` and `tls` sections: where each piece of the broker's identity comes from
(files, or the SPIFFE Workload API), with located errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from broker.config import Config, parse_config
from broker.errors import ConfigError

AGENT = "unix:///run/spire/agent.sock"


def config(tmp_path: Path, *, tls: bool = True, **identity: Any) -> dict[str, Any]:
    for name in ("bundle.pem", "broker.pem", "broker-key.pem", "partner.pem"):
        (tmp_path / name).write_text("x")
    raw: dict[str, Any] = {
        "version": 1,
        "identity": {"trust_domain": "example.org", **identity},
        "services": [
            {
                "name": "api",
                "adapter": "http",
                "listen": "127.0.0.1:0",
                "upstream": {"url": "http://127.0.0.1:9"},
                "credentials": {"from": "env", "fields": {"t": "T"}},
                "allow": ["spiffe://example.org/a"],
            }
        ],
    }
    if tls:
        raw["tls"] = {"cert": "broker.pem", "key": "broker-key.pem"}
    return raw


def parse(tmp_path: Path, raw: dict[str, Any], env: dict[str, str] | None = None) -> Config:
    return parse_config(raw, tmp_path / "sidekey.yaml", environ=env or {})


def test_files_alone_need_no_workload_api_even_with_the_variable_set(tmp_path: Path) -> None:
    raw = config(tmp_path, x509_bundle="bundle.pem")
    loaded = parse(tmp_path, raw, {"SPIFFE_ENDPOINT_SOCKET": AGENT})
    assert loaded.identity.workload_api is None
    assert loaded.tls is not None and loaded.tls.cert == tmp_path / "broker.pem"
    assert loaded.identity.x509_bundle == tmp_path / "bundle.pem"


def test_with_the_workload_api_tls_and_bundle_may_be_left_out(tmp_path: Path) -> None:
    loaded = parse(tmp_path, config(tmp_path, tls=False, workload_api=AGENT))
    assert loaded.identity.workload_api == AGENT
    assert loaded.tls is None and loaded.identity.x509_bundle is None
    # Each piece from where it is configured: the certificate from files, the bundle not.
    mixed = parse(tmp_path, config(tmp_path, workload_api="unix:/run/spire/agent.sock"))
    assert mixed.identity.workload_api == AGENT  # unix:/path is the same address
    assert mixed.tls is not None and mixed.identity.x509_bundle is None


def test_the_environment_variable_stands_in_for_the_key_when_something_needs_it(
    tmp_path: Path,
) -> None:
    loaded = parse(tmp_path, config(tmp_path, tls=False), {"SPIFFE_ENDPOINT_SOCKET": AGENT})
    assert loaded.identity.workload_api == AGENT
    raw = config(tmp_path, x509_bundle="bundle.pem", federation={"partner.org": "workload_api"})
    loaded = parse(tmp_path, raw, {"SPIFFE_ENDPOINT_SOCKET": AGENT})
    assert loaded.identity.workload_api == AGENT
    assert dict(loaded.identity.federation) == {"partner.org": None}
    # The key wins over the variable.
    other = "unix:///other.sock"
    raw = config(tmp_path, tls=False, workload_api=other)
    assert parse(tmp_path, raw, {"SPIFFE_ENDPOINT_SOCKET": AGENT}).identity.workload_api == other


@pytest.mark.parametrize(
    ("changes", "env", "message"),
    [
        (
            {"tls": False, "x509_bundle": "bundle.pem"},
            {},
            "tls: required: the broker's certificate and key (tls.cert, tls.key), unless "
            "identity.workload_api gives it an X.509-SVID from a SPIFFE Workload API",
        ),
        (
            {},
            {},
            "identity.x509_bundle: required: the trust bundle for client X.509-SVIDs, unless "
            "identity.workload_api gives it from a SPIFFE Workload API",
        ),
        (
            {"workload_api": "tcp://127.0.0.1:8081"},
            {},
            "identity.workload_api: must be unix:///path/to/agent.sock (the Workload API is "
            "reached over a unix socket), got 'tcp://127.0.0.1:8081'",
        ),
        (
            {"workload_api": "unix://host/agent.sock"},
            {},
            "identity.workload_api: must be unix:///absolute/path, got 'unix://host/agent.sock'",
        ),
        (
            {"tls": False},
            {"SPIFFE_ENDPOINT_SOCKET": "/run/agent.sock"},
            "SPIFFE_ENDPOINT_SOCKET (environment variable): must be unix:///path/to/agent.sock",
        ),
        (
            {"workload_api": 3},
            {},
            "identity.workload_api: must be a non-empty string, got int",
        ),
    ],
)
def test_located_errors(
    tmp_path: Path, changes: dict[str, Any], env: dict[str, str], message: str
) -> None:
    tls = changes.pop("tls", True)
    with pytest.raises(ConfigError) as raised:
        parse(tmp_path, config(tmp_path, tls=tls, **changes), env)
    assert str(raised.value).startswith(message), str(raised.value)
