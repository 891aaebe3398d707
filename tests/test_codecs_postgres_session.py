"""The session tracker and reset reader of upstream session reuse (broker/codecs/postgres/
_session.py): conversations as byte vectors, fed whole, one byte at a time, and in two
pieces at every split point."""

from __future__ import annotations

import pytest

from broker.codecs.postgres import RESET_QUERY, ProtocolError, ResetReader, SessionTracker


def msg(kind: bytes, body: bytes = b"") -> bytes:
    return kind + (4 + len(body)).to_bytes(4, "big") + body


QUERY = msg(b"Q", b"SELECT 1\x00")
READY_I, READY_T, READY_E = msg(b"Z", b"I"), msg(b"Z", b"T"), msg(b"Z", b"E")
ROWS = msg(b"T", b"\x00\x00") + msg(b"D", b"\x00\x00") + msg(b"C", b"SELECT 1\x00")
TERMINATE = msg(b"X")
EXTENDED = msg(b"P", b"\x00SELECT 1\x00\x00\x00") + msg(b"B", b"\x00" * 8) + msg(b"E", b"\x00" * 5)
SYNC = msg(b"S")

# (client bytes, upstream bytes, idle afterwards)
CONVERSATIONS = [
    ("one query answered", QUERY, ROWS + READY_I, True),
    ("query not yet answered", QUERY, ROWS, False),
    ("answered inside a transaction", QUERY, ROWS + READY_T, False),
    ("answered in a failed transaction", QUERY, msg(b"E", b"SERROR\x00\x00") + READY_E, False),
    ("extended batch synced and answered", EXTENDED + SYNC, ROWS + READY_I, True),
    ("extended batch without a Sync", EXTENDED, b"", False),
    ("two pipelined queries, one answered", QUERY + QUERY, ROWS + READY_I, False),
    ("two pipelined queries, both answered", QUERY + QUERY, (ROWS + READY_I) * 2, True),
    ("upstream stopped mid-message", QUERY, ROWS + READY_I + b"N\x00\x00", False),
]


def pieces(data: bytes, how: str) -> list[bytes]:
    if how == "whole":
        return [data] if data else []
    return [data[i : i + 1] for i in range(len(data))]


@pytest.mark.parametrize("how", ["whole", "bytes"])
@pytest.mark.parametrize(("name", "client", "upstream", "idle"), CONVERSATIONS)
def test_idle_follows_requests_and_answers(
    name: str, client: bytes, upstream: bytes, idle: bool, how: str
) -> None:
    tracker = SessionTracker()
    forwarded = b"".join(tracker.client.feed(p)[0] for p in pieces(client, how))
    relayed = b"".join(tracker.upstream.feed(p)[0] for p in pieces(upstream, how))
    assert forwarded == client and relayed == upstream, "nothing but Terminate is changed"
    assert tracker.idle() is idle, name


@pytest.mark.parametrize("split", range(len(QUERY + TERMINATE) + 1))
def test_terminate_is_held_back_at_every_split(split: int) -> None:
    tracker = SessionTracker()
    data = QUERY + TERMINATE
    out = tracker.client.feed(data[:split])[0] + tracker.client.feed(data[split:])[0]
    assert out == QUERY
    assert tracker.client.goodbye
    tracker.upstream.feed(ROWS + READY_I)
    assert tracker.idle()


def test_bytes_after_terminate_are_never_reused() -> None:
    tracker = SessionTracker()
    assert tracker.client.feed(TERMINATE + QUERY)[0] == b""
    assert not tracker.idle()


def test_a_bad_length_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError):
        SessionTracker().client.feed(b"Q\x00\x00\x00\x02")


RESET_OK = msg(b"S", b"application_name\x00\x00") + msg(b"C", b"DISCARD ALL\x00") + READY_I


@pytest.mark.parametrize(
    ("answer", "clean"),
    [
        (RESET_OK, True),
        (msg(b"E", b"SERROR\x00\x00") + READY_E, False),  # in a failed transaction
        (msg(b"E", b"SERROR\x00\x00") + READY_T, False),  # inside a transaction block
        (msg(b"C", b"DISCARD ALL\x00") + READY_T, False),
        (msg(b"D", b"\x00\x00") + msg(b"C", b"DISCARD ALL\x00") + READY_I, False),
    ],
)
@pytest.mark.parametrize("how", ["whole", "bytes"])
def test_reset_reader(answer: bytes, clean: bool, how: str) -> None:
    reader = ResetReader()
    result = None
    for piece in pieces(answer, how):
        result = reader.feed(piece)
        if result is not None:
            break
    if clean:
        assert result is True
    else:
        assert result is not True


def test_a_reset_answer_with_more_behind_it_is_not_clean() -> None:
    """Read at once; what arrives later stays buffered on the conduit, which the pool
    checks before handing the connection out."""
    assert ResetReader().feed(RESET_OK + msg(b"N", b"\x00")) is False


def test_reset_query_is_discard_all() -> None:
    assert msg(b"Q", b"DISCARD ALL\x00") == RESET_QUERY
