"""The audit trail: one JSON line per decision and per session.

Answers "which workload had access to what, when". Events carry identities, services, rules,
credential references (provider, path, version, lease id) and byte counts — never a secret
value: callers pass `CredentialRef.to_audit()`, not a credential.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

log = logging.getLogger("sidekey.audit")

# Under `audit.required`, a request or session is refused while the audit file's filesystem
# has less room than this: a few lines (a session's are under 2 KiB), so the lines that
# record what is served still fit once it is allowed.
AUDIT_RESERVE_BYTES = 8 * 1024


class AuditLog:
    """Appends JSON lines to a file, or to standard output when no file is configured.

    Each event is one ``write(2)`` of one whole line to a file opened with O_APPEND: an audit
    line never sits in a buffer when the process dies, and concurrent writers (a rotated
    file's old and new owner) never interleave within a line. Writing the encoded bytes
    straight to the descriptor halved the cost of a line (14 -> 7 us, encoding included).
    Without a file, lines go to standard output, flushed per line. Lines are UTF-8 JSON.
    """

    def __init__(
        self,
        path: Path | None,
        *,
        chain: bool = True,
        worker: int | None = None,
        required: bool = False,
    ) -> None:
        self.path = path
        # `audit.required`: adapters ask `unavailable()` before serving, and refuse while the
        # trail cannot take a line (fail closed); otherwise a failed write is counted and
        # logged, and serving goes on.
        self.required = required
        # Why the last write failed (None: it succeeded, or nothing was written yet), and
        # whether for want of space (then room found again lifts it before the next write).
        self.error: str | None = None
        self._no_space = False
        # Every failed write, also when not required (sidekey_audit_write_failures_total).
        self.on_failure: Callable[[], None] | None = None
        # Under `workers: N`, every worker appends to the one file: each line names its
        # worker (right after "event"), and each worker keeps a chain of its own, which
        # `sidekey audit verify` follows per worker. None: the one process's one chain.
        self.worker = worker
        # Opened on first use, so building a broker to validate a config (`sidekey check`)
        # creates no file.
        self._fd: int | None = None
        # The hash chain (see `chain_line`): the last line's hash and sequence number, and
        # whether the next line is the first this writer appends (it names its predecessor).
        self.chain = chain
        self._prev = b""
        self._pending_prev = b""
        self._seq = 0
        self._link = True
        # Other destinations (syslog, OpenTelemetry): each gets every line as written.
        self.sinks: list[Callable[[bytes], None]] = []

    def _open(self, path: Path) -> int:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o640)
        if self.chain and self._link:
            # Continue the chain of what the file already holds (a restart appends to it);
            # a new, empty file (rotated away) continues this writer's own chain.
            found = last_link(fd, self.worker)
            if found[1] or os.fstat(fd).st_size:
                self._prev, self._seq = found
        return fd

    def emit(self, event: str, **fields: Any) -> bool:
        return self.emit_record(event, fields)

    def emit_record(self, event: str, fields: dict[str, Any]) -> bool:
        """`emit` for a caller that already has the fields in a dict (None values are left
        out). False if the line could not be written (counted and logged here)."""
        record: dict[str, Any] = {"time": _clock.now(), "event": event}
        if self.worker is not None:
            record["worker"] = self.worker
        for key, value in fields.items():
            if value is not None:
                record[key] = value
        line = _encode(record)
        try:
            if self.path is None:
                if self.chain:
                    line = self._chained(line)
                sys.stdout.write(line.decode())
                sys.stdout.flush()
            else:
                if self._fd is None:
                    self._fd = self._open(self.path)
                if self.chain:
                    line = self._chained(line)
                written = os.write(self._fd, line)
                if written < len(line):  # a short write: only on a full disk or a signal
                    self._finish(self._fd, line, written)
        except (OSError, ValueError) as exc:
            self._failed(exc)
            if self.chain:  # not written: the next line links to the last one that was
                self._seq -= 1
                self._prev = self._pending_prev
            return False
        if self.error is not None:
            log.warning("audit writes succeed again (%s)", self._where())
            self.error = None
        for sink in self.sinks:
            sink(line)
        return True

    @staticmethod
    def _finish(fd: int, line: bytes, written: int) -> None:
        """Write the rest of a line cut short, or take its first part back out of the file:
        a half line would break every reader and the hash chain. The part is truncated away
        only while it is still the file's end (another worker appending to the same file in
        the microseconds between would keep it: then `sidekey audit verify` names it)."""
        try:
            while written < len(line):
                written += os.write(fd, line[written:])
        except OSError:
            end = os.lseek(fd, 0, os.SEEK_CUR)
            if os.fstat(fd).st_size == end:
                os.ftruncate(fd, end - written)
            raise

    def _where(self) -> str:
        return str(self.path) if self.path is not None else "standard output"

    def _failed(self, exc: BaseException) -> None:
        if self.on_failure is not None:
            self.on_failure()
        if self.error is None:
            # Once per run of failures: a full disk must not also flood the log (which may
            # live on the same disk); the metric counts every line lost.
            then = (
                "refusing requests and sessions until it can (audit.required)"
                if self.required
                else "serving without an audit trail (audit.required is false)"
            )
            log.error("audit write failed (%s): %s; %s", self._where(), exc, then)
        self.error = f"audit write to {self._where()} failed: {exc}"
        self._no_space = isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)

    def unavailable(self) -> str | None:
        """Why the trail cannot take a line now, or None if it can: the last write failed
        (until one succeeds), or the file's filesystem has under AUDIT_RESERVE_BYTES free.
        Adapters refuse to serve while this says something, under `audit.required`."""
        if not self.required:
            return None
        if self.path is not None:
            try:
                st = os.statvfs(self.path.parent)
            except OSError as exc:
                return f"audit file {self.path} cannot be checked: {exc.strerror or exc}"
            free = st.f_bavail * st.f_frsize
            if free < AUDIT_RESERVE_BYTES:
                return (
                    f"no space left for the audit file {self.path} ({free} bytes free, "
                    f"{AUDIT_RESERVE_BYTES} needed)"
                )
            if self._no_space:
                return None  # room again: the next line will tell
        return self.error

    def _chained(self, line: bytes) -> bytes:
        self._pending_prev = self._prev
        self._seq += 1
        chained = chain_line(line, self._prev, self._seq, self._link)
        self._prev = chained[-3 - CHAIN_HEX : -3]
        self._link = False
        return chained

    def reopen(self, path: Path | None) -> None:
        """Write to `path` from the next line on (a reload, or after logrotate moved the
        file: SIGHUP reopens it). The chain goes on: the next line names its predecessor."""
        self.close()
        self.path = path
        self._link = True

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
        self._fd = None


class _Clock:
    """UTC timestamps with microseconds; the formatted second is reused within that second:
    strftime(gmtime()) cost ~4 of the ~6 us a timestamp took, once per audit line."""

    __slots__ = ("_prefix", "_second")

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def now(self) -> str:
        t = time.time()
        second = int(t)
        if second != self._second:
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        return f"{self._prefix}.{int((t - second) * 1e6):06d}Z"


_clock = _Clock()


# The stdlib's C encoder, for what orjson refuses: a string with a lone surrogate (a path
# decoded with surrogateescape, say) becomes \udcxx instead of costing the audit line.
_fallback = json.JSONEncoder(default=str, separators=(",", ":"), check_circular=False).encode


def _encode(record: dict[str, Any]) -> bytes:
    """One JSON line, newline included, UTF-8. orjson encodes a request's audit record (16
    fields, one nested) in ~1.0 us where the stdlib's C encoder took ~6.5 us: the biggest
    single cost of an HTTP request's audit line (measured by hand, timeit, same host)."""
    try:
        return orjson.dumps(record, default=str, option=orjson.OPT_APPEND_NEWLINE)
    except orjson.JSONEncodeError:
        return (_fallback(record) + "\n").encode()


