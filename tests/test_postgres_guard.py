"""guard.deny_password_change (issue 19.1): the codec's PasswordChangeGuard byte by byte, and
a real session through the broker where ALTER ROLE ... PASSWORD is refused by the server."""

from __future__ import annotations

import contextlib
import struct
from pathlib import Path

import asyncpg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.codecs.postgres import (
    MAX_INSPECTED_MESSAGE,
    PasswordChangeGuard,
    ProtocolError,
    changes_password,
)
from broker.codecs.postgres._guard import REFUSAL
from tests.pki import Pki
from tests.servers import VaultDatabase
from tests.test_postgres_adapter import World, asyncpg_connect, mtls_dsn, psql, service

CHANGES = [
    "ALTER ROLE CURRENT_USER PASSWORD 'x'",
    "alter user current_user with encrypted password 'x'",
    "ALTER USER \"v-orders-123\" PASSWORD 'SCRAM-SHA-256$4096:abc'",  # what psql \password sends
    "select 1; ALTER/* comment */ROLE x PASSWORD NULL",
    "  -- a comment\n ALTER\tROLE\nx\nPASSWORD 'y'",
    "ALTER ROLE x /* nested /* comment */ still */ PASSWORD 'y'",
    "ALTER ROLE U&\"x\" PASSWORD 'y'",
]
HARMLESS = [
    "SELECT 'ALTER ROLE x PASSWORD y'",
    "SELECT $$ALTER ROLE x PASSWORD 'y'$$",
    'SELECT "password" FROM t; ALTER TABLE t ADD password text',
    "-- ALTER ROLE x PASSWORD 'y'\nSELECT 1",
    "/* ALTER ROLE x PASSWORD 'y' */ SELECT 1",
    "SELECT E'\\' ; ALTER ROLE x PASSWORD y'",
    "ALTER ROLE x SET work_mem = '1MB'",
    "SELECT $tag$ ; ALTER ROLE x PASSWORD 'y' $tag$",
]


@pytest.mark.parametrize("sql", CHANGES)
def test_password_changes_are_recognised(sql: str) -> None:
    assert changes_password(sql.encode())


@pytest.mark.parametrize("sql", HARMLESS)
def test_harmless_sql_is_not(sql: str) -> None:
    assert not changes_password(sql.encode())


def typed(kind: bytes, payload: bytes) -> bytes:
    return kind + struct.pack("!I", len(payload) + 4) + payload


def query(sql: str) -> bytes:
    return typed(b"Q", sql.encode() + b"\0")


def parse(sql: str, name: bytes = b"") -> bytes:
    return typed(b"P", name + b"\0" + sql.encode() + b"\0" + struct.pack("!H", 0))


TRAFFIC = b"".join(
    [
        query("SELECT 1"),
        parse("SELECT $1::int"),
        typed(b"B", b"\0\0\0\0\0\1\0\0\0\0\1" + b"7" + b"\0\0"),
        typed(b"E", b"\0\0\0\0\0"),
        typed(b"S", b""),
        typed(b"d", b"x" * 70000),  # CopyData, passed by length
    ]
)


def feed_split(guard: PasswordChangeGuard, data: bytes, cuts: list[int]) -> bytes:
    out = bytearray()
    last = 0
    for cut in [*sorted(cuts), len(data)]:
        forwarded, answered = guard.feed(data[last:cut])
        assert answered == b""
        out += forwarded
        last = cut
    return bytes(out)


def test_harmless_traffic_passes_byte_for_byte_whole_and_byte_by_byte() -> None:
    assert feed_split(PasswordChangeGuard(), TRAFFIC, []) == TRAFFIC
    assert feed_split(PasswordChangeGuard(), TRAFFIC, list(range(1, len(TRAFFIC)))) == TRAFFIC


