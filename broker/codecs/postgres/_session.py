"""Following a logged-in PostgreSQL session, for upstream session reuse (`pool:`).

`SessionTracker` watches both directions of a spliced session without copying or rewriting
anything but the client's Terminate: it walks message frames (a type byte and a length) and
keeps count of what the client asked for and what the server answered:

- every Query ('Q'), Sync ('S') and FunctionCall ('F') is answered by exactly one
  ReadyForQuery ('Z'); an extended-protocol message (Parse, Bind, Execute, Describe, Close,
  Flush) opens a batch only a Sync closes;
- the upstream is idle when every such request was answered, no batch is open, neither
  direction stopped mid-message, and the last ReadyForQuery said 'I' (no transaction, not
  even a failed one);
- the client's Terminate ('X') is held back: the upstream session outlives the client.

`ResetReader` reads the answer to `RESET_QUERY` (DISCARD ALL: closes cursors, drops
prepared statements and temporary tables, resets every parameter and the session
authorization, releases advisory locks, UNLISTEN *). Only CommandComplete and a
ReadyForQuery 'I' (with ParameterStatus or notices between) is a clean reset; an error, or
anything else, is not.
"""

from __future__ import annotations

from ._constants import MIN_TYPED_LENGTH, TYPED_HEADER_LENGTH
from ._errors import ProtocolError, UpstreamProtocolError
from ._writers import _cstring, _typed

# DISCARD ALL as a simple Query.
RESET_QUERY = _typed(b"Q", _cstring("DISCARD ALL"))
# The answer to DISCARD ALL is a CommandComplete, a ReadyForQuery and the ParameterStatus of
# every reported parameter it reset (about 20 on PostgreSQL 16): a few hundred bytes. More
# than this is not that answer.
MAX_RESET_ANSWER = 64 * 1024

_HEADER = TYPED_HEADER_LENGTH
_QUERY, _SYNC, _FUNCTION_CALL, _TERMINATE = 0x51, 0x53, 0x46, 0x58
# Extended-protocol messages: they open a batch that only a Sync closes.
_BATCH = frozenset(b"PBEDCH")
# Copy sub-protocol messages from the client: part of the request being answered.
_COPY = frozenset(b"dcf")
_READY, _COMPLETE, _ERROR, _NOTICE, _PARAMETER = 0x5A, 0x43, 0x45, 0x4E, 0x53


class _Frames:
    """Walks the frames of one direction; `on_header` sees each message's type and length."""

    __slots__ = ("head", "need")

    def __init__(self) -> None:
        self.head = bytearray()  # a header split across reads
        self.need = 0  # body bytes of the current message still to come

    @property
    def at_boundary(self) -> bool:
        return not self.need and not self.head


class _ClientSide:
    """StreamFilter for the client -> upstream direction."""

    __slots__ = ("frames", "tracker")

    def __init__(self, tracker: SessionTracker) -> None:
        self.tracker = tracker
        self.frames = _Frames()

    @property
    def goodbye(self) -> bool:
        """The client sent Terminate (held back): the splice closes the client's side."""
        return self.tracker.terminated

    def feed(self, data: bytes) -> tuple[bytes, bytes]:
        frames, tracker = self.frames, self.tracker
        if not data:
            return b"", b""
        if tracker.terminated:
            tracker.stray = True  # bytes after Terminate: never reuse
            return b"", b""
        out: bytearray | None = None  # only built when something is held back
        i, n = 0, len(data)
        while i < n:
            if frames.need:
                take = min(frames.need, n - i)
                if out is not None:
                    out += data[i : i + take]
                i += take
                frames.need -= take
                continue
            start = i
            if frames.head or n - i < _HEADER:
                take = min(_HEADER - len(frames.head), n - i)
                frames.head += data[i : i + take]
                i += take
                if len(frames.head) < _HEADER:
                    # Hold the partial header back until its type is known.
                    if out is None:
                        out = bytearray(data[:start])
                    break
                header = bytes(frames.head)
                frames.head.clear()
                held = True
            else:
                header = data[i : i + _HEADER]
                i += _HEADER
                held = False
            kind = header[0]
            length = int.from_bytes(header[1:5], "big")
            if length < MIN_TYPED_LENGTH:
                raise ProtocolError(f"client message {chr(kind)!r} has length {length}")
            frames.need = length - MIN_TYPED_LENGTH
            if kind == _TERMINATE:
                tracker.terminated = True
                if out is None:
                    out = bytearray(data[:start])
                # Whatever follows a Terminate is not forwarded either.
                if i < n or frames.need:
                    tracker.stray = True
                return bytes(out), b""
            tracker.sent(kind)
            if held:
                if out is None:
                    out = bytearray(data[:start])
                out += header
            elif out is not None:
                out += header
        return (data if out is None else bytes(out)), b""


