"""The `vault` section: every auth method's keys, the address list, and located errors that
say what to fix. The one-line configs in README.md are parsed as they are written."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from broker.config import VaultConfig, load_config
from broker.credentials.vault import VaultClient
from broker.credentials.vault_auth import FileCertificate
from broker.errors import ConfigError

README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.fixture
def files(tmp_path: Path) -> Path:
    for name in ("bundle.pem", "broker.pem", "broker-key.pem", "role-id", "secret-id", "jwt"):
        (tmp_path / name).write_text("x")
    return tmp_path


def config_with(vault: dict[str, Any]) -> dict[str, Any]:
    return {
        "version": 1,
        "identity": {"trust_domain": "example.org", "x509_bundle": "bundle.pem"},
        "tls": {"cert": "broker.pem", "key": "broker-key.pem"},
        "vault": vault,
        "services": [
            {
                "name": "orders-api",
                "adapter": "http",
                "listen": "127.0.0.1:18443",
                "upstream": {"url": "https://api.example.net"},
                "credentials": {"from": "vault-kv", "path": "orders-api"},
                "inject": {"headers": {"Authorization": "Bearer {token}"}},
                "allow": ["spiffe://example.org/ns/prod/sa/orders"],
            }
        ],
    }


def load_vault(directory: Path, vault: dict[str, Any]) -> VaultConfig:
    path = directory / "sidekey.yaml"
    path.write_text(yaml.safe_dump(config_with(vault)))
    parsed = load_config(path).vault
    assert parsed is not None
    return parsed


def test_one_address_as_before(files: Path) -> None:
    cfg = load_vault(
        files, {"address": "http://127.0.0.1:8200/", "auth": {"method": "token", "token_env": "T"}}
    )
    assert cfg.address == "http://127.0.0.1:8200" and cfg.addresses == (cfg.address,)
    assert cfg.auth.method == "token" and cfg.auth.token_env == "T"
    assert cfg.namespace is None


def test_address_list_namespace_and_approle(files: Path) -> None:
    cfg = load_vault(
        files,
        {
            "address": ["https://bao-0:8200", "https://bao-1:8200"],
            "namespace": "/team-a/",
            "auth": {
                "method": "approle",
                "role_id_file": "role-id",
                "secret_id_file": "secret-id",
                "wrapped": True,
            },
        },
    )
    assert cfg.addresses == ("https://bao-0:8200", "https://bao-1:8200")
    assert cfg.address == "https://bao-0:8200"
    assert cfg.namespace == "team-a"
    assert cfg.auth.role_id_file == files / "role-id" and cfg.auth.wrapped is True
    assert cfg.auth.mount_point == "approle"


@pytest.mark.parametrize(
    ("vault", "message"),
    [
        (
            {"address": ["https://a:8200", "ftp://b"], "auth": {"method": "cert"}},
            "vault.address[1]: must start with http:// or https://",
        ),
        (
            {"address": ["https://a:8200", "https://a:8200/"], "auth": {"method": "cert"}},
            "vault.address[1]: https://a:8200 is listed twice",
        ),
        (
            {"address": "http://a:8200", "auth": {"method": "cert"}},
            "vault.auth.method: cert auth needs an https:// vault.address",
        ),
        (
            {"address": "https://a", "auth": {"method": "cert", "secret_id_file": "secret-id"}},
            "vault.auth.secret_id_file: not a setting of method cert (only of approle)",
        ),
        (
            {"address": "https://a", "auth": {"method": "jwt", "role": "r"}},
            "vault.auth: jwt auth needs token_file",
        ),
        (
            {"address": "https://a", "auth": {"method": "jwt", "token_file": "jwt"}},
            "vault.auth.role: required",
        ),
        (
            {
                "address": "https://a",
                "auth": {"method": "approle", "role_id_env": "R", "role_id_file": "role-id"},
            },
            "vault.auth: approle auth needs exactly one of role_id_file, role_id_env",
        ),
        (
            {"address": "https://a", "auth": {"method": "jwt", "role": "r", "audience": "bao"}},
            "vault.auth.audience: a JWT-SVID of the broker comes from the Workload API",
        ),
        (
            {"address": "https://a", "auth": {"method": "approle", "role_id_env": "R"}},
            "vault.auth.secret_id_file: required",
        ),
        (
            {"address": "https://a", "auth": {"method": "kubernetes", "role": "r"}},
            "the default /var/run/secrets/kubernetes.io/serviceaccount/token does not exist",
        ),
        (
            {"address": "https://a", "auth": {"method": "ldap"}},
            "vault.auth.method: must be one of token, approle, cert, jwt, kubernetes",
        ),
        (
            {"address": "https://a", "auth": {"method": "token", "token_env": "T", "mount": "/"}},
            "vault.auth.mount: must name a mount",
        ),
    ],
)
def test_errors_name_the_key(
    files: Path, vault: dict[str, Any], message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SPIFFE_ENDPOINT_SOCKET", raising=False)
    with pytest.raises(ConfigError) as err:
        load_vault(files, vault)
    assert message in str(err.value)


def readme_auth_lines() -> list[str]:
    """The `auth:` lines of README.md's vault block, commented or not."""
    text = README.read_text()
    block = next(b for b in re.findall(r"```yaml\n(.*?)```", text, re.S) if "method: cert" in b)
    return [line.strip().lstrip("#").strip() for line in block.splitlines() if "auth: {" in line]


def test_readme_lists_a_config_for_every_method() -> None:
    methods = {yaml.safe_load(line)["auth"]["method"] for line in readme_auth_lines()}
    assert methods == {"cert", "jwt", "kubernetes", "approle", "token"}


@pytest.mark.parametrize("line", readme_auth_lines())
def test_readme_auth_lines_parse_and_build(
    files: Path, line: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    auth = yaml.safe_load(line)["auth"]
    # The README's absolute paths exist on a broker's host, not here: same keys, local files.
    for key in list(auth):
        if key.endswith("_file"):
            auth[key] = str(files / "jwt")
    if auth["method"] == "kubernetes":
        auth["token_file"] = str(files / "jwt")  # the default path exists only in a pod
    monkeypatch.setenv("VAULT_TOKEN", "s.test")
    cfg = load_vault(files, {"address": ["https://bao-0:8200"], "auth": auth})
    cert = FileCertificate(files / "broker.pem", files / "broker-key.pem")
    client = VaultClient.from_config(cfg, certificate=cert)
    assert client.keeper.method.name == auth["method"]
