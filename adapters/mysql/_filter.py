"""What the broker watches in a spliced MySQL session: the client's command packets.

Every packet the client sends after login goes through `CommandFilter.feed`. The framing
is followed (3-byte length, sequence number, payloads over 16 MiB continued in the next
packet), and only a packet that starts a command (sequence number 0, not a continuation)
is looked at, by its first bytes:

- ``COM_CHANGE_USER`` is refused: it would log the connection in as another user.
- ``COM_INIT_DB`` to a database the service does not offer is refused.
- ``COM_QUERY`` / ``COM_STMT_PREPARE`` whose statement is ``USE <db>`` (after whitespace,
  comments and the ``/*!`` executable-comment markers MySQL and MariaDB run) to such a
  database is refused. Only the statement's first ``QUERY_INSPECT_BYTES`` are read; a
  statement whose leading comments run past them is refused too (the broker cannot tell).
- Everything else, ``COM_RESET_CONNECTION`` included, passes untouched.

A refused command is dropped and answered with an ERR packet (sequence number 1) by the
broker. This is a guard, not the boundary: what the session's user may reach is what its
grants say (the creation statements of the OpenBao role); a ``USE`` inside a multi-statement
query or a prepared ``PREPARE ... FROM`` string is left to them.
"""

from __future__ import annotations

from broker.codecs.mysql import ErrPacket, encode
from broker.codecs.mysql import constants as c

# The statement prefix read to find a USE: comments longer than this before the first
# keyword are not something applications send.
QUERY_INSPECT_BYTES = 1024
# A COM_INIT_DB payload: a database name (64 characters, 4 bytes each at most) and its
# command byte.
MAX_INIT_DB_PAYLOAD = 1 + 256

# MySQL error codes of the refusals (include/mysqld_error.h).
ER_DBACCESS_DENIED_ERROR = 1044  # SQLSTATE 42000
ER_NOT_SUPPORTED_YET = 1235  # SQLSTATE 42000
ER_UNKNOWN_COM_ERROR = 1047  # SQLSTATE 08S01

_SPACE = b" \t\n\r\x0b\x0c"
_QUERIES = frozenset({c.COM_QUERY, c.COM_STMT_PREPARE})
_WATCHED = _QUERIES | {c.COM_INIT_DB, c.COM_CHANGE_USER}
# First bytes of a statement that may be (or lead to) a USE: the letter, whitespace, and
# the starts of comments.
_MAYBE_USE = frozenset(b"uU \t\r\n\x0b\x0c/#-")
_IDENT_END = _SPACE + b";/#-"


def use_target(head: bytes, complete: bool) -> tuple[str, bytes | None]:
    """Whether a statement is a USE, from its first bytes.

    ("other", None): not a USE; ("use", name): a USE of `name` (unquoted); ("unknown", None):
    the prefix ends before the statement's first keyword does.
    """
    i, n = 0, len(head)
    while True:
        while i < n and head[i] in _SPACE:
            i += 1
        if head.startswith(b"/*!", i) or head.startswith(b"/*M!", i):
            # An executable comment: its body runs as SQL. Skip the marker and version.
            i += 3 if head[i + 2] == 0x21 else 4
            while i < n and 0x30 <= head[i] <= 0x39:
                i += 1
            continue
        if head.startswith(b"/*", i):
            end = head.find(b"*/", i + 2)
            if end < 0:
                return ("other", None) if complete else ("unknown", None)
            i = end + 2
            continue
        if head.startswith(b"#", i) or head.startswith(b"-- ", i) or head.startswith(b"--\t", i):
            end = head.find(b"\n", i)
            if end < 0:
                return ("other", None) if complete else ("unknown", None)
            i = end + 1
            continue
        break
    if n - i < 4 and not complete:
        return "unknown", None
    if head[i : i + 3].lower() != b"use":
        return "other", None
    j = i + 3
    if j < n and head[j] not in _SPACE and head[j] not in b'`"/#-':
        return "other", None  # USER(), USED_..., a longer word
    while j < n and head[j] in _SPACE:
        j += 1
    if j < n and head[j] in b'`"':
        quote = head[j]
        name = bytearray()
        j += 1
        while j < n:
            if head[j] == quote:
                if j + 1 < n and head[j + 1] == quote:
                    name.append(quote)
                    j += 2
                    continue
                return "use", bytes(name)
            name.append(head[j])
            j += 1
        return ("other", None) if complete else ("unknown", None)
    start = j
    while j < n and head[j] not in _IDENT_END and not head.startswith(b"*/", j):
        j += 1
    if j == n and not complete:
        return "unknown", None
    return "use", head[start:j]