class _UpstreamSide:
    """StreamFilter for the upstream -> client direction (it only watches)."""

    __slots__ = ("frames", "status_next", "tracker")

    def __init__(self, tracker: SessionTracker) -> None:
        self.tracker = tracker
        self.frames = _Frames()
        self.status_next = False  # the next body byte is a ReadyForQuery's status

    def feed(self, data: bytes) -> tuple[bytes, bytes]:
        frames, tracker = self.frames, self.tracker
        i, n = 0, len(data)
        while i < n:
            if frames.need:
                if self.status_next:
                    tracker.answered(data[i])
                    self.status_next = False
                take = min(frames.need, n - i)
                i += take
                frames.need -= take
                continue
            take = min(_HEADER - len(frames.head), n - i)
            if not frames.head and take == _HEADER:
                header = data[i : i + _HEADER]
            else:
                frames.head += data[i : i + take]
                if len(frames.head) < _HEADER:
                    break
                header = bytes(frames.head)
                frames.head.clear()
            i += take
            length = int.from_bytes(header[1:5], "big")
            if length < MIN_TYPED_LENGTH:
                raise UpstreamProtocolError(
                    f"server message {chr(header[0])!r} has length {length}"
                )
            frames.need = length - MIN_TYPED_LENGTH
            if header[0] == _READY:
                self.status_next = True
        return data, b""


class SessionTracker:
    """Both directions of one session (see the module docstring)."""

    __slots__ = ("batch", "client", "pending", "status", "stray", "terminated", "upstream")

    def __init__(self) -> None:
        self.client = _ClientSide(self)
        self.upstream = _UpstreamSide(self)
        self.pending = 0  # requests not yet answered by a ReadyForQuery
        self.batch = False  # extended-protocol messages since the last Sync
        self.status = ord("I")  # of the last ReadyForQuery (the greeting's was idle)
        self.terminated = False
        self.stray = False

    def sent(self, kind: int) -> None:
        if kind in (_QUERY, _FUNCTION_CALL):
            self.pending += 1
        elif kind == _SYNC:
            self.pending += 1
            self.batch = False
        elif kind not in _COPY:
            # _BATCH, or a message this tracker does not know: not idle until a Sync.
            self.batch = True

    def answered(self, status: int) -> None:
        self.status = status
        if self.pending:
            self.pending -= 1

    def idle(self) -> bool:
        """True when the upstream session may serve another client after a reset."""
        return (
            not self.pending
            and not self.batch
            and not self.stray
            and self.status == ord("I")
            and self.client.frames.at_boundary
            and self.upstream.frames.at_boundary
        )


class ResetReader:
    """Reads the answer to RESET_QUERY: `feed` returns None for "more", else whether the
    session is clean and idle."""

    __slots__ = ("buffer", "complete", "failed")

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.complete = False
        self.failed = False

    def feed(self, data: bytes) -> bool | None:
        self.buffer += data
        if len(self.buffer) > MAX_RESET_ANSWER:
            return False
        buf = self.buffer
        while len(buf) >= _HEADER:
            kind = buf[0]
            length = int.from_bytes(buf[1:5], "big")
            if length < MIN_TYPED_LENGTH:
                return False
            if len(buf) < 1 + length:
                return None
            body = bytes(buf[_HEADER : 1 + length])
            del buf[: 1 + length]
            if kind == _READY:
                return self.complete and not self.failed and body == b"I" and not buf
            if kind == _COMPLETE:
                self.complete = body == b"DISCARD ALL\x00"
            elif kind == _ERROR:
                self.failed = True
            elif kind not in (_NOTICE, _PARAMETER):
                return False
        return None
