"""broker.observe.audit: one JSON line per event, on a real file and on standard output."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from broker.observe.audit import AuditLog


def lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_each_event_is_one_line_with_time_and_event_and_no_none_fields(tmp_path: Path) -> None:
    path = tmp_path / "audit" / "audit.jsonl"
    audit = AuditLog(path)
    assert not path.parent.exists(), "the file is created on first use, not by the constructor"
    audit.emit("request", service="api", status=200, error=None, credential={"version": 3})
    audit.emit_record("deny", {"service": "db", "reason": "no rule"})
    audit.close()

    first, second = (
        {k: v for k, v in e.items() if k not in ("seq", "chain", "chain_prev")} for e in lines(path)
    )  # the hash chain's fields: tests/test_audit_chain.py
    assert set(first) == {"time", "event", "service", "status", "credential"}
    assert first["event"] == "request" and first["credential"] == {"version": 3}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", str(first["time"]))
    assert second == {"time": second["time"], "event": "deny", "service": "db", "reason": "no rule"}
    assert path.stat().st_mode & 0o777 == 0o640


def test_lines_append_across_writers(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    for n in range(3):
        audit = AuditLog(path)
        audit.emit("request", n=n)
        audit.close()
    assert [line["n"] for line in lines(path)] == [0, 1, 2]


def test_values_orjson_refuses_still_make_a_line(tmp_path: Path) -> None:
    """A lone surrogate (a path decoded with surrogateescape) and a type JSON does not know
    must not cost the audit line: both fall back to the stdlib encoder or str()."""
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path)
    audit.emit("request", path="/caf\udce9", where=Path("/srv/x"))
    audit.emit("request", path="/café", where=Path("/srv/y"))
    audit.close()
    surrogate, utf8 = lines(path)
    assert surrogate["path"] == "/caf\udce9" and surrogate["where"] == "/srv/x"
    assert utf8["path"] == "/café" and utf8["where"] == "/srv/y"


def test_without_a_file_lines_go_to_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    audit = AuditLog(None)
    audit.emit("allow", spiffe_id="spiffe://example.org/app")
    out = capsys.readouterr().out
    assert out.endswith("\n") and out.count("\n") == 1
    assert json.loads(out)["spiffe_id"] == "spiffe://example.org/app"


def test_a_failed_write_is_logged_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    audit = AuditLog(blocker / "audit.jsonl")
    audit.emit("request", status=200)
    assert "audit write failed" in caplog.text
