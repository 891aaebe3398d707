"""A watch on what a logged-in PostgreSQL client sends, for services that ask for one.

After login the session is a byte splice. `PasswordChangeGuard` is a `StreamFilter` for the
client → upstream direction: it frames the frontend messages (a type byte and an Int32
length), passes every message through untouched except Query ('Q') and Parse ('P'), and
looks into those for a statement that changes a role's password: ``ALTER ROLE|USER ...
PASSWORD`` (psql's ``\\password`` sends exactly that). Such a message is rewritten into one
that makes the server itself answer 42501 (insufficient_privilege) with the broker's words, so
the error arrives in order, and the transaction, pipeline and ReadyForQuery behave exactly as
for any other failed statement.

What it is not: a SQL sandbox. A statement built at run time (``DO``/``EXECUTE``, a function)
is not visible to any inspection of the wire; the defences against a tampered lease are the
pg_hba.conf rule and the broker's own 28P01 recovery (docs/adapters/postgres.md).

Cost: messages other than Q and P are skipped by their length without a copy; a Q or P is
held until complete (at most MAX_INSPECTED_MESSAGE bytes) and lexed once.
"""

from __future__ import annotations

import struct

from ._errors import ProtocolError

# A Query or Parse held back for inspection. Queries are text, typically far smaller;
# anything larger cannot be inspected without holding it all, so it is refused (fail closed).
# PostgreSQL's own limit for a message is 1 GB (PQ_LARGE_MESSAGE_LIMIT).
MAX_INSPECTED_MESSAGE = 16 * 1024 * 1024
# The refusal the server raises in place of a password change.
REFUSAL = (
    "sidekey: changing a password is not allowed through this service "
    "(guard.deny_password_change); the broker manages the credential of this role"
)
_REFUSAL_SQL = (
    "DO $sidekey$ BEGIN RAISE EXCEPTION USING ERRCODE = '42501', MESSAGE = "
    "'" + REFUSAL.replace("'", "''") + "'; END $sidekey$"
).encode()
_HEADER = struct.Struct("!cI")  # type byte, Int32 length (which counts itself)
_QUERY, _PARSE = b"Q", b"P"


class PasswordChangeGuard:
    """StreamFilter: rewrites Query/Parse messages that would change a role's password."""

    __slots__ = ("_held", "_skip", "refused")

    def __init__(self) -> None:
        self._held = bytearray()  # an incomplete header, or a whole Q/P being gathered
        self._skip = 0  # bytes of a passed-through message still to come
        self.refused = 0  # messages rewritten, for the audit trail

    def feed(self, data: bytes) -> tuple[bytes, bytes]:
        """Client bytes in; (bytes for the upstream, b"" for the client)."""
        # Indices into `data`, no copies on the common path: a chunk of whole messages none of
        # which is rewritten goes out as the same object.
        out: list[bytes] = []
        start = pos = 0  # data[start:pos] is passed through unchanged so far
        n = len(data)
        while pos < n:
            if self._skip:
                step = min(self._skip, n - pos)
                self._skip -= step
                pos += step
                continue
            if self._held or n - pos < _HEADER.size:
                # A header split between chunks: gather it (and a Q/P body) in _held.
                if not self._held:
                    out.append(data[start:pos])
                take = self._gather(data, pos)
                pos += take
                start = pos
                if self._held and len(self._held) >= _HEADER.size and not self._gathering():
                    # A passed-through message's header: out with it, skip its body.
                    out.append(bytes(self._held))
                    self._skip = self._length() - 4
                    self._held.clear()
                elif self._held and self._complete():
                    out.append(self._inspect(bytes(self._held)))
                    self._held.clear()
                continue
            kind = data[pos : pos + 1]
            length = int.from_bytes(data[pos + 1 : pos + 5], "big")
            self._check(kind, length)
            end = pos + 1 + length
            if kind not in (_QUERY, _PARSE):
                self._skip = max(0, end - n)
                pos = min(end, n)
                continue
            if end > n:
                out.append(data[start:pos])
                self._held += data[pos:]
                pos = start = n
                continue
            message = data[pos:end]
            checked = self._inspect(message)
            if checked is not message:
                out.append(data[start:pos])
                out.append(checked)
                start = end
            pos = end
        if start == 0 and not out:
            return data, b""
        out.append(data[start:pos])
        return b"".join(out), b""

    def _check(self, kind: bytes, length: int) -> None:
        if length < 4:
            raise ProtocolError(f"message {kind!r} with length {length} after login")
        if kind in (_QUERY, _PARSE) and length + 1 > MAX_INSPECTED_MESSAGE:
            raise ProtocolError(
                f"a {'Query' if kind == _QUERY else 'Parse'} of {length} bytes is larger "
                f"than the {MAX_INSPECTED_MESSAGE} bytes guard.deny_password_change inspects"
            )

    def _length(self) -> int:
        return int.from_bytes(self._held[1:5], "big")

    def _gathering(self) -> bool:
        """Whether _held is a Q/P being gathered (else a header to pass through)."""
        return self._held[:1] in (_QUERY, _PARSE)

    def _complete(self) -> bool:
        return len(self._held) >= _HEADER.size and len(self._held) == self._length() + 1

    def _gather(self, data: bytes, pos: int) -> int:
        """Append to _held from data[pos:]: up to a whole header, then for a Q/P up to its
        end. Returns the bytes taken."""
        taken = 0
        need = _HEADER.size - len(self._held)
        if need > 0:
            chunk = data[pos : pos + need]
            self._held += chunk
            taken = len(chunk)
            if len(self._held) < _HEADER.size:
                return taken
            self._check(bytes(self._held[:1]), self._length())
        if self._gathering():
            missing = self._length() + 1 - len(self._held)
            chunk = data[pos + taken : pos + taken + missing]
            self._held += chunk
            taken += len(chunk)
        return taken

    def _inspect(self, message: bytes) -> bytes:
        kind, body = message[:1], message[5:]
        if kind == _QUERY:
            sql, _, _ = body.partition(b"\0")
            if changes_password(sql):
                self.refused += 1
                return _typed(_QUERY, _REFUSAL_SQL + b"\0")
            return message
        name, _, rest = body.partition(b"\0")
        sql, _, _ = rest.partition(b"\0")
        if changes_password(sql):
            self.refused += 1
            # Same statement name, no parameter types: DO takes none, and ALTER ROLE cannot
            # have parameters either, so the client's Bind (with none) still fits.
            return _typed(_PARSE, name + b"\0" + _REFUSAL_SQL + b"\0" + b"\0\0")
        return message