class CommandFilter:
    """The `StreamFilter` of one spliced MySQL session (see the module docstring)."""

    __slots__ = ("_continuing", "_databases", "_dropping", "_held", "_service", "_skip", "refused")

    def __init__(self, databases: tuple[str, ...], service: str) -> None:
        self._databases = frozenset(d.encode() for d in databases)
        self._service = service
        self._held = b""
        self._skip = 0  # payload bytes of the current packet still to pass (or drop)
        self._dropping = False  # the current command is refused: drop its bytes
        self._continuing = False  # the current packet's payload was 2^24 - 1: more follows
        # Commands refused so far, for the audit trail.
        self.refused = 0

    def feed(self, data: bytes) -> tuple[bytes, bytes]:
        if not (self._held or self._skip or self._continuing) and len(data) > c.HEADER_LENGTH:
            # The fast path: one whole command packet the filter has no interest in (a
            # COM_STMT_EXECUTE, a SELECT). ~1 us against ~4 us through the loop below.
            length = data[0] | data[1] << 8 | data[2] << 16
            if length + c.HEADER_LENGTH == len(data) and data[3] == 0 and length < c.MAX_PAYLOAD:
                command = data[4]
                if command not in _WATCHED or (
                    command in _QUERIES and length > 1 and data[5] not in _MAYBE_USE
                ):
                    return data, b""
        buf = self._held + data if self._held else data
        self._held = b""
        n = len(buf)
        pos = flush = 0  # bytes before `flush` are decided: forwarded (in `out`) or dropped
        out: list[bytes] = []
        answer = b""
        while pos < n:
            if self._skip:
                take = min(self._skip, n - pos)
                if self._dropping:
                    self._cut(out, buf, flush, pos)
                    flush = pos + take
                pos += take
                self._skip -= take
                if not self._skip and not self._continuing:
                    self._dropping = False
                continue
            if n - pos < c.HEADER_LENGTH:
                break
            length = buf[pos] | buf[pos + 1] << 8 | buf[pos + 2] << 16
            seq = buf[pos + 3]
            if not self._continuing and seq == 0:
                # A new command: the server only takes one at sequence number 0. Anything
                # else is the rest of a long command or a packet inside one (LOAD DATA
                # LOCAL's file).
                need = min(length, QUERY_INSPECT_BYTES)
                if n - pos - c.HEADER_LENGTH < need:
                    break
                start = pos + c.HEADER_LENGTH
                refusal = self._check(buf[start : start + need], need == length)
                if refusal is not None:
                    self.refused += 1
                    self._dropping = True
                    answer += encode(refusal, 1)
            self._continuing = length == c.MAX_PAYLOAD
            self._skip = length
            if self._dropping:
                self._cut(out, buf, flush, pos)
                flush = pos + c.HEADER_LENGTH
            pos += c.HEADER_LENGTH
            if not length and not self._continuing:
                self._dropping = False
        if self._dropping:
            flush = max(flush, pos)
        if flush < pos:
            out.append(buf if flush == 0 and pos == n else buf[flush:pos])
        self._held = buf[pos:] if pos < n else b""
        return (out[0] if len(out) == 1 else b"".join(out)), answer

    @staticmethod
    def _cut(out: list[bytes], buf: bytes, flush: int, pos: int) -> None:
        """Forward what is decided up to `pos` before dropping from there."""
        if flush < pos:
            out.append(buf[flush:pos])

    def _check(self, head: bytes, complete: bool) -> ErrPacket | None:
        if not head:
            return None
        command = head[0]
        if command in (c.COM_QUERY, c.COM_STMT_PREPARE):
            if head[1:2] and head[1] not in _MAYBE_USE:
                return None  # the fast path: SELECT, INSERT, ...
            verdict, name = use_target(head[1:], complete)
            if verdict == "other":
                return None
            if verdict == "unknown":
                return ErrPacket(
                    ER_NOT_SUPPORTED_YET,
                    f"the Sidekey broker reads the first {QUERY_INSPECT_BYTES} bytes of a "
                    "statement and found no keyword in them; shorten its leading comments",
                    "42000",
                )
            assert name is not None
            return self._database(name)
        if command == c.COM_INIT_DB:
            if not complete or len(head) > MAX_INIT_DB_PAYLOAD:
                return ErrPacket(ER_DBACCESS_DENIED_ERROR, "database name too long", "42000")
            return self._database(head[1:])
        if command == c.COM_CHANGE_USER:
            return ErrPacket(
                ER_UNKNOWN_COM_ERROR,
                f"COM_CHANGE_USER is refused by the Sidekey broker: the session's user is "
                f"the one service {self._service} gives this workload",
                "08S01",
            )
        return None

    def _database(self, name: bytes) -> ErrPacket | None:
        if name in self._databases:
            return None
        shown = name.decode("utf-8", "replace")
        allowed = ", ".join(sorted(d.decode() for d in self._databases))
        return ErrPacket(
            ER_DBACCESS_DENIED_ERROR,
            f"database '{shown}' is not available through service {self._service} "
            f"(allowed: {allowed})",
            "42000",
        )
