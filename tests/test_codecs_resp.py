"""Tests for broker.codecs.resp: the RESP command scanner and reply parser.

Byte vectors are written out by hand. Each is fed whole, one byte at a time, and with
trailing data; hypothesis feeds garbage and random splits. The inline-request splitter is
checked against a real redis-server (ECHO of each argument) where one is available.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.codecs import resp
from broker.errors import ClientError, UpstreamError

WATCH = frozenset({b"auth", b"hello", b"reset"})


def scan(chunks: list[bytes]) -> list[resp.Segment]:
    """Feed `chunks` to a fresh scanner; merge adjacent pass-through bytes."""
    scanner = resp.CommandScanner(WATCH)
    merged: list[resp.Segment] = []
    for chunk in chunks:
        for segment in scanner.feed(chunk):
            if isinstance(segment, bytes) and merged and isinstance(merged[-1], bytes):
                merged[-1] += segment
            else:
                merged.append(segment)
    return merged


def three_ways(data: bytes) -> Iterator[list[bytes]]:
    yield [data]
    yield [data[i : i + 1] for i in range(len(data))]


def raw(segments: list[resp.Segment]) -> bytes:
    return b"".join(s if isinstance(s, bytes) else s.raw for s in segments)


GET = b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n"
SET_BIG = b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$40\r\n" + b"v" * 40 + b"\r\n"
AUTH = b"*3\r\n$4\r\nAUTH\r\n$5\r\nalice\r\n$6\r\nsecret\r\n"
AUTH_LOWER_1 = b"*2\r\n$4\r\nauth\r\n$2\r\npw\r\n"
HELLO = b"*5\r\n$5\r\nHeLLo\r\n$1\r\n3\r\n$4\r\nAUTH\r\n$1\r\nu\r\n$1\r\np\r\n"
RESET = b"*1\r\n$5\r\nRESET\r\n"
LONG_NAME = b"*1\r\n$20\r\n" + b"x" * 20 + b"\r\n"

# (input, expected segments with pass-through merged)
VECTORS: dict[str, tuple[bytes, list[resp.Segment]]] = {
    "get": (GET, [GET]),
    "set-big-value": (SET_BIG, [SET_BIG]),
    "auth-two-args": (AUTH, [resp.Command((b"AUTH", b"alice", b"secret"), AUTH)]),
    "auth-one-arg": (AUTH_LOWER_1, [resp.Command((b"auth", b"pw"), AUTH_LOWER_1)]),
    "hello-auth": (HELLO, [resp.Command((b"HeLLo", b"3", b"AUTH", b"u", b"p"), HELLO)]),
    "reset": (RESET, [resp.Command((b"RESET",), RESET)]),
    "between": (
        GET + AUTH + SET_BIG,
        [GET, resp.Command((b"AUTH", b"alice", b"secret"), AUTH), SET_BIG],
    ),
    "long-name-streams": (LONG_NAME, [LONG_NAME]),
    "empty-command": (
        b"*0\r\n" + AUTH,
        [b"*0\r\n", resp.Command((b"AUTH", b"alice", b"secret"), AUTH)],
    ),
    "inline-ping": (b"PING\r\n", [b"PING\r\n"]),
    "inline-auth": (b"auth x y\r\n", [resp.Command((b"auth", b"x", b"y"), b"auth x y\r\n", True)]),
    "inline-quoted-auth": (
        b"\"AU\\x54H\" 'x' y\n",
        [resp.Command((b"AUTH", b"x", b"y"), b"\"AU\\x54H\" 'x' y\n", True)],
    ),
    "inline-empty-lines": (b"\r\n\n", [b"\r\n\n"]),
    # Redis does not check the two bytes after bulk data; neither does the scanner.
    "unchecked-crlf": (
        b"*1\r\n$3\r\nGETxx" + AUTH,
        [b"*1\r\n$3\r\nGETxx", resp.Command((b"AUTH", b"alice", b"secret"), AUTH)],
    ),
    # Nor the byte after a header's CR.
    "cr-anything": (b"*1\rX$5\rXRESET\r\n", [resp.Command((b"RESET",), b"*1\rX$5\rXRESET\r\n")]),
}


@pytest.mark.parametrize("name", sorted(VECTORS))
def test_scanner_vectors(name: str) -> None:
    data, expected = VECTORS[name]
    for chunks in three_ways(data):
        assert scan(chunks) == expected, chunks[:3]
    # With trailing data: a partial command is held back, not forwarded.
    scanner = resp.CommandScanner(WATCH)
    segments = scanner.feed(data + b"*2\r\n$4\r\nAU")
    assert raw(segments) == data
    assert scanner.held == len(b"*2\r\n$4\r\nAU")


def test_streamed_bulk_is_forwarded_as_it_comes() -> None:
    scanner = resp.CommandScanner(WATCH)
    head = b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1000000\r\n"
    assert raw(scanner.feed(head + b"x" * 10)) == head + b"x" * 10
    chunk = b"*2\r\n$4\r\nAUTH\r\n" * 1000  # looks like commands, but is bulk data
    assert scanner.feed(chunk) == [chunk]
    assert scanner.held == 0


BAD = {
    "bad-count": b"*x\r\n",
    "leading-zero": b"*03\r\n",
    "plus-sign": b"*+3\r\n",
    "too-many-args": b"*%d\r\n" % (resp.MAX_COMMAND_ARGS + 1),
    "not-dollar": b"*1\r\n:3\r\nGET\r\n",
    "negative-bulk": b"*1\r\n$-1\r\n",
    "huge-bulk": b"*1\r\n$%d\r\n" % (resp.MAX_BULK_LENGTH + 1),
    "long-header": b"*" + b"1" * 40,
    "nul-in-header": b"*1\0\r\n",
    "nul-inline": b"GET a\0b\n",
    "unbalanced": b'GET "abc\n',
    "quote-then-char": b'GET "a"b\n',
    "long-inline": b"x" * (resp.MAX_INLINE_BYTES + 2),
    "huge-auth": b"*2\r\n$4\r\nAUTH\r\n$%d\r\n" % (resp.MAX_WATCHED_COMMAND_BYTES + 1),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_scanner_refuses_what_redis_refuses(name: str) -> None:
    scanner = resp.CommandScanner(WATCH)
    with pytest.raises(resp.ProtocolError) as raised:
        for i in range(len(BAD[name])):
            scanner.feed(BAD[name][i : i + 1])
    assert isinstance(raised.value, ClientError)
    with pytest.raises(resp.ProtocolError, match="already broke"):
        scanner.feed(GET)


@pytest.mark.parametrize(
    ("line", "args"),
    [
        (b"set a b", [b"set", b"a", b"b"]),
        (b"  set\t a   ", [b"set", b"a"]),
        (b'"a b" c', [b"a b", b"c"]),
        (b'"\\x41\\n\\q"', [b"A\nq"]),
        (b"'it\\'s'", [b"it's"]),
        (b'ab"cd"', [b"abcd"]),
        (b"a\x0bb", [b"a\x0bb"]),  # \v ends no token (only space, \n, \r, \t do)
        (b"", []),
        (b'"unterminated', None),
        (b"'x'y", None),
    ],
)
def test_split_args_is_sdssplitargs(line: bytes, args: list[bytes] | None) -> None:
    assert resp.split_args(line) == args


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.lists(st.integers(1, 50), max_size=10))
def test_garbage_is_forwarded_or_refused_never_lost(data: bytes, cuts: list[int]) -> None:
    scanner = resp.CommandScanner(WATCH)
    out = bytearray()
    chunks, rest = [], data
    for cut in cuts:
        chunks.append(rest[:cut])
        rest = rest[cut:]
    chunks.append(rest)
    try:
        for chunk in chunks:
            out += raw(scanner.feed(chunk))
    except resp.ProtocolError:
        return
    assert bytes(out) == data[: len(data) - scanner.held]


COMMANDS = st.lists(
    st.sampled_from(
        [GET, SET_BIG, AUTH, AUTH_LOWER_1, HELLO, RESET, LONG_NAME, b"PING\r\n", b"auth x y\n"]
    ),
    max_size=12,
)


@settings(max_examples=200, deadline=None)
@given(COMMANDS, st.lists(st.integers(1, 64), max_size=20))
def test_any_split_finds_the_same_commands(commands: list[bytes], cuts: list[int]) -> None:
    data = b"".join(commands)
    whole = scan([data])
    chunks, rest = [], data
    for cut in cuts:
        chunks.append(rest[:cut])
        rest = rest[cut:]
    chunks.append(rest)
    assert scan(chunks) == whole
    assert raw(whole) == data
    watched = [c for c in commands if c not in (GET, SET_BIG, LONG_NAME, b"PING\r\n")]
    assert [s.raw for s in whole if isinstance(s, resp.Command)] == watched


# --------------------------------------------------------------------------- replies

REPLIES: dict[str, tuple[bytes, resp.Reply]] = {
    "ok": (b"+OK\r\n", resp.SimpleString("OK")),
    "error": (
        b"-WRONGPASS invalid username-password pair\r\n",
        resp.ErrorReply("WRONGPASS invalid username-password pair"),
    ),
    "integer": (b":-42\r\n", resp.Integer(-42)),
    "bulk": (b"$5\r\nhe\r\no\r\n", resp.BulkString(b"he\r\no")),
    "null-bulk": (b"$-1\r\n", resp.BulkString(None)),
    "array": (b"*2\r\n:1\r\n$1\r\na\r\n", resp.Array((resp.Integer(1), resp.BulkString(b"a")))),
    "null-array": (b"*-1\r\n", resp.Array(None)),
    "map": (
        b"%2\r\n+server\r\n+redis\r\n+proto\r\n:3\r\n",
        resp.Map(
            (
                (resp.SimpleString("server"), resp.SimpleString("redis")),
                (resp.SimpleString("proto"), resp.Integer(3)),
            )
        ),
    ),
    "set": (b"~1\r\n#t\r\n", resp.Array((resp.Boolean(True),), "~")),
    "null": (b"_\r\n", resp.Null()),
    "double": (b",3.5\r\n", resp.Double("3.5")),
    "big": (b"(123456789012345678901\r\n", resp.BigNumber(123456789012345678901)),
    "verbatim": (b"=7\r\ntxt:abc\r\n", resp.VerbatimString("txt", b"abc")),
    "bulk-error": (b"!5\r\nERR x\r\n", resp.ErrorReply("ERR x")),
    "attribute-dropped": (b"|1\r\n+a\r\n+b\r\n+OK\r\n", resp.SimpleString("OK")),
}


@pytest.mark.parametrize("name", sorted(REPLIES))
def test_reply_vectors(name: str) -> None:
    data, expected = REPLIES[name]
    for chunks in three_ways(data):
        parser = resp.ReplyParser()
        got = []
        for chunk in chunks:
            parser.feed(chunk)
            while (reply := parser.next_reply()) is not None:
                got.append(reply)
        assert got == [expected]
    parser = resp.ReplyParser()
    parser.feed(data + b"+NEXT\r\n$3\r\nab")
    assert parser.next_reply() == expected
    assert parser.next_reply() == resp.SimpleString("NEXT")
    assert parser.next_reply() is None
    assert parser.leftover() == b"$3\r\nab"


BAD_REPLIES = {
    "type": b"?x\r\n",
    "bulk-len": b"$x\r\n",
    "too-big": b"$%d\r\n" % (resp.MAX_REPLY_BULK + 1),
    "no-crlf": b"$1\r\nabc",
    "deep": b"*1\r\n" * (resp.MAX_REPLY_DEPTH + 2),
    "many": b"*%d\r\n" % (resp.MAX_REPLY_ITEMS + 1),
    "bool": b"#x\r\n",
    "negative-map": b"%-1\r\n",
}


@pytest.mark.parametrize("name", sorted(BAD_REPLIES))
def test_bad_replies_are_the_servers_fault(name: str) -> None:
    parser = resp.ReplyParser()
    parser.feed(BAD_REPLIES[name])
    with pytest.raises(resp.UpstreamProtocolError) as raised:
        parser.next_reply()
    assert isinstance(raised.value, UpstreamError)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_reply_garbage_is_a_clean_error(data: bytes) -> None:
    parser = resp.ReplyParser()
    parser.feed(data)
    try:
        while parser.next_reply() is not None:
            pass
    except resp.UpstreamProtocolError:
        pass


def test_writers() -> None:
    assert resp.encode_command("AUTH", b"u", "p") == b"*3\r\n$4\r\nAUTH\r\n$1\r\nu\r\n$1\r\np\r\n"
    assert resp.encode(resp.ErrorReply("ERR a\r\n+OK")) == b"-ERR a  +OK\r\n"
    assert resp.encode(resp.SimpleString("OK")) == b"+OK\r\n"


def test_commands_are_counted_once_complete() -> None:
    scanner = resp.CommandScanner(WATCH)
    scanner.feed(b"*0\r\n\r\nPING\r\n" + GET + AUTH + SET_BIG[:-5])
    assert scanner.commands == 3  # the empty ones get no reply; SET is not complete yet
    scanner.feed(SET_BIG[-5:] + b"*1\r\n$4\r\nPING\r\n")
    assert scanner.commands == 5


INLINE_TRICKS = [
    b'ECHO "a b"',
    b"ECHO 'it\\'s'",
    b'ECHO "\\x41\\x4a\\n"',
    b'ECHO ab"cd"',
    b'ECHO "q\\"q"',
    b"ECHO a\x0bb",
    b"  ECHO\t x  ",
]


def test_split_args_agrees_with_a_real_redis(redis_server: object) -> None:
    """Inline requests with quotes and escapes: Redis's reply to ECHO is the argument it
    parsed, which must be the scanner's."""
    import socket

    from tests.servers_mysql_redis import RedisServer

    assert isinstance(redis_server, RedisServer)
    with socket.create_connection((redis_server.host, redis_server.port), timeout=10) as sock:
        sock.sendall(f"AUTH vaultadmin {redis_server.passwords['vaultadmin']}\r\n".encode())
        parser = resp.ReplyParser()

        def reply() -> resp.Reply:
            while (value := parser.next_reply()) is None:
                parser.feed(sock.recv(4096))
            return value

        assert reply() == resp.SimpleString("OK")
        for line in INLINE_TRICKS:
            sock.sendall(line + b"\r\n")
            args = resp.split_args(line)
            assert args is not None and args[0] == b"ECHO"
            assert reply() == resp.BulkString(args[1]), line
