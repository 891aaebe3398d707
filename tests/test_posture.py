"""Inventory and posture (OWASP NHI Top 10), from a config and a recorded trail."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from broker.config import parse_config
from broker.governance.posture import Use, inventory, local_warnings, posture, unowned_rules
from tests.brokers import write_config

ORDERS = "spiffe://example.org/ns/prod/sa/orders"
OLD = "spiffe://example.org/ns/prod/sa/legacy"
NOW = datetime(2026, 12, 1, 12, tzinfo=UTC)


def raw(pki: Any) -> dict[str, Any]:
    def svc(name: str, allow: list[Any], owner: str | None, creds: dict[str, Any]) -> Any:
        out = {
            "name": name,
            "adapter": "http",
            "listen": "127.0.0.1:0",
            "upstream": {"url": "http://127.0.0.1:9"},
            "credentials": creds,
            "inject": {"headers": {"Authorization": "Bearer {token}"}},
            "allow": allow,
        }
        return {**out, "owner": owner} if owner else out  # fmt: skip

    env = {"from": "env", "fields": {"token": "T"}}
    return {
        "version": 1,
        "identity": {"trust_domain": pki.trust_domain, "x509_bundle": str(pki.bundle)},
        "tls": {"cert": str(pki.server.cert), "key": str(pki.server.key)},
        "identities": [
            {"id": ORDERS, "owner": "team-orders@example.org", "purpose": "orders"},
            {"id": OLD, "owner": "nobody@example.org", "expires": "2026-06-30"},
        ],
        "services": [
            svc("orders-api", [ORDERS, OLD], "team-orders@example.org", env),
            svc("billing-api", [ORDERS], "team-billing@example.org", env),
            svc("wide-api", ["spiffe://example.org/ns/**"], None, env),
        ],
    }


def test_inventory_posture_and_owner_warnings(tmp_path: Path, pki: Any) -> None:
    config = parse_config(raw(pki), tmp_path / "x.yaml")
    hosts = frozenset(f"10.0.0.{i}" for i in range(30))
    usage = {(ORDERS, "orders-api"): Use(NOW - timedelta(days=2), NOW - timedelta(hours=1), 42,
                                         hosts),
             (ORDERS, "billing-api"): Use(NOW - timedelta(days=2), NOW, 5)}  # fmt: skip
    inv = {i["id"]: i for i in inventory(config, usage, now=NOW)["identities"]}
    assert inv[ORDERS]["owner"] == "team-orders@example.org" and not inv[ORDERS]["stale"]
    orders_api = next(s for s in inv[ORDERS]["services"] if s["service"] == "orders-api")
    assert orders_api["calls_24h"] == 42 and orders_api["credential"]["kind"] == "static"
    assert inv[OLD]["expired"] and inv[OLD]["stale"]
    found = {(f.id, f.severity, f.subject) for f in posture(config, usage, now=NOW)}
    assert ("NHI-01", "high", OLD) in found  # past its expires date
    assert ("NHI-05", "high", "wide-api: spiffe://example.org/ns/**") in found
    assert ("NHI-07", "medium", "orders-api") in found  # env credentials never rotate
    assert ("NHI-09", "medium", ORDERS) in found  # 30 source hosts
    assert ("NHI-09", "low", ORDERS) in found  # services of two owners
    assert unowned_rules(config) == [
        "services[2].allow: rule spiffe://example.org/ns/** has no owner (set owner on the "
        "rule or the service)"
    ]


def test_check_warns_when_one_local_identity_reaches_any_process(tmp_path: Path, pki: Any) -> None:
    config = raw(pki)
    base = config["services"][0]
    config["services"] = [
        {**base, "name": "tcp", "client_auth": "local", "local_identity": ORDERS},
        {**base, "name": "open", "listen": "unix:open.sock", "socket_mode": "0666",
         "client_auth": "local", "local_identity": ORDERS},
        {**base, "name": "group", "listen": "unix:group.sock", "client_auth": "local",
         "local_identity": ORDERS},
        {**base, "name": "attested", "listen": "unix:a.sock", "socket_mode": "0666",
         "client_auth": "local", "local": [{"uid": 1000, "id": ORDERS}]},
    ]  # fmt: skip
    warnings = local_warnings(parse_config(config, tmp_path / "x.yaml"))
    assert len(warnings) == 2
    assert warnings[0].startswith("services[0].local_identity: every process on the host")
    assert warnings[1].startswith("services[1].socket_mode: 0666 lets any user connect")
    path = write_config(tmp_path, config)
    done = subprocess.run([sys.executable, "-m", "broker", "check", "--config", str(path)],
                          capture_output=True, text=True, check=False)  # fmt: skip
    assert done.returncode == 0 and "warning: services[1].socket_mode: 0666" in done.stderr


def test_posture_command_gates_on_severity(tmp_path: Path, pki: Any) -> None:
    path = write_config(tmp_path, raw(pki))

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "broker", *args, "--config", str(path)],
                              capture_output=True, text=True, check=False)  # fmt: skip

    high = run("posture", "--json")
    assert high.returncode == 1, high.stderr
    ids = {f["id"] for f in json.loads(high.stdout)["findings"]}
    assert {"NHI-01", "NHI-05", "NHI-07"} <= ids
    check = run("check")
    assert check.returncode == 0 and "warning: services[2].allow: rule" in check.stderr
    inv = run("inventory", "--json")
    assert inv.returncode == 0
    assert {i["id"] for i in json.loads(inv.stdout)["identities"]} == {ORDERS, OLD}


def test_oauth2_token_inventoried_as_token_and_its_client_secret_judged(
    tmp_path: Path, pki: Any
) -> None:
    data = raw(pki)
    client = {"from": "env", "fields": {"client_id": "ID", "client_secret": "S"}}
    oauth = {"from": "oauth2", "token_url": "https://auth.example/token", "client": client}
    data["services"][1]["credentials"] = oauth
    config = parse_config(data, tmp_path / "x.yaml")
    inv = {i["id"]: i for i in inventory(config, {}, now=NOW)["identities"]}
    billing = next(s for s in inv[ORDERS]["services"] if s["service"] == "billing-api")
    assert billing["credential"] == {"ref": "oauth2:https://auth.example/token", "kind": "token",
                                     "client": "env:client_id,client_secret"}  # fmt: skip
    # The token is short-lived, but the client secret behind it sits in the environment.
    found = {(f.id, f.severity, f.subject) for f in posture(config, {}, now=NOW)}
    assert ("NHI-07", "medium", "billing-api") in found
