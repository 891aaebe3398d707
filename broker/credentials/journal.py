"""A broker's record of the leases it holds, so that its successor can revoke what it left.

A broker that stops revokes its leases; one killed outright (SIGKILL, the kernel's OOM
killer, a crash in a C extension) cannot, and its database roles would stay valid until their
TTL. So the broker appends a line to its journal when it gets a lease or renews one and when
it revokes one, and the process that starts in its place reads what is left, revokes every
lease still within its TTL (`VaultClient._revoke_left`), and starts its own record. Under
`workers: N` each worker slot has a journal (`leases-N.journal`) in `state_dir`, or else in
the parent's run directory (broker.supervisor), which outlives a worker but not the parent;
a single-process broker keeps `leases.journal` in `state_dir` when one is set. A lock file
beside each journal keeps two running brokers from sharing one (and revoking each other's
leases); the kernel releases it when its process dies, however it dies.

A broker started with fewer workers than its predecessor on the same `state_dir`, or switched
between one process and several, opens fewer journals than it finds there: the process of
slot 1 (or the single process) takes the others over (`LeaseJournal.adopt`), copying their
leases into its own journal before it deletes them, so a kill at any point leaves every
lease in a journal someone will read.

The file holds lease IDs and expiry times, never a credential: a lease ID alone reads
nothing, and revoking one takes the broker's own vault policy (``sys/leases/revoke``). Lines
are appended with one ``write`` each on an ``O_APPEND`` descriptor, so a process killed
between two lines leaves whole lines in the page cache (a host crash takes the run
directory, a temporary one, with it). The format, one lease per line:

    + <expires, Unix seconds> <lease ID>     a lease created or renewed (the last one counts)
    - <lease ID>                             a lease revoked
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import time
from collections.abc import Callable, Collection, Iterable
from pathlib import Path

from broker.errors import ConfigError

log = logging.getLogger("sidekey.credentials")

# Past this size the journal is not read: a bigger one is not ours (a lease line is ~80
# bytes, and the journal is rewritten with the live leases once it has COMPACT_LINES lines).
MAX_JOURNAL_BYTES = 8 * 1024 * 1024
COMPACT_LINES = 10_000
# The names a broker gives its journals: a single process's, and worker slot N's.
SINGLE_JOURNAL = "leases.journal"
_JOURNAL_NAME = re.compile(r"leases(-[1-9][0-9]*)?\.journal")


def worker_journal(n: int) -> str:
    """The journal's file name of worker slot `n` (1..N) under `workers: N`."""
    return f"leases-{n}.journal"


def orphaned(directory: Path, keep: Collection[str]) -> list[Path]:
    """The lease journals in `directory` other than those named in `keep`: the ones a broker
    with these journals will not open, left by one with more workers or a single process."""
    try:
        names = sorted(p.name for p in directory.iterdir())
    except OSError:
        return []
    return [directory / n for n in names if _JOURNAL_NAME.fullmatch(n) and n not in keep]


