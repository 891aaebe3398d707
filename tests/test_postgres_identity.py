"""Hostile client certificates against the PostgreSQL adapter (issue 19.4 and 19.6): every one
is refused with 28000 and an audit line, and the service goes on serving."""

from __future__ import annotations

import json
from pathlib import Path

import asyncpg
import pytest

from tests.pki import DEFAULT_CLIENT_ID, Pki
from tests.servers import VaultDatabase
from tests.test_postgres_adapter import SERVICE, World, asyncpg_connect, service


@pytest.fixture
def world(
    tmp_path: Path, pki: Pki, vault_database: VaultDatabase, monkeypatch: pytest.MonkeyPatch
) -> World:
    return World(tmp_path, pki, vault_database, monkeypatch)


HOSTILE = [
    # 19.4: a NUL in the URI SAN made the adapter raise while building its ErrorResponse.
    ("nul-san", "spiffe://example.org/ns/prod/sa/ord\x00ers", "invalid character"),
    ("newline-san", "spiffe://example.org/ns/prod\r\nsa/orders", "invalid character"),
    # 19.6: an upper-case trust domain was lower-cased and accepted as example.org.
    ("upper-td", "spiffe://EXAMPLE.ORG/ns/prod/sa/orders", "must be lower case"),
    ("upper-scheme", "SPIFFE://example.org/ns/prod/sa/orders", "must be lower case"),
]


@pytest.mark.parametrize(("name", "uri", "why"), HOSTILE, ids=[h[0] for h in HOSTILE])
async def test_hostile_uri_san_gets_28000(world: World, name: str, uri: str, why: str) -> None:
    audit = world.tmp_path / "audit.jsonl"
    hostile = world.pki.mint(name, uri_sans=[uri])
    async with world.broker(service(world.vdb.postgres), audit) as b:
        with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError) as raised:
            await asyncpg_connect(b, world.pki, hostile)
        assert raised.value.sqlstate == "28000"
        assert why in str(raised.value)
        assert "\x00" not in str(raised.value) and "\n" not in str(raised.value)
        # The service goes on: an honest client still gets in.
        conn = await asyncpg_connect(b, world.pki, world.pki.client())
        assert (await conn.fetchval("SELECT 1")) == 1
        await conn.close()
    events = [json.loads(line) for line in audit.read_text().splitlines()]
    denies = [e for e in events if e["event"] == "deny"]
    assert len(denies) == 1 and "spiffe_id" not in denies[0] and why in denies[0]["reason"]
    allowed = {e.get("spiffe_id") for e in events if e["event"] == "session_start"}
    assert allowed == {DEFAULT_CLIENT_ID}
    # Every connection's event is this service's (the broker's own events have no service).
    sessions = {"deny", "session_start", "session_end"}
    assert all(e["service"] == SERVICE for e in events if e["event"] in sessions)
