"""adapters.mysql._filter: the command packets the broker watches in a spliced session, and
adapters.mysql._auth's password methods. Byte vectors by hand, fed whole, byte by byte and
with random splits."""

from __future__ import annotations

import hashlib
import os

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters.mysql import _auth
from adapters.mysql._filter import QUERY_INSPECT_BYTES, CommandFilter, use_target
from broker.codecs import mysql
from broker.codecs.mysql import constants as c


def command(cmd: int, body: bytes) -> bytes:
    return mysql.frame(bytes([cmd]) + body, 0)


def query(sql: bytes) -> bytes:
    return command(c.COM_QUERY, sql)


def run(data: bytes, chunks: list[int] | None = None) -> tuple[bytes, bytes, int]:
    f = CommandFilter(("appdb", "logs"), "orders-mysql")
    out, answer = bytearray(), bytearray()
    pieces, rest = [], data
    for cut in chunks or []:
        pieces.append(rest[:cut])
        rest = rest[cut:]
    pieces.append(rest)
    for piece in pieces:
        o, a = f.feed(piece)
        out += o
        answer += a
    return bytes(out), bytes(answer), f.refused


@pytest.mark.parametrize(
    ("sql", "verdict"),
    [
        (b"SELECT 1", ("other", None)),
        (b"use appdb", ("use", b"appdb")),
        (b"USE`logs`", ("use", b"logs")),
        (b'USE "x""y"', ("use", b'x"y')),
        (b"  /* hi */ -- c\n# d\nUSE mysql;", ("use", b"mysql")),
        (b"/*!40101 USE mysql*/", ("use", b"mysql")),
        (b"/*M!100101 use mysql */", ("use", b"mysql")),
        (b"USER()", ("other", None)),
        (b"used", ("other", None)),
        (b"/* never closed", ("other", None)),
    ],
)
def test_use_target(sql: bytes, verdict: tuple[str, bytes | None]) -> None:
    assert use_target(sql, True) == verdict


def test_use_target_waits_when_the_prefix_is_cut() -> None:
    assert use_target(b"/* long", False) == ("unknown", None)
    assert use_target(b"US", False) == ("unknown", None)
    assert use_target(b"USE mys", False) == ("unknown", None)


ALLOWED = [
    query(b"SELECT 1"),
    query(b"USE appdb"),
    command(c.COM_INIT_DB, b"logs"),
    command(c.COM_RESET_CONNECTION, b""),
    command(c.COM_QUIT, b""),
    # LOAD DATA LOCAL's file packets (sequence numbers above 0) are never commands.
    mysql.frame(bytes([c.COM_CHANGE_USER]) + b"file bytes", 2),
]
REFUSED = [
    query(b"use mysql"),
    query(b"/*!40101 USE otherdb */"),
    command(c.COM_INIT_DB, b"mysql"),
    command(c.COM_CHANGE_USER, b"root\0\0"),
    command(c.COM_STMT_PREPARE, b"USE mysql"),
    query(b"/*" + b"x" * QUERY_INSPECT_BYTES + b"*/ SELECT 1"),
]


@pytest.mark.parametrize("packet", ALLOWED)
def test_allowed_commands_pass_untouched(packet: bytes) -> None:
    for chunks in ([], [1] * len(packet)):
        assert run(packet, chunks) == (packet, b"", 0)


@pytest.mark.parametrize("packet", REFUSED)
def test_refused_commands_are_dropped_and_answered(packet: bytes) -> None:
    for chunks in ([], [1] * len(packet)):
        out, answer, refused = run(packet + query(b"SELECT 2"), chunks)
        assert out == query(b"SELECT 2")
        assert refused == 1
        length, seq = mysql.header(answer)
        assert seq == 1 and len(answer) == 4 + length
        err = mysql.decode_auth_reply(answer[4:])
        assert isinstance(err, mysql.ErrPacket)
        assert err.code in (1044, 1047, 1235)


def test_a_long_command_and_its_continuation() -> None:
    big = query(b"SELECT '" + b"x" * (c.MAX_PAYLOAD + 10) + b"'")
    assert run(big + query(b"USE mysql"), [70000, 3, 9_000_000])[0] == big
    refused_big = query(b"USE mysql /*" + b"x" * (c.MAX_PAYLOAD + 10) + b"*/")
    out, _, refused = run(refused_big + query(b"SELECT 3"), [5, 100_000])
    assert out == query(b"SELECT 3") and refused == 1


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.sampled_from(ALLOWED + REFUSED), max_size=8),
    st.lists(st.integers(1, 40), max_size=12),
)
def test_any_split_gives_the_same_verdicts(packets: list[bytes], cuts: list[int]) -> None:
    data = b"".join(packets)
    whole = run(data)
    assert run(data, cuts) == whole
    assert whole[0] == b"".join(p for p in packets if p in ALLOWED)
    assert whole[2] == sum(p in REFUSED for p in packets)


# --------------------------------------------------------------------------- auth methods


def test_native_password_matches_the_formula() -> None:
    scramble = b"s" * 20
    stage1 = hashlib.sha1(b"pw").digest()
    expected = bytes(
        a ^ b
        for a, b in zip(
            stage1, hashlib.sha1(scramble + hashlib.sha1(stage1).digest()).digest(), strict=True
        )
    )
    assert _auth.native_password("pw", scramble) == expected
    assert _auth.native_password("", scramble) == b""


def test_ed25519_signature_verifies_with_the_stored_public_key() -> None:
    scramble = os.urandom(32)
    signature = _auth.ed25519_password("correct horse", scramble)
    key = Ed25519PublicKey.from_public_bytes(_auth.ed25519_public_key("correct horse"))
    key.verify(signature, scramble)  # raises if wrong
    assert len(signature) == 64
