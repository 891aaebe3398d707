"""`sidekey audit verify`: recompute an audit trail's hash chain and say where it breaks.

See `broker.observe.audit` for the chain. Given one file or several in order (a rotated
trail: oldest first), every line is checked:

- its hash must match its content and its predecessor's hash: else it was **changed**;
- its sequence number must follow the previous line's: a gap means lines were **removed**,
  a step back means lines were **reordered** (or a file is out of order);
- the first line of a writer names the hash it continues from (``chain_prev``); a file whose
  first line does not, or names another hash than the line before it, lost its beginning.

After a problem the check resynchronises on the line's own hash, so one edit is reported
once. What a chain cannot show: lines cut from the end of the newest file. Compare the last
hash printed here with a copy of the trail kept elsewhere (syslog, OpenTelemetry).
"""

from __future__ import annotations

import hashlib
import re
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from broker.observe.audit import CHAIN_HEX, worker_of

_TAIL = re.compile(rb',"seq":(\d+),"chain":"([0-9a-f]{%d})"}$' % CHAIN_HEX)
_PREV = re.compile(rb',"chain_prev":"([0-9a-f]{%d}|)"$' % CHAIN_HEX)
# Problems listed before the report says "and N more": a rewritten file is one finding.
MAX_PROBLEMS = 100


@dataclass(frozen=True, slots=True)
class Problem:
    path: str
    line: int
    kind: str  # changed | removed | reordered | unchained | truncated-start
    detail: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.kind}: {self.detail}"


@dataclass(slots=True)
class Report:
    lines: int = 0
    problems: list[Problem] = field(default_factory=list)
    more: int = 0
    last_seq: int = 0
    last_hash: str = ""

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, problem: Problem) -> None:
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(problem)
        else:
            self.more += 1


def verify(paths: Iterable[Path]) -> Report:
    """Check every line; a trail written by several workers (`workers: N`) holds one chain
    per worker (the line's ``worker`` field), each checked on its own."""
    report = Report()
    chains: dict[int | None, _Chain] = {}
    last: _Chain | None = None
    for path in paths:
        where = str(path)
        with path.open("rb") as f:
            for number, raw in enumerate(f, 1):
                report.lines += 1
                line = raw.rstrip(b"\n")
                if not line:
                    continue
                tail = _TAIL.search(line)
                if tail is None:
                    report.add(Problem(where, number, "unchained", "no seq/chain fields"))
                    continue
                worker = worker_of(line)
                chain = chains.get(worker)
                if chain is None:
                    chain = chains[worker] = _Chain()
                chain.line(report, where, number, line, tail)
                last = chain
    for chain in chains.values():
        chain.finish(report)
    report.problems.sort(key=lambda p: (p.path, p.line))
    if last is not None:
        report.last_seq, report.last_hash = last.high, last.last_hash.decode()
    return report


class _Chain:
    """One writer's chain (the one process's, or one worker's) as its lines are read."""

    def __init__(self) -> None:
        # Hashes of recent lines by sequence number: reordering is local, so a window
        # suffices and a 10-million-line trail verifies in constant memory.
        self.recent: OrderedDict[int, bytes] = OrderedDict()
        # Lines whose predecessor (seq - 1) has not been seen yet, by that predecessor's seq.
        self.waiting: dict[int, _Line] = {}
        self.high = 0  # the highest sequence number so far
        self.first = True
        self.last_hash = b""

    def line(
        self, report: Report, where: str, number: int, line: bytes, tail: re.Match[bytes]
    ) -> None:
        recent, waiting = self.recent, self.waiting
        seq, digest = int(tail.group(1)), tail.group(2)
        # What was hashed: the line up to its seq field (`,"chain":"` H `"}` off).
        item = _Line(where, number, seq, digest, line[: len(line) - CHAIN_HEX - 12])
        link = _PREV.search(line, 0, tail.start())
        if seq <= self.high:
            report.add(Problem(where, number, "reordered",
                               f"line {seq} comes after line {self.high}"))  # fmt: skip
        if link is not None:
            named = link.group(1)
            known = recent.get(seq - 1)
            if seq > 1 and known is None and not self.first:
                _removed(report, item, self.high)
            elif known is not None and known != named:
                report.add(Problem(where, number, "changed",
                                   "names a predecessor hash that is not the line "
                                   "before it"))  # fmt: skip
            _check(report, item, named)
        elif self.first:
            report.add(Problem(where, number, "truncated-start",
                               f"the trail starts at line {seq} and its first line "
                               "names no predecessor: its beginning was cut"))  # fmt: skip
        elif (base := recent.get(seq - 1)) is not None:
            _check(report, item, base)
        else:
            waiting[seq - 1] = item
        self.first = False
        self.high = max(self.high, seq)
        recent[seq] = digest
        while len(recent) > WINDOW:
            recent.popitem(last=False)
        later = waiting.pop(seq, None)
        if later is not None:
            _check(report, later, digest)
        self.last_hash = digest
        for stale in [k for k in waiting if k < self.high - WINDOW]:
            _removed(report, waiting.pop(stale), stale)

    def finish(self, report: Report) -> None:
        for item in self.waiting.values():
            _removed(report, item, max((k for k in self.recent if k < item.seq), default=0))


# Lines a reordering may move by and still be matched with their predecessor.
WINDOW = 1024


@dataclass(frozen=True, slots=True)
class _Line:
    path: str
    number: int
    seq: int
    digest: bytes
    head: bytes


def _check(report: Report, item: _Line, base: bytes) -> None:
    computed = hashlib.sha256(base + item.head + b"}").hexdigest()[:CHAIN_HEX]
    if computed.encode() != item.digest:
        report.add(Problem(item.path, item.number, "changed",
                           "its hash does not match its content: it was edited"))  # fmt: skip


def _removed(report: Report, item: _Line, before: int) -> None:
    missing = f"line {before + 1}" if before + 1 == item.seq - 1 else (
        f"lines {before + 1}-{item.seq - 1}")  # fmt: skip
    report.add(Problem(item.path, item.number, "removed", f"{missing} before it are missing"))
