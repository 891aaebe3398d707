"""The broker's own disk full under its audit file (issue 19, "Faults"): a real filesystem
that runs out of space, a 64 KiB tmpfs mounted for the test.

- `audit.required: false` (the default): sessions and requests are served; every line lost
  is counted (sidekey_audit_write_failures_total) and the failure logged once, not per line;
- `audit.required: true` (a reload switches it on): nothing is served unaudited; PostgreSQL
  clients get an ErrorResponse (53000) and HTTP clients a 503, both naming the audit failure;
  no lease is taken and the upstream sees nothing;
- space freed: both serve again without a restart, and their lines are in the file;
- a line the full disk cut short is taken back out: every line stays whole and the hash chain
  verifies;
- nothing secret in a reply or a log line.

Mounting a tmpfs needs root: as another user the test is skipped, saying so.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from broker.config import load_config
from broker.governance.verify import verify
from broker.runtime import Broker
from tests.brokers import base_config, running_broker, write_config
from tests.pki import DEFAULT_CLIENT_ID, Pki, client_ssl_context
from tests.servers import VaultDatabase
from tests.test_http_adapter import SERVICE as HTTP_SERVICE
from tests.test_http_adapter import (
    Upstream,
    call,
    http_service,
    new_secret,
    upstream,  # noqa: F401  (a fixture)
)
from tests.test_postgres_adapter import SERVICE, asyncpg_connect, service

TMPFS_SIZE = "64k"
FILL_BLOCK = 4096
# Requests whose lines (~600 bytes each) fill what is left of the audit file's last page.
PAGE_LINES = 20


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs, unmounted at the end (root only)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs for the full-disk audit test needs root")
    mount = tmp_path / "auditfs"
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE}", "tmpfs", str(mount)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(directory: Path) -> Path:
    """Fill the filesystem of `directory` to the last byte; returns the filler file."""
    filler = directory / "filler"
    with filler.open("ab", buffering=0) as f:
        for size in (FILL_BLOCK, 512, 1):
            with contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * size)
    st = os.statvfs(directory)
    assert st.f_bavail == 0
    return filler


def failures(b: Broker) -> float:
    value = b.metrics.registry.get_sample_value("sidekey_audit_write_failures_total")
    return value or 0.0


async def select_user(b: Broker, pki: Pki) -> str:
    conn = await asyncpg_connect(b, pki, pki.client())
    try:
        return str(await conn.fetchval("SELECT current_user"))
    finally:
        await conn.close()


def events(audit: Path, event: str) -> list[dict[str, Any]]:
    return [e for e in map(json.loads, audit.read_text().splitlines()) if e["event"] == event]


@pytest.mark.timeout(90)
async def test_full_audit_disk_fails_closed_only_when_required(  # noqa: PLR0917
    tmp_path: Path,
    full_disk: Path,
    pki: Pki,
    vault_database: VaultDatabase,
    upstream: Upstream,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    bao, pg = vault_database.openbao, vault_database.postgres
    kv = new_secret(bao, upstream)
    audit = full_disk / "audit.jsonl"
    config = base_config(
        pki,
        services=[service(pg), http_service(upstream.url, kv.path)],
        vault=bao,
        audit=audit,
    )
    roles_before = await pg.aroles()
    ctx = client_ssl_context(pki, pki.client(DEFAULT_CLIENT_ID))
    async with running_broker(tmp_path, config, monkeypatch, bao) as b:
        url = f"https://{b.address(HTTP_SERVICE)}/orders"
        assert (await call(ctx, url)).status == 200
        filler = fill(full_disk)
        # The audit file's last page still has room for a few lines: use it up.
        for _ in range(PAGE_LINES):
            if failures(b):
                break
            assert (await call(ctx, url)).status == 200
        assert failures(b) == 1
        # Not required: served regardless, every lost line counted, the failure logged once.
        user = await select_user(b, pki)
        assert user.startswith("v-")
        assert (await call(ctx, url)).status == 200
        assert failures(b) >= 4  # then session_start, session_end and request
        logged = [r for r in caplog.records if "audit write failed" in r.getMessage()]
        assert len(logged) == 1 and logged[0].levelno == logging.ERROR
        assert "audit.required is false" in logged[0].getMessage()

        # Required (switched on by a reload): nothing is served while the disk is full.
        config["audit"]["required"] = True
        result = await b.reload(load_config(write_config(tmp_path, config)))
        assert result, result
        seen = len(upstream.seen)
        with pytest.raises(asyncpg.PostgresError) as raised:
            await select_user(b, pki)
        assert raised.value.sqlstate == "53000"
        message = str(raised.value)
        assert "audit" in message and "no space left" in message, message
        reply = await call(ctx, url)
        assert reply.status == 503
        assert b"audit" in reply.body and b"no space left" in reply.body, reply.body
        assert len(upstream.seen) == seen  # the upstream saw nothing
        refused = b.metrics.registry.get_sample_value(
            "sidekey_sessions_total", {"service": SERVICE, "outcome": "audit_unavailable"}
        )
        assert refused == 1.0

        # Space again: both serve without a restart, and their lines are written.
        filler.unlink()
        assert await select_user(b, pki) == user
        assert (await call(ctx, url)).status == 200
        assert len(upstream.seen) == seen + 1
        assert any(r.getMessage().startswith("audit writes succeed again") for r in caplog.records)
    # Every line whole (a write cut short by the full disk is taken back out), the hash chain
    # unbroken across the lines lost.
    report = verify([audit])
    assert report.ok, [str(p) for p in report.problems]
    starts = events(audit, "session_start")
    assert starts and starts[-1]["upstream_user"] == user
    assert events(audit, "request")[-1]["status"] == 200
    # Shutdown revoked the lease; the refused sessions took none.
    assert await pg.aroles() == roles_before
    logs = "\n".join(r.getMessage() for r in caplog.records)
    for secret in (bao.token, pg.passwords["vaultadmin"], kv.token):
        assert secret not in logs and secret not in message and secret.encode() not in reply.body