class LeaseJournal:
    """The lease record of one broker process or worker slot (see the module docstring)."""

    def __init__(
        self, path: Path, *, clock: Callable[[], float] = time.time, where: str = "state_dir"
    ) -> None:
        """Open (and lock) the journal at `path`, creating its directory (mode 0700); raises
        ConfigError, naming `where`, if it cannot, or another running broker holds it."""
        self.path = path
        self._clock = clock
        self._lock_fd = _lock(path, where)
        # What the previous process of this slot left: lease ID -> expiry (Unix seconds).
        self.left = _read(path, clock())
        self._live: dict[str, float] = {}
        self._lines = 0
        self._fd = -1
        self._rewrite()

    def added(self, lease_id: str, expires: float) -> None:
        """A lease was created, or renewed until `expires` (Unix seconds)."""
        self._live[lease_id] = expires
        self._append(f"+ {expires:.0f} {lease_id}\n")

    def ended(self, lease_id: str) -> None:
        """A lease was revoked (this process's, or one `left` by the previous process)."""
        known = self._live.pop(lease_id, None) is not None
        if self.left.pop(lease_id, None) is not None or known:
            self._append(f"- {lease_id}\n")

    def adopt(self, journals: Iterable[Path]) -> None:
        """Take over `journals` (see `orphaned`): their unexpired leases join `left`, to be
        revoked as this slot's predecessor's are, and are written to this journal before
        each file is deleted. One another process holds is left to it."""
        for path in journals:
            if not path.exists():
                continue  # taken over at an earlier start
            try:
                fd = _lock(path, "state_dir")
            except ConfigError:
                log.warning("lease journal %s: in use by another process, left to it", path)
                continue
            try:
                leases = _read(path, self._clock())
                self.left.update(leases)
                recorded = self._fd >= 0
                for lease_id, expires in leases.items():
                    recorded = self._append(f"+ {expires:.0f} {lease_id}\n") and recorded
                if recorded:  # else the file stays, for the next start to take over
                    for stale in (path, _lock_path(path)):
                        with contextlib.suppress(FileNotFoundError):
                            stale.unlink()
            finally:
                os.close(fd)
            log.info("lease journal %s: %d lease(s) taken over by %s (a slot this broker "
                     "no longer runs)", path, len(leases), self.path)  # fmt: skip

    def close(self) -> None:
        self._close_file()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # and the lock goes with it
            self._lock_fd = -1

    def _close_file(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _append(self, line: str) -> bool:
        """Whether `line` was written."""
        if self._fd < 0:
            return False
        try:
            os.write(self._fd, line.encode())
        except OSError as exc:
            log.warning("lease journal %s: cannot write (%s): a successor may not revoke "
                        "this broker's leases if it is killed", self.path, exc)  # fmt: skip
            return False
        self._lines += 1
        if self._lines >= COMPACT_LINES:
            self._rewrite()
        return True

    def _rewrite(self) -> None:
        """Replace the file by the leases still to be revoked: this process's and those the
        previous one left, unexpired."""
        now = self._clock()
        # A lease that ran out needs no revoking (the vault ended it): it goes here.
        self._live = {i: e for i, e in self._live.items() if e > now}
        entries = {i: e for i, e in {**self.left, **self._live}.items() if e > now}
        tmp = self.path.with_name(self.path.name + ".new")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write("".join(f"+ {e:.0f} {i}\n" for i, e in entries.items()))
            os.replace(tmp, self.path)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        except OSError as exc:
            log.warning("lease journal %s: cannot write (%s): a successor may not revoke "
                        "this broker's leases if it is killed", self.path, exc)  # fmt: skip
            return
        self._close_file()
        self._fd, self._lines = fd, len(entries)


def _lock_path(journal: Path) -> Path:
    return journal.with_name(journal.name + ".lock")


def _lock(journal: Path, where: str) -> int:
    """An exclusive lock on `journal`'s lock file, created with its directory (mode 0700);
    ConfigError, naming `where`, if it cannot be made or another process holds it."""
    try:
        journal.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(_lock_path(journal), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise ConfigError(
            f"{where}: cannot keep the lease journal in {journal.parent}: {exc.strerror or exc}"
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise ConfigError(
            f"{where}: {journal} is in use by another running broker: give each broker "
            "(each instance of a deployment) a state_dir of its own"
        ) from None
    return fd


def _read(path: Path, now: float) -> dict[str, float]:
    """The unexpired leases a journal holds: lease ID -> expiry (Unix seconds)."""
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_JOURNAL_BYTES + 1)
    except FileNotFoundError:
        return {}
    except OSError as exc:
        log.warning("lease journal %s: cannot read (%s)", path, exc)
        return {}
    if len(raw) > MAX_JOURNAL_BYTES:
        log.warning("lease journal %s: over %d bytes, not read", path, MAX_JOURNAL_BYTES)
        return {}
    leases: dict[str, float] = {}
    for line in raw.decode(errors="replace").splitlines():
        match line.split():
            case ["+", expires, lease_id]:
                with contextlib.suppress(ValueError):
                    leases[lease_id] = float(expires)
            case ["-", lease_id]:
                leases.pop(lease_id, None)
    return {i: e for i, e in leases.items() if e > now}