def _typed(kind: bytes, payload: bytes) -> bytes:
    return kind + struct.pack("!I", len(payload) + 4) + payload


def changes_password(sql: bytes) -> bool:
    """Whether any statement of `sql` is ALTER ROLE/USER ... PASSWORD (comments, quoting and
    case as PostgreSQL's lexer sees them)."""
    # Keywords are ASCII and case-insensitive, and no quoting can spell one: SQL without the
    # word is not lexed at all (measured: the lexer is ~30 us per query, this ~0.2 us).
    if b"password" not in sql.lower():
        return False
    for statement in _statements(sql.decode("utf-8", "replace")):
        if (
            len(statement) >= 3
            and statement[0] == "alter"
            and statement[1] in ("role", "user")
            and "password" in statement[2:]
        ):
            return True
    return False


def _statements(sql: str) -> list[list[str]]:
    """The unquoted words of each statement, lower-cased; quoted identifiers, string
    constants and comments are tokens that match no keyword."""
    statements: list[list[str]] = [[]]
    i, n = 0, len(sql)
    while i < n:
        c = sql[i]
        if c == ";":
            statements.append([])
            i += 1
        elif c.isspace():
            i += 1
        elif sql.startswith("--", i):
            end = sql.find("\n", i)
            i = n if end < 0 else end + 1
        elif sql.startswith("/*", i):
            i = _skip_block_comment(sql, i)
        elif c == "'" or (c in "eEbBxXnN" and sql.startswith("'", i + 1)):
            i = _skip_quoted(sql, sql.index("'", i), "'")
            statements[-1].append("'")
        elif c in "uU" and sql.startswith(("&'", '&"'), i + 1):
            i = _skip_quoted(sql, i + 2, sql[i + 2])
            statements[-1].append('"')
        elif c == '"':
            i = _skip_quoted(sql, i, '"')
            statements[-1].append('"')
        elif c == "$" and (tag := _dollar_tag(sql, i)) is not None:
            end = sql.find(tag, i + len(tag))
            i = n if end < 0 else end + len(tag)
            statements[-1].append("$")
        elif c.isalpha() or c == "_" or ord(c) > 127:
            j = i + 1
            while j < n and (sql[j].isalnum() or sql[j] in "_$" or ord(sql[j]) > 127):
                j += 1
            statements[-1].append(sql[i:j].lower())
            i = j
        else:
            j = i + 1
            while j < n and not (sql[j].isalnum() or sql[j] in " \t\r\n\f\v;'\"$_-/"):
                j += 1
            statements[-1].append(sql[i:j])
            i = j
    return [s for s in statements if s]


def _skip_block_comment(sql: str, i: int) -> int:
    # PostgreSQL's block comments nest.
    depth, n = 0, len(sql)
    while i < n:
        if sql.startswith("/*", i):
            depth += 1
            i += 2
        elif sql.startswith("*/", i):
            depth -= 1
            i += 2
            if depth == 0:
                return i
        else:
            i += 1
    return n


def _skip_quoted(sql: str, i: int, quote: str) -> int:
    """Past the quoted token opening at `i` (a doubled quote is one quote character; a
    backslash escapes in E'' strings, which only makes this end later, never earlier)."""
    j, n = i + 1, len(sql)
    escapes = quote == "'" and i > 0 and sql[i - 1] in "eE"
    while j < n:
        if escapes and sql[j] == "\\":
            j += 2
            continue
        if sql[j] == quote:
            if sql.startswith(quote, j + 1):
                j += 2
                continue
            return j + 1
        j += 1
    return n


def _dollar_tag(sql: str, i: int) -> str | None:
    """The $tag$ opening a dollar-quoted string at `i`, or None (a $1 parameter, say)."""
    j, n = i + 1, len(sql)
    while j < n and (sql[j].isalnum() or sql[j] == "_" or ord(sql[j]) > 127):
        j += 1
    if j < n and sql[j] == "$" and not sql[i + 1 : i + 2].isdigit():
        return sql[i : j + 1]
    return None