# --------------------------------------------------------------------------- the hash chain
#
# Each line ends with ``"seq":N,"chain":"H"}``: N counts lines, H is the first 128 bits (32
# hex digits) of SHA-256 over the previous line's H followed by this line up to and
# including its seq field (with the closing brace). The first line a writer appends also
# carries ``"chain_prev":"H'"``, the hash it continues from (empty at the very start), so a
# restart or a reopened file is a link, not a break. `sidekey audit verify` recomputes it:
# a changed line fails its hash, a removed or reordered one breaks the sequence. 128 bits
# keeps a second preimage out of reach and the line 35 bytes shorter than a full digest.
# Cost per line: see tests/test_audit_chain.py's measurement (~1 us on this box).
CHAIN_HEX = 32
_LAST_LINE = re.compile(rb',"seq":(\d+),"chain":"([0-9a-f]{32})"}$')
# How far back from the end a writer looks for the last line of an existing file.
TAIL_BYTES = 64 * 1024


def chain_line(line: bytes, prev: bytes, seq: int, link: bool) -> bytes:
    """`line` (a JSON object and a newline) with its chain fields appended."""
    head = line[:-2]
    if link:
        head += b',"chain_prev":"' + prev + b'"'
    head += b',"seq":' + str(seq).encode()
    digest = hashlib.sha256(prev + head + b"}").hexdigest()[:CHAIN_HEX].encode()
    return head + b',"chain":"' + digest + b'"}\n'


def last_link(fd: int, worker: int | None = None) -> tuple[bytes, int]:
    """The hash and sequence number of the last chained line of an open file (of `worker`'s
    chain, when given); ("", 0) for an empty file, or one whose last such line is not chained
    (the chain starts afresh). A worker's last line is looked for up to WORKER_SCAN_BYTES
    back: the other workers' lines may follow it."""
    size = os.fstat(fd).st_size
    if size == 0:
        return b"", 0
    if worker is None:
        start = max(0, size - TAIL_BYTES)
        tail = os.pread(fd, size - start, start).rstrip(b"\n")
        last = tail.rsplit(b"\n", 1)[-1]
        match = _LAST_LINE.search(last)
        if match is None:
            return b"", 0
        return match.group(2), int(match.group(1))
    end, carry = size, b""
    while end > 0 and size - end < WORKER_SCAN_BYTES:
        start = max(0, end - TAIL_BYTES)
        block = os.pread(fd, end - start, start) + carry
        lines = block.split(b"\n")
        # The first piece may be a line cut by the block's start: keep it for the next block.
        carry, lines = (lines[0], lines[1:]) if start > 0 else (b"", lines)
        for line in reversed(lines):
            if worker_of(line) == worker:
                match = _LAST_LINE.search(line)
                return (match.group(2), int(match.group(1))) if match else (b"", 0)
        end = start
    return b"", 0


# How far back a restarted worker looks for its own chain's last line.
WORKER_SCAN_BYTES = 16 * 1024 * 1024
_WORKER = re.compile(rb'^\{"time":"[^"]*","event":"[^"\\]*","worker":(\d+)[,}]')


def worker_of(line: bytes) -> int | None:
    """The worker a line names (the field right after "event"), or None."""
    match = _WORKER.match(line)
    return int(match.group(1)) if match else None