def test_a_password_change_is_rewritten_into_the_servers_error() -> None:
    guard = PasswordChangeGuard()
    data = query("SELECT 1") + query(CHANGES[0]) + parse(CHANGES[1], b"s1") + query("SELECT 2")
    out = feed_split(guard, data, [3, 17, 40])
    assert guard.refused == 2
    assert out.startswith(query("SELECT 1")) and out.endswith(query("SELECT 2"))
    assert b"PASSWORD 'x'" not in out and out.count(REFUSAL.encode()) == 2
    assert b"s1\0DO $sidekey$" in out


def test_oversized_and_malformed_messages_are_protocol_errors() -> None:
    with pytest.raises(ProtocolError, match="larger than"):
        PasswordChangeGuard().feed(b"Q" + struct.pack("!I", MAX_INSPECTED_MESSAGE + 1))
    with pytest.raises(ProtocolError, match="length 3"):
        PasswordChangeGuard().feed(b"Q" + struct.pack("!I", 3))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000), st.lists(st.integers(0, 2000), max_size=8))
def test_arbitrary_bytes_only_ever_raise_protocol_error(data: bytes, cuts: list[int]) -> None:
    cuts = [c for c in cuts if c <= len(data)]
    with contextlib.suppress(ProtocolError):
        feed_split(PasswordChangeGuard(), data, cuts)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.builds(query, st.sampled_from([*HARMLESS, "SELECT 1", ""])),
            st.builds(lambda b: typed(b"d", b), st.binary(max_size=300)),
            st.builds(lambda s: parse(s, b"n"), st.sampled_from(HARMLESS)),
        ),
        max_size=10,
    ),
    st.data(),
)
def test_harmless_streams_pass_unchanged_at_any_split(
    messages: list[bytes], data: st.DataObject
) -> None:
    stream = b"".join(messages)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=6))
    assert feed_split(PasswordChangeGuard(), stream, cuts) == stream


@pytest.fixture
def world(
    tmp_path: Path, pki: Pki, vault_database: VaultDatabase, monkeypatch: pytest.MonkeyPatch
) -> World:
    return World(tmp_path, pki, vault_database, monkeypatch)


async def test_guarded_service_refuses_password_changes_simple_and_extended(world: World) -> None:
    pg = world.vdb.postgres
    audit = world.tmp_path / "audit.jsonl"
    svc = service(pg, guard={"deny_password_change": True})
    async with world.broker(svc, audit) as b:
        conn = await asyncpg_connect(b, world.pki, world.pki.client())
        user = await conn.fetchval("SELECT current_user")
        # Simple query protocol (asyncpg's execute() without arguments).
        with pytest.raises(asyncpg.InsufficientPrivilegeError) as raised:
            await conn.execute("ALTER ROLE CURRENT_USER PASSWORD 'mine-now'")
        assert "guard.deny_password_change" in str(raised.value)
        # Extended protocol (Parse/Bind/Execute), inside a transaction that then aborts as
        # after any failed statement.
        async with conn.transaction():
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.fetch("alter user current_user with encrypted password 'mine-now'")
        # The session goes on.
        assert await conn.fetchval("SELECT $1::int + 1", 41) == 42
        await conn.close()
        # psql's \password sends ALTER USER <name> PASSWORD '<SCRAM verifier>'.
        code, _, err = await psql(
            mtls_dsn(b, world.pki, world.pki.client()),
            f"ALTER USER \"{user}\" PASSWORD 'SCRAM-SHA-256$4096:c2FsdA==$x:y'",
        )
        assert code != 0 and "guard.deny_password_change" in err
        # The password is still the broker's: a new session logs in with the same lease.
        conn = await asyncpg_connect(b, world.pki, world.pki.client())
        assert await conn.fetchval("SELECT current_user") == user
        await conn.close()
    ends = [line for line in audit.read_text().splitlines() if '"session_end"' in line]
    assert '"password_changes_refused":2' in ends[0].replace(" ", "")
    assert "tampered" not in audit.read_text()


async def test_guard_config_is_checked(world: World) -> None:
    from broker.errors import ConfigError

    svc = service(world.vdb.postgres, guard={"deny_password_changes": True})
    with pytest.raises(ConfigError, match=r"services\[0\]\.guard\.deny_password_changes"):
        async with world.broker(svc):
            pass
