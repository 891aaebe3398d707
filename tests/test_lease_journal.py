"""The lease journal a broker keeps for its successor (broker/credentials/journal.py).

The end-to-end cases, against a real OpenBao and PostgreSQL: a SIGKILLed worker's leases
revoked by the worker started in its place (test_workers.py), a SIGKILLed broker's by the
next one on the same state_dir (test_signals.py). These pin the file's rules.
"""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from broker.credentials import journal
from broker.credentials.journal import LeaseJournal
from broker.errors import ConfigError

NOW = 1_800_000_000.0


def open_journal(path: Path, now: float = NOW) -> LeaseJournal:
    return LeaseJournal(path, clock=lambda: now)


def left_in(path: Path) -> dict[str, float]:
    """What a process opening the journal now finds left (it closes it again)."""
    j = open_journal(path)
    try:
        return j.left
    finally:
        j.close()


def test_what_a_process_did_not_revoke_is_left_to_the_next(tmp_path: Path) -> None:
    path = tmp_path / "leases-1.journal"
    first = open_journal(path)
    assert first.left == {}
    first.added("database/creds/app/a", NOW + 3600)
    first.added("database/creds/app/b", NOW + 3600)
    first.added("database/creds/app/c", NOW + 10)
    first.added("database/creds/app/a", NOW + 7200)  # renewed: the last expiry counts
    first.ended("database/creds/app/b")
    # Killed here: the kernel lets go of its lock, and nothing else happens. The next
    # process of the slot reads what is left, unexpired.
    first.close()
    second = open_journal(path, now=NOW + 60)
    assert second.left == {"database/creds/app/a": NOW + 7200}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # It revokes it and takes new leases; killed again, its successor sees only those.
    second.ended("database/creds/app/a")
    second.added("database/creds/app/d", NOW + 3600)
    second.close()
    third = open_journal(path, now=NOW + 120)
    assert third.left == {"database/creds/app/d": NOW + 3600}


def test_a_lease_left_and_not_yet_revoked_is_left_again(tmp_path: Path) -> None:
    path = tmp_path / "leases-1.journal"
    first = open_journal(path)
    first.added("database/creds/app/a", NOW + 3600)
    first.close()
    # The successor could not reach the vault before it was killed too.
    for _ in range(2):
        successor = open_journal(path)
        assert successor.left == {"database/creds/app/a": NOW + 3600}
        successor.close()


def test_a_clean_stop_leaves_nothing(tmp_path: Path) -> None:
    path = tmp_path / "leases-1.journal"
    j = open_journal(path)
    j.added("database/creds/app/a", NOW + 3600)
    j.ended("database/creds/app/a")
    j.close()
    assert left_in(path) == {}


def test_the_file_is_rewritten_with_the_live_leases_when_it_grows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(journal, "COMPACT_LINES", 10)
    path = tmp_path / "leases-1.journal"
    j = open_journal(path)
    for n in range(50):
        j.added(f"database/creds/app/{n}", NOW + 3600)
        if n != 7:
            j.ended(f"database/creds/app/{n}")
    assert len(path.read_text().splitlines()) < 12
    j.close()
    assert left_in(path) == {"database/creds/app/7": NOW + 3600}


def test_lines_it_does_not_understand_and_oversized_files_are_ignored(tmp_path: Path) -> None:
    path = tmp_path / "leases-1.journal"
    path.write_text(
        "+ 1900000000 database/creds/app/a\n"
        "garbage\n"
        "+ soon database/creds/app/b\n"
        "+ 1900000000 two words here\n"
        "- \n"
        "+ 1900000000 database/creds/app/c"  # a last line without its newline still counts
    )
    assert left_in(path) == {
        "database/creds/app/a": 1_900_000_000.0,
        "database/creds/app/c": 1_900_000_000.0,
    }
    path.write_bytes(b"+ 1900000000 x\n" * (journal.MAX_JOURNAL_BYTES // 15 + 1))
    assert left_in(path) == {}


def test_its_directory_is_made_private_or_the_error_names_state_dir(tmp_path: Path) -> None:
    j = open_journal(tmp_path / "state" / "leases.journal")
    assert stat.S_IMODE((tmp_path / "state").stat().st_mode) == 0o700
    j.close()
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match=r"state_dir: cannot keep the lease journal in .*file"):
        open_journal(tmp_path / "file" / "leases.journal")


def test_two_running_brokers_cannot_share_a_journal(tmp_path: Path) -> None:
    path = tmp_path / "leases.journal"
    first = open_journal(path)
    with pytest.raises(ConfigError, match="in use by another running broker"):
        open_journal(path)
    first.close()
    open_journal(path).close()  # free once the first has let go (or died)


def test_leases_that_ran_out_are_forgotten_when_the_file_is_rewritten(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(journal, "COMPACT_LINES", 10)
    now = [NOW]
    j = LeaseJournal(tmp_path / "leases.journal", clock=lambda: now[0])
    for n in range(8):
        j.added(f"database/creds/app/{n}", NOW + 60)  # never revoked: they run out
    now[0] = NOW + 120
    j.added("database/creds/app/live", NOW + 3600)
    j.added("database/creds/app/live", NOW + 7200)  # the tenth line: rewritten
    assert (tmp_path / "leases.journal").read_text() == (
        f"+ {NOW + 7200:.0f} database/creds/app/live\n"
    )
    j.close()


def test_journals_of_slots_not_run_are_found_by_name(tmp_path: Path) -> None:
    for name in ("leases.journal", "leases-1.journal", "leases-2.journal", "leases-3.journal"):
        (tmp_path / name).write_text("")
    for name in ("leases-1.journal.lock", "leases-0.journal", "leases-x.journal", "other"):
        (tmp_path / name).write_text("")
    assert [p.name for p in journal.orphaned(tmp_path, keep={"leases-1.journal"})] == [
        "leases-2.journal",
        "leases-3.journal",
        "leases.journal",
    ]
    assert journal.orphaned(tmp_path / "missing", keep=set()) == []


def test_a_journal_taken_over_is_recorded_before_it_is_deleted(tmp_path: Path) -> None:
    gone = tmp_path / "leases-2.journal"
    old = open_journal(gone)
    old.added("database/creds/app/a", NOW + 3600)
    old.added("database/creds/app/b", NOW + 10)
    old.close()  # killed
    mine = open_journal(tmp_path / "leases-1.journal", now=NOW + 60)
    mine.added("database/creds/app/c", NOW + 3600)
    mine.adopt([gone, tmp_path / "leases-3.journal"])  # one never written: nothing to do
    assert mine.left == {"database/creds/app/a": NOW + 3600}
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "leases-1.journal",
        "leases-1.journal.lock",
    ]
    # Killed before it revoked the lease it took over: its own successor has it.
    mine.close()
    assert left_in(tmp_path / "leases-1.journal") == {
        "database/creds/app/a": NOW + 3600,
        "database/creds/app/c": NOW + 3600,
    }


def test_a_journal_another_process_holds_is_not_taken_over(tmp_path: Path) -> None:
    held = open_journal(tmp_path / "leases.journal")
    held.added("database/creds/app/a", NOW + 3600)
    mine = open_journal(tmp_path / "leases-1.journal")
    mine.adopt([held.path])
    assert mine.left == {}
    assert held.path.exists()
    held.close()
    assert left_in(held.path) == {"database/creds/app/a": NOW + 3600}
