"""The `sidekey` command as a user runs it: a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from broker import __version__
from tests.brokers import write_config

SIDEKEY = [sys.executable, "-m", "broker"]


def sidekey(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*SIDEKEY, *args], capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, **(env or {})},
    )  # fmt: skip


def http_service(**changes: Any) -> dict[str, Any]:
    service: dict[str, Any] = {
        "name": "orders-api",
        "adapter": "http",
        "listen": "127.0.0.1:0",
        "upstream": {"url": "http://127.0.0.1:9"},
        "credentials": {"from": "env", "fields": {"token": "ORDERS_TOKEN"}},
        "inject": {"headers": {"Authorization": "Bearer {token}"}},
        "allow": ["spiffe://example.org/ns/prod/sa/orders"],
    }
    service.update(changes)
    return service


def config_for(pki: Any, *services: dict[str, Any]) -> dict[str, Any]:
    return {
        "version": 1,
        "identity": {"trust_domain": pki.trust_domain, "x509_bundle": str(pki.bundle)},
        "tls": {"cert": str(pki.server.cert), "key": str(pki.server.key)},
        "services": list(services),
    }


def test_version() -> None:
    result = sidekey("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"sidekey {__version__}"


def test_a_python_warning_is_a_json_log_line_and_spiffes_dsa_deprecation_none() -> None:
    """The broker's log is one JSON object per line: a library's warning goes through the
    logging set-up, not bare onto stderr. cryptography 51 deprecates DSA and warned at every
    import of py-spiffe (which names the DSA key class), the first line of every start."""
    script = (
        "import warnings\n"
        "from broker.cli import setup_logging\n"
        "setup_logging('info', 'json')\n"
        "import broker.identity.workload_api, spiffe\n"
        "warnings.warn('a library warns', UserWarning)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    lines = [json.loads(line) for line in result.stderr.splitlines()]
    assert [(e["level"], e["logger"]) for e in lines] == [("warning", "py.warnings")], lines
    assert "a library warns" in lines[0]["msg"]


def test_check_accepts_a_valid_config(tmp_path: Path, pki: Any) -> None:
    path = write_config(tmp_path, config_for(pki, http_service()))
    result = sidekey("check", "--config", str(path))
    assert result.returncode == 0, result.stderr
    assert "ok (1 services)" in result.stdout
    assert not (tmp_path / "audit.jsonl").exists()


def test_check_reports_located_errors(tmp_path: Path, pki: Any) -> None:
    cases = [
        (http_service(adapter="ftp"), "services[1].adapter: unknown adapter 'ftp'"),
        (http_service(listen="nowhere"), "services[1].listen: must be HOST:PORT"),
        (http_service(credentials={"from": "env"}), "services[1].credentials.fields: required"),
    ]
    for broken, message in cases:
        path = write_config(tmp_path, config_for(pki, http_service(name="ok"), broken))
        result = sidekey("check", "--config", str(path))
        assert result.returncode == 2
        assert message in result.stderr, result.stderr


def test_check_reports_unreadable_certificates(tmp_path: Path, pki: Any) -> None:
    bad = tmp_path / "not-a-cert.pem"
    bad.write_text("this is not PEM")
    config = config_for(pki, http_service())
    config["tls"]["cert"] = str(bad)
    result = sidekey("check", "--config", str(write_config(tmp_path, config)))
    assert result.returncode == 2
    assert "tls.cert: cannot load certificate/key pair" in result.stderr


def test_check_missing_config_file(tmp_path: Path) -> None:
    result = sidekey("check", "--config", str(tmp_path / "absent.yaml"))
    assert result.returncode == 2
    assert "cannot read config" in result.stderr


def test_ca_init_and_issue(tmp_path: Path) -> None:
    ca_dir = tmp_path / "ca"
    result = sidekey("ca", "init", "--dir", str(ca_dir), "--trust-domain", "example.org")
    assert result.returncode == 0, result.stderr
    assert (ca_dir / "bundle.pem").is_file()
    result = sidekey(
        "ca", "issue", "--dir", str(ca_dir), "--spiffe-id", "spiffe://example.org/ns/a",
        "--dns", "localhost", "--ip", "127.0.0.1", "--out", str(tmp_path / "a"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "a.pem").is_file() and (tmp_path / "a-key.pem").stat().st_mode & 0o077 == 0
    again = sidekey("ca", "init", "--dir", str(ca_dir), "--trust-domain", "example.org")
    assert again.returncode == 2 and "refusing to overwrite" in again.stderr
    wrong = sidekey(
        "ca", "issue", "--dir", str(ca_dir), "--spiffe-id", "spiffe://other.org/x",
        "--out", str(tmp_path / "b"),
    )  # fmt: skip
    assert wrong.returncode == 2 and "other.org" in wrong.stderr
