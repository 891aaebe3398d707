"""Config parsing: typed results and located, actionable errors."""

from pathlib import Path
from typing import Any

import pytest
import yaml

from broker.config import load_config
from broker.errors import ConfigError


@pytest.fixture
def files(tmp_path: Path) -> Path:
    for name in ("bundle.pem", "broker.pem", "broker-key.pem", "secret.yaml"):
        (tmp_path / name).write_text("x")
    return tmp_path


def minimal(**overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "version": 1,
        "identity": {"trust_domain": "example.org", "x509_bundle": "bundle.pem"},
        "tls": {"cert": "broker.pem", "key": "broker-key.pem"},
        "vault": {
            "address": "http://127.0.0.1:8200",
            "auth": {"method": "token", "token_env": "VAULT_TOKEN"},
        },
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
    config.update(overrides)
    return config


def load(directory: Path, config: dict[str, Any]) -> Any:
    path = directory / "sidekey.yaml"
    path.write_text(yaml.safe_dump(config))
    return load_config(path)


def test_minimal_config_parses_into_typed_objects(files: Path) -> None:
    config = load(files, minimal())
    assert config.identity.trust_domain == "example.org"
    assert config.identity.x509_bundle == files / "bundle.pem"  # relative to the config file
    (service,) = config.services
    assert service.name == "orders-api"
    assert service.client_auth == "mtls"  # the default
    assert service.listen.host == "127.0.0.1" and service.listen.port == 18443
    assert service.credentials.provider == "vault-kv"
    assert service.credentials.mount == "secret"
    assert service.credentials.describe() == "vault-kv:secret/orders-api"
    assert service.upstream["url"] == "https://api.example.net"
    with pytest.raises(TypeError):
        service.upstream["url"] = "http://evil"  # type: ignore[index]


def service_with(**changes: Any) -> dict[str, Any]:
    config = minimal()
    config["services"][0].update(changes)
    return config


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (minimal(version=2), "version: must be 1"),
        (minimal(extra=1), "extra: unknown key"),
        (
            minimal(identity={"trust_domain": "Example Org!", "x509_bundle": "bundle.pem"}),
            "identity.trust_domain: not a valid trust domain",
        ),
        (
            minimal(identity={"trust_domain": "example.org", "x509_bundle": "missing.pem"}),
            "identity.x509_bundle: file not found",
        ),
        (minimal(tls={"cert": "broker.pem"}), "tls.key: required"),
        (minimal(services=[]), "services: must be a non-empty list"),
        (service_with(listen="127.0.0.1:99999"), "services[0].listen: must be HOST:PORT"),
        (service_with(listen="db.example:5432"), "services[0].listen: host must be an IP"),
        (service_with(client_auth="password"), "services[0].client_auth: must be one of"),
        (service_with(client_auth="local"), "services[0].local_identity: required"),
        (
            service_with(allow=["spiffe://other.org/x"]),
            "services[0].allow[0]: 'spiffe://other.org/x' is outside",
        ),
        (
            service_with(allow=["spiffe://example.org/*/orders"]),
            "services[0].allow[0]: '*' is only",
        ),
        (service_with(allow=["orders"]), "services[0].allow[0]: not a valid SPIFFE ID"),
        (service_with(credentials={"from": "vault-kv"}), "services[0].credentials.path: required"),
        (service_with(credentials={"from": "aws"}), "services[0].credentials.from: must be one of"),
        (
            service_with(credentials={"from": "vault-kv", "path": "x", "ttl": 0}),
            "services[0].credentials.ttl: must be a number",
        ),
        (
            service_with(credentials={"from": "vault-kv", "path": "x", "pth": "y"}),
            "services[0].credentials.pth: unknown key",
        ),
        (service_with(timeout=3), "services[0].timeout: unknown key"),
        (
            minimal(
                vault={"address": "127.0.0.1:8200", "auth": {"method": "token", "token_env": "T"}}
            ),
            "vault.address: must start with http:// or https://",
        ),
        (
            minimal(vault={"address": "http://x", "auth": {"method": "token"}}),
            "vault.auth: token auth needs exactly one of token_env, token_file",
        ),
        (minimal(audit={"refusal_lines_per_minute": -1}), "audit.refusal_lines_per_minute"),
    ],
)
def test_errors_name_the_key(files: Path, config: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load(files, config)
    assert message in str(err.value)


def test_refusal_lines_default_to_60_a_minute_and_0_turns_the_cap_off(files: Path) -> None:
    assert load(files, minimal()).audit.refusal_lines_per_minute == 60
    config = load(files, minimal(audit={"refusal_lines_per_minute": 0}))
    assert config.audit.refusal_lines_per_minute == 0


def test_vault_providers_need_a_vault_section(files: Path) -> None:
    config = minimal()
    del config["vault"]
    with pytest.raises(ConfigError, match=r"services\[0\].credentials.from: vault-kv needs"):
        load(files, config)


def test_duplicate_names_and_listeners(files: Path) -> None:
    config = minimal()
    config["services"].append(dict(config["services"][0], listen="127.0.0.1:18444"))
    with pytest.raises(ConfigError, match=r"services\[1\].name: 'orders-api' already used"):
        load(files, config)
    config["services"][1]["name"] = "other"
    config["services"][1]["listen"] = "127.0.0.1:18443"
    with pytest.raises(ConfigError, match=r"services\[1\].listen: 127.0.0.1:18443 already used"):
        load(files, config)


def test_unix_listen_and_local_identity(files: Path) -> None:
    config = service_with(
        listen="unix:run/pg.sock",
        client_auth="local",
        local_identity="spiffe://example.org/ns/prod/sa/orders",
    )
    (service,) = load(files, config).services
    assert service.listen.path == files / "run" / "pg.sock"
    assert str(service.listen) == f"unix:{files / 'run' / 'pg.sock'}"
    assert service.local_identity == "spiffe://example.org/ns/prod/sa/orders"


def test_not_yaml_and_not_a_mapping(files: Path) -> None:
    path = files / "bad.yaml"
    path.write_text("services: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)
    path.write_text("- a list\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(path)
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(files / "absent.yaml")


LOCAL_RULES = [
    {"uid": 1000, "id": "spiffe://example.org/ns/prod/sa/orders"},
    {"gid": 2000, "exe": "/usr/local/bin/report", "id": "spiffe://example.org/ns/prod/sa/report"},
    {"pod_uid": "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0", "id": "spiffe://example.org/ns/k/sa/p"},
    {"cgroup": "/kubepods/*", "id": "spiffe://example.org/ns/k/sa/any"},
]


def test_local_rules_and_socket_mode(files: Path) -> None:
    config = service_with(
        listen="unix:run/pg.sock", client_auth="local", local=LOCAL_RULES, socket_mode="0600"
    )
    (service,) = load(files, config).services
    assert service.local_identity is None
    assert [r.id for r in service.local] == [r["id"] for r in LOCAL_RULES]
    orders, report, pod, anyone = service.local
    assert (orders.uid, orders.gid, orders.needs_process) == (1000, None, False)
    assert (report.gid, report.exe, report.needs_process) == (2000, "/usr/local/bin/report", True)
    assert pod.pod_uid == LOCAL_RULES[2]["pod_uid"] and anyone.cgroup == "/kubepods/*"
    assert report.where == "services[0].local[1]"
    assert service.socket_mode == 0o600
    assert service.tls_resumption is True  # the default


LOCAL = {"listen": "unix:run/pg.sock", "client_auth": "local"}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {**LOCAL, "local": LOCAL_RULES, "local_identity": LOCAL_RULES[0]["id"]},
            "services[0].local_identity: not together with services[0].local",
        ),
        ({**LOCAL, "local": []}, "services[0].local: must be a non-empty list"),
        (
            {**LOCAL, "local": [{"id": "spiffe://example.org/a"}]},
            "services[0].local[0]: needs at least one selector",
        ),
        (
            {**LOCAL, "local": [{"uid": -1, "id": "spiffe://example.org/a"}]},
            "services[0].local[0].uid: must be an integer",
        ),
        (
            {**LOCAL, "local": [{"uid": 1, "id": "spiffe://other.org/a"}]},
            "services[0].local[0].id: 'spiffe://other.org/a' is outside",
        ),
        (
            {**LOCAL, "local": [{"exe": "bin/app", "id": "spiffe://example.org/a"}]},
            "services[0].local[0].exe: must be an absolute path",
        ),
        (
            {**LOCAL, "local": [{"user": "app", "id": "spiffe://example.org/a"}]},
            "services[0].local[0].user: unknown key",
        ),
        (
            {"client_auth": "local", "local": [{"uid": 1, "id": "spiffe://example.org/a"}]},
            "services[0].local: needs a unix listener",
        ),
        (
            {"local": [{"uid": 1, "id": "spiffe://example.org/a"}]},
            "services[0].local: only allowed with client_auth: local",
        ),
        (
            {**LOCAL, "local_identity": "spiffe://example.org/a", "socket_mode": 0o660},
            'services[0].socket_mode: must be an octal string such as "0660"',
        ),
        (
            {**LOCAL, "local_identity": "spiffe://example.org/a", "socket_mode": "0460"},
            "services[0].socket_mode: the owner (the broker) must keep read and write",
        ),
        ({"socket_mode": "0660"}, "services[0].socket_mode: only for a unix listener"),
        ({"tls_resumption": "yes"}, "services[0].tls_resumption: must be"),
    ],
)
def test_local_errors_name_the_key(files: Path, overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load(files, service_with(**overrides))
    assert message in str(err.value)
