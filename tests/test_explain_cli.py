"""`sidekey explain` as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.brokers import write_config

CI = "spiffe://example.org/gh/acme/shop/deploy"


def config(pki: Any) -> dict[str, Any]:
    return {
        "version": 1,
        "identity": {"trust_domain": pki.trust_domain, "x509_bundle": str(pki.bundle)},
        "tls": {"cert": str(pki.server.cert), "key": str(pki.server.key)},
        "services": [{
            "name": "deploy-api", "adapter": "http", "listen": "127.0.0.1:0",
            "upstream": {"url": "http://127.0.0.1:9"},
            "credentials": {"from": "env", "fields": {"token": "T"}},
            "inject": {"headers": {"Authorization": "Bearer {token}"}},
            "allow": [{"id": "spiffe://example.org/gh/acme/shop/**",
                       "claims": {"ref": "refs/heads/main"},
                       "hours": "Mon-Fri 08:00-18:00 Europe/Paris", "from": ["10.0.0.0/8"]}],
        }],
    }  # fmt: skip


def explain(path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "broker", "explain", "--config", str(path), "--identity", CI,
         "--service", "deploy-api", *args], capture_output=True, text=True, check=False,
    )  # fmt: skip


def test_explain_says_which_condition_fails(tmp_path: Path, pki: Any) -> None:
    path = write_config(tmp_path, config(pki))
    main = '{"ref": "refs/heads/main"}'
    ok = explain(path, "--at", "2026-12-01T10:00Z", "--from", "10.2.3.4", "--claims", main)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("allow: allowed by rule spiffe://example.org/gh/acme/shop/**")
    cases = [
        (["--at", "2026-12-05T10:00Z", "--from", "10.2.3.4", "--claims", main],
         "the time is within Mon-Fri 08:00-18:00 Europe/Paris"),
        (["--at", "2026-12-01T10:00Z", "--from", "192.168.1.1", "--claims", main],
         "the source address is in 10.0.0.0/8"),
        (["--at", "2026-12-01T10:00Z", "--from", "10.2.3.4", "--claims", '{"ref": "x"}'],
         "claim ref is refs/heads/main"),
    ]  # fmt: skip
    for args, why in cases:
        result = explain(path, *args, "--json")
        assert result.returncode == 1, result.stderr
        out = json.loads(result.stdout)
        assert out["decision"] == "deny" and out["nearest"]["why_not"] == why
    bad = explain(path, "--claims", "[1]")
    assert bad.returncode == 2 and "--claims: must be a JSON object" in bad.stderr
