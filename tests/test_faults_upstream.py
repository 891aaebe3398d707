"""A PostgreSQL upstream that breaks (issue 19, "Faults"), through the fault-injecting relay of
tests/faults.py between the broker and the real server:

- one that accepts and never answers (a blackhole: TCP connects, nothing comes back), during
  the TLS handshake and, without TLS, during the login;
- one that resets the connection mid-TLS, mid-login (at the server's SCRAM challenge) and
  mid-query (at the query's text).

In each case the affected client gets a clear error (an ErrorResponse naming the upstream,
or for the mid-query reset a closed connection and a `session_end` naming the reset), the
broker keeps serving other clients (another service straight to the server, and the same
service once the relay behaves), no lease or dynamic role is left after shutdown, and no
secret is in a reply, a log line or the audit trail.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from adapters.postgres import PostgresAdapter
from broker.runtime import Broker
from tests.brokers import base_config, running_broker
from tests.faults import FaultyRelay
from tests.pki import DEFAULT_CLIENT_ID, Pki, client_ssl_context
from tests.servers import VaultDatabase
from tests.test_postgres_adapter import CLIENT_TIMEOUT, SERVICE, service

DIRECT = "direct-db"
# Shortened here so a silent upstream fails the test's client quickly (defaults: 5 s connect
# and TLS, 20 s to the server's ReadyForQuery).
CONNECT_TIMEOUT = 2.0
LOGIN_TIMEOUT = 3.0
MARKER = "sidekey-fault-marker"
TLS_RECORD = b"\x16\x03"  # a TLS handshake record from the server: its ServerHello


async def connect(b: Broker, pki: Pki, name: str, spiffe_id: str = DEFAULT_CLIENT_ID) -> Any:
    host, _, port = b.address(name).rpartition(":")
    return await asyncpg.connect(
        host=host, port=int(port), user="ignored", database="appdb",
        ssl=client_ssl_context(pki, pki.client(spiffe_id)), timeout=CLIENT_TIMEOUT,
    )  # fmt: skip


async def current_user(b: Broker, pki: Pki, name: str) -> str:
    conn = await connect(b, pki, name)
    try:
        return str(await conn.fetchval("SELECT current_user"))
    finally:
        await conn.close()


# fault -> (upstream TLS, what the relay does, what the client is told)
FAULTS: dict[str, tuple[bool, str, str]] = {
    "silent_during_tls": (True, "blackhole", "sent nothing for"),
    "silent_during_login": (False, "blackhole", "sent nothing for"),
    "reset_mid_tls": (True, "reset_tls", "upstream"),
    "reset_mid_login": (False, "reset_login", "upstream"),
    "reset_mid_query": (False, "reset_query", ""),
}


@pytest.mark.timeout(90)
@pytest.mark.parametrize("fault", list(FAULTS))
async def test_broken_upstream_fails_clearly_and_others_are_served(  # noqa: PLR0917
    fault: str,
    tmp_path: Path,
    pki: Pki,
    vault_database: VaultDatabase,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    tls, action, told = FAULTS[fault]
    monkeypatch.setattr(PostgresAdapter, "login_timeout", LOGIN_TIMEOUT)
    bao, pg = vault_database.openbao, vault_database.postgres
    audit = tmp_path / "audit.jsonl"
    roles_before = await pg.aroles()
    async with FaultyRelay(pg.host, pg.port) as relay:
        _, relay_port = relay.address
        broken = service(pg, port=relay_port, tls=None if tls else {"mode": "disable"})
        broken["upstream"]["connect_timeout"] = CONNECT_TIMEOUT
        direct = service(pg, name=DIRECT)
        config = base_config(pki, services=[broken, direct], vault=bao, audit=audit, admin=False)
        async with running_broker(tmp_path, config, monkeypatch, bao) as b:
            good_user = await current_user(b, pki, DIRECT)
            message = ""
            if action == "blackhole":
                relay.trigger_connectivity_loss()
            elif action == "reset_tls":
                relay.reset_on(TLS_RECORD, towards="client")
            elif action == "reset_login":
                relay.reset_on(b"SCRAM-SHA-256", towards="client")
            if action == "reset_query":
                conn = await connect(b, pki, SERVICE)
                relay.reset_on(MARKER.encode(), towards="upstream")
                with pytest.raises((asyncpg.PostgresError, ConnectionError, OSError)) as lost:
                    await conn.fetchval(f"SELECT '{MARKER}'")
                conn.terminate()
                message = str(lost.value)
            else:
                with pytest.raises(asyncpg.PostgresError) as raised:
                    await current_user(b, pki, SERVICE)
                assert raised.value.sqlstate == "08001", raised.value
                message = str(raised.value)
                assert told in message and SERVICE in message, message
            if action.startswith("reset"):
                assert relay.tripped.is_set()  # the reset did happen where it was meant to
            # Other clients are served all along, and the same service once the relay heals.
            assert await current_user(b, pki, DIRECT) == good_user
            relay.restore()
            assert (await current_user(b, pki, SERVICE)).startswith("v-")
    ends = [
        e for e in map(json.loads, audit.read_text().splitlines()) if e["event"] == "session_end"
    ]
    faulted = [e for e in ends if e["service"] == SERVICE and e["outcome"] != "ok"]
    assert len(faulted) == 1, ends
    assert faulted[0]["outcome"] == ("error" if action == "reset_query" else "upstream_error")
    assert faulted[0].get("error"), faulted[0]
    if action == "reset_query":
        # Spliced: no protocol error can be put mid-stream; the client sees the connection
        # drop, as from a crashed server, and the audit trail names the reset.
        assert "closed" in message and "reset" in faulted[0]["error"].lower(), faulted[0]
    # Shutdown revoked both leases; the failed login left no role behind.
    assert await pg.aroles() == roles_before
    logs = caplog.text
    for secret in (bao.token, pg.passwords["vaultadmin"]):
        assert secret not in logs and secret not in message and secret not in audit.read_text()
    assert "Traceback" not in logs
