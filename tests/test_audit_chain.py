"""The audit trail's hash chain, and `sidekey audit verify` finding each kind of tampering."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from broker.governance.verify import verify
from broker.observe.audit import AuditLog

LINES = 20


def trail(path: Path, n: int = LINES) -> list[bytes]:
    """n events from three writers in turn (a restart appends, a reload reopens)."""
    log = AuditLog(path)
    for i in range(n // 2):
        log.emit("request", service="api", spiffe_id="spiffe://example.org/a", n=i)
    log.close()
    again = AuditLog(path)
    for i in range(n // 4):
        again.emit("request", service="api", n=100 + i)
    again.reopen(path)
    for i in range(n - n // 2 - n // 4):
        again.emit("session_end", service="db", n=200 + i)
    again.close()
    return path.read_bytes().splitlines(keepends=True)


def test_a_written_trail_verifies(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    lines = trail(path)
    assert len(lines) == LINES
    events = [json.loads(x) for x in lines]
    assert [e["seq"] for e in events] == list(range(1, LINES + 1))
    assert [i for i, e in enumerate(events) if "chain_prev" in e] == [0, 10, 15]
    assert events[10]["chain_prev"] == events[9]["chain"]
    report = verify([path])
    assert report.ok, report.problems
    assert report.lines == LINES and report.last_seq == LINES
    assert report.last_hash == events[-1]["chain"]


def tampered(tmp_path: Path, change: str) -> list[str]:
    path = tmp_path / "audit.jsonl"
    lines = trail(path)
    if change == "changed":
        lines[6] = lines[6].replace(b'"n":6', b'"n":7')
    elif change == "removed":
        del lines[6:8]
    elif change == "reordered":
        lines[6], lines[7] = lines[7], lines[6]
    elif change == "truncated-start":
        del lines[:3]
    elif change == "unchained":
        lines.insert(4, b'{"time":"x","event":"request","spiffe_id":"forged"}\n')
    elif change == "removed-at-link":
        del lines[9]  # the last line before the second writer's first, which names it
    path.write_bytes(b"".join(lines))
    return [f"{p.line}:{p.kind}" for p in verify([path]).problems]


@pytest.mark.parametrize(
    ("change", "found"),
    [
        ("changed", ["7:changed"]),
        ("removed", ["7:removed"]),
        ("reordered", ["8:reordered"]),
        ("truncated-start", ["1:truncated-start"]),
        ("unchained", ["5:unchained"]),
        ("removed-at-link", ["10:removed"]),
    ],
)
def test_verify_finds_each_kind_of_tampering(tmp_path: Path, change: str, found: list[str]) -> None:
    assert tampered(tmp_path, change) == found


def test_rotated_files_verify_in_order_and_not_out_of_it(tmp_path: Path) -> None:
    first, second = tmp_path / "audit.jsonl.1", tmp_path / "audit.jsonl"
    log = AuditLog(first)
    for i in range(5):
        log.emit("request", n=i)
    log.reopen(second)  # logrotate moved the file, SIGHUP reopened
    for i in range(5):
        log.emit("request", n=10 + i)
    log.close()
    assert verify([first, second]).ok
    assert [p.kind for p in verify([second, first]).problems][:1] == ["reordered"]
    # The newer file alone starts with a link to a line it does not hold: that is fine.
    assert verify([second]).ok


def test_audit_verify_command(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    trail(path)
    cmd = [sys.executable, "-m", "broker", "audit", "verify", str(tmp_path / "audit.*")]
    ok = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert ok.returncode == 0, ok.stderr
    assert f"{LINES} lines in 1 files: chain intact" in ok.stdout
    lines = path.read_bytes().splitlines(keepends=True)
    lines[3] = lines[3].replace(b"spiffe://example.org/a", b"spiffe://example.org/b")
    path.write_bytes(b"".join(lines))
    bad = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert bad.returncode == 1
    assert f"{path}:4: changed" in bad.stdout


def test_what_the_chain_costs_per_line(tmp_path: Path) -> None:
    """Measured, not asserted tightly (shared box): the chain must stay a small part of a
    line's cost (the line itself is ~7 us with encoding, broker/observe/audit.py)."""
    record = {"service": "orders-api", "adapter": "http", "spiffe_id": "spiffe://example.org/"
              "ns/prod/sa/orders", "auth_method": "x509-svid", "peer": "127.0.0.1:51234",
              "decision": "allow", "rule": "spiffe://example.org/ns/prod/sa/orders",
              "method": "GET", "path": "/v1/orders", "status": 200, "upstream_status": 200,
              "bytes_in": 0, "bytes_out": 512, "duration_ms": 1.2,
              "credential": {"provider": "vault-kv", "path": "secret/orders",
                             "version": 3}}  # fmt: skip
    n = 20000
    costs = {}
    for chain in (False, True):
        log = AuditLog(tmp_path / f"chain-{chain}.jsonl", chain=chain)
        log.emit_record("request", dict(record))
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(n):
                log.emit_record("request", dict(record))
            best = min(best, (time.perf_counter() - t0) / n)
        log.close()
        costs[chain] = best * 1e6
    print(f"audit line: {costs[False]:.2f} us without the chain, {costs[True]:.2f} us with it")
    # Only a gross regression fails here (a busy 2-core box triples both figures).
    assert costs[True] < costs[False] + 100
    assert verify([tmp_path / "chain-True.jsonl"]).ok


def test_workers_interleave_one_chain_each_in_one_trail(tmp_path: Path) -> None:
    """`workers: N`: every worker appends to the one file with a chain of its own; verify
    follows each, so a line cut from one worker's chain is still found, and a restarted
    worker links to its own last line, not to another worker's."""
    path = tmp_path / "audit.jsonl"
    one, two = AuditLog(path, worker=1), AuditLog(path, worker=2)
    for i in range(6):
        (one if i % 2 else two).emit("session_end", n=i)
    one.close()
    restarted = AuditLog(path, worker=1)  # the same worker slot after a crash
    restarted.emit("policy", reason="start")
    restarted.close()
    two.emit("session_end", n=6)
    two.close()
    lines = path.read_text().splitlines()
    assert [json.loads(line)["worker"] for line in lines] == [2, 1, 2, 1, 2, 1, 1, 2]
    assert verify([path]).ok
    last_of_one = json.loads(lines[5])["chain"]
    assert json.loads(lines[6])["chain_prev"] == last_of_one
    # Cut worker 1's middle line: its chain has a gap, worker 2's does not.
    path.write_text("\n".join(lines[:3] + lines[4:]) + "\n")
    report = verify([path])
    assert [p.kind for p in report.problems] == ["removed"]
