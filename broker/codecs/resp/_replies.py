"""ReplyParser: the server's replies during login, bytes in, replies out.

Every reply is parsed whole before it is returned, so only small replies are expected: the
limits in `_constants` bound the bulk length, the number of items and the nesting. A partial
reply is parsed again from its start when more bytes come: replies here are a few hundred
bytes, and restarting keeps the parser free of a resumable state machine.
"""

from __future__ import annotations

from typing import NoReturn

from ._constants import MAX_REPLY_BULK, MAX_REPLY_DEPTH, MAX_REPLY_ITEMS
from ._errors import UpstreamProtocolError
from ._messages import (
    Array,
    BigNumber,
    Boolean,
    BulkString,
    Double,
    ErrorReply,
    Integer,
    Map,
    Null,
    Reply,
    SimpleString,
    VerbatimString,
)

# The longest line of a non-string reply header ("*4096", ":-9223372036854775808").
_MAX_LINE = 64 * 1024
# A RESP3 big number is arbitrary precision; Python's int() of a longer one gets slow.
MAX_BIG_NUMBER_DIGITS = 4096


class _Incomplete(Exception):
    """Internal: the buffer ends inside the reply."""


class ReplyParser:
    """Reads what a Redis server sends (RESP2 and RESP3). Failure is sticky."""

    __slots__ = ("_buffer", "_failure", "_items")

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._failure: str | None = None
        self._items = 0

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def leftover(self) -> bytes:
        """Bytes received but not parsed: what the splice must still deliver."""
        return bytes(self._buffer)

    def next_reply(self) -> Reply | None:
        """The next complete reply, or None when more bytes are needed."""
        if self._failure is not None:
            raise UpstreamProtocolError(f"the server already broke RESP: {self._failure}")
        self._items = 0
        try:
            reply, end = self._parse(0, 0)
        except _Incomplete:
            if len(self._buffer) > MAX_REPLY_BULK + _MAX_LINE:
                self._fail(f"a reply of over {len(self._buffer)} bytes")
            return None
        del self._buffer[:end]
        return reply

    def _fail(self, reason: str) -> NoReturn:
        self._failure = reason
        raise UpstreamProtocolError(f"malformed reply from the server: {reason}")

    def _line(self, pos: int) -> tuple[bytes, int]:
        end = self._buffer.find(b"\r\n", pos)
        if end < 0:
            if len(self._buffer) - pos > _MAX_LINE:
                self._fail("a reply line without CRLF")
            raise _Incomplete
        return bytes(self._buffer[pos:end]), end + 2

    def _int(self, text: bytes, what: str, digits: int = 20) -> int:
        body = text[1:] if text[:1] in (b"-", b"+") else text
        if not body.isdigit() or len(body) > digits:
            self._fail(f"{what} is not an integer: {text[:32]!r}")
        return int(text)

    def _count(self, n: int, what: str) -> None:
        self._items += n
        if self._items > MAX_REPLY_ITEMS:
            self._fail(f"{what} with over {MAX_REPLY_ITEMS} items")

    def _parse(self, pos: int, depth: int) -> tuple[Reply, int]:
        if depth > MAX_REPLY_DEPTH:
            self._fail(f"replies nested over {MAX_REPLY_DEPTH} deep")
        if pos >= len(self._buffer):
            raise _Incomplete
        kind = bytes(self._buffer[pos : pos + 1])
        line, pos = self._line(pos + 1)
        if kind == b"+":
            return SimpleString(line.decode("utf-8", "replace")), pos
        if kind == b"-":
            return ErrorReply(line.decode("utf-8", "replace")), pos
        if kind == b":":
            return Integer(self._int(line, "an integer reply")), pos
        if kind == b"_":
            if line:
                self._fail("a null with a payload")
            return Null(), pos
        if kind == b"#":
            if line not in (b"t", b"f"):
                self._fail(f"a boolean that is not t or f: {line[:8]!r}")
            return Boolean(line == b"t"), pos
        if kind == b",":
            return Double(line.decode("ascii", "replace")), pos
        if kind == b"(":
            return BigNumber(self._int(line, "a big number", MAX_BIG_NUMBER_DIGITS)), pos
        if kind in (b"$", b"!", b"="):
            return self._string(kind, line, pos)
        if kind in (b"*", b"~", b">"):
            n = self._int(line, "an array length")
            if n < 0:
                if kind != b"*" or n != -1:
                    self._fail(f"an aggregate of length {n}")
                return Array(None), pos
            self._count(n, "an array")
            items = []
            for _ in range(n):
                item, pos = self._parse(pos, depth + 1)
                items.append(item)
            return Array(tuple(items), kind.decode()), pos
        if kind in (b"%", b"|"):
            n = self._int(line, "a map length")
            if n < 0:
                self._fail(f"a map of length {n}")
            self._count(2 * n, "a map")
            pairs = []
            for _ in range(n):
                key, pos = self._parse(pos, depth + 1)
                value, pos = self._parse(pos, depth + 1)
                pairs.append((key, value))
            if kind == b"|":
                # An attribute annotates the reply that follows it; the broker has no use
                # for it.
                return self._parse(pos, depth)
            return Map(tuple(pairs)), pos
        self._fail(f"unknown reply type {kind!r}")

    def _string(self, kind: bytes, line: bytes, pos: int) -> tuple[Reply, int]:
        n = self._int(line, "a string length")
        if n < 0:
            if kind != b"$" or n != -1:
                self._fail(f"a string of length {n}")
            return BulkString(None), pos
        if n > MAX_REPLY_BULK:
            self._fail(f"a string of {n} bytes (limit {MAX_REPLY_BULK})")
        end = pos + n
        if len(self._buffer) < end + 2:
            raise _Incomplete
        if self._buffer[end : end + 2] != b"\r\n":
            self._fail("a string not followed by CRLF")
        data = bytes(self._buffer[pos:end])
        if kind == b"!":
            return ErrorReply(data.decode("utf-8", "replace")), end + 2
        if kind == b"=":
            if len(data) < 4 or data[3:4] != b":":
                self._fail("a verbatim string without its format")
            return VerbatimString(data[:3].decode("ascii", "replace"), data[4:]), end + 2
        return BulkString(data), end + 2
