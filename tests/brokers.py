"""Run a real broker in-process for a test: write the YAML config, start, stop.

Tests describe the config as a dict (exactly what a user would write in YAML, with paths
relative to the config file), so every test also exercises config parsing.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import yaml

from broker.config import load_config
from broker.runtime import Broker


def write_config(directory: Path, config: dict[str, Any], name: str = "sidekey.yaml") -> Path:
    path = directory / name
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def base_config(
    pki: Any,
    *,
    services: list[dict[str, Any]],
    vault: Any = None,
    audit: Path | None = None,
    admin: bool = True,
) -> dict[str, Any]:
    """A config using the test PKI's bundle and broker certificate (absolute paths)."""
    config: dict[str, Any] = {
        "version": 1,
        "identity": {"trust_domain": pki.trust_domain, "x509_bundle": str(pki.bundle)},
        "tls": {"cert": str(pki.server.cert), "key": str(pki.server.key)},
        "services": services,
        # One process: these tests count one broker's events and read its pid; several
        # workers (the default: one per CPU) are tests/test_workers.py's.
        "workers": 1,
    }
    if vault is not None:
        config["vault"] = {
            "address": vault.address,
            "auth": {"method": "token", "token_env": "SIDEKEY_TEST_VAULT_TOKEN"},
        }
    if admin:
        config["admin"] = {"listen": "127.0.0.1:0"}
    if audit is not None:
        config["audit"] = {"file": str(audit)}
    return config


@asynccontextmanager
async def running_broker(
    directory: Path, config: dict[str, Any], monkeypatch: Any = None, vault: Any = None
) -> AsyncIterator[Broker]:
    """Start a broker from `config`; stop it (drain, revoke leases) on exit."""
    if vault is not None and monkeypatch is not None:
        monkeypatch.setenv("SIDEKEY_TEST_VAULT_TOKEN", vault.token)
    broker = Broker(load_config(write_config(directory, config)))
    await broker.start()
    try:
        yield broker
    finally:
        await broker.stop(drain_timeout=2.0)


def audit_events(path: Path, event: str | None = None) -> list[dict[str, Any]]:
    """The audit trail at `path` (none yet: empty), only `event`'s lines when given."""
    lines = path.read_text().splitlines() if path.exists() else []
    return [e for e in map(json.loads, lines) if event is None or e.get("event") == event]
