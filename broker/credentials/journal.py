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
import time
from collections.abc import Callable
from pathlib import Path

from broker.errors import ConfigError

log = logging.getLogger("sidekey.credentials")

# Past this size the journal is not read: a bigger one is not ours (a lease line is ~80
# bytes, and the journal is rewritten with the live leases once it has COMPACT_LINES lines).
MAX_JOURNAL_BYTES = 8 * 1024 * 1024
COMPACT_LINES = 10_000


class LeaseJournal:
    """The lease record of one broker process or worker slot (see the module docstring)."""

    def __init__(
        self, path: Path, *, clock: Callable[[], float] = time.time, where: str = "state_dir"
    ) -> None:
        """Open (and lock) the journal at `path`, creating its directory (mode 0700); raises
        ConfigError, naming `where`, if it cannot, or another running broker holds it."""
        self.path = path
        self._clock = clock
        self._lock_fd = self._lock(where)
        # What the previous process of this slot left: lease ID -> expiry (Unix seconds).
        self.left = self._read()
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

    def close(self) -> None:
        self._close_file()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # and the lock goes with it
            self._lock_fd = -1

    def _lock(self, where: str) -> int:
        lock = self.path.with_name(self.path.name + ".lock")
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise ConfigError(
                f"{where}: cannot keep the lease journal in {self.path.parent}: "
                f"{exc.strerror or exc}"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise ConfigError(
                f"{where}: {self.path} is in use by another running broker: give each broker "
                "(each instance of a deployment) a state_dir of its own"
            ) from None
        return fd

    def _close_file(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _append(self, line: str) -> None:
        if self._fd < 0:
            return
        try:
            os.write(self._fd, line.encode())
        except OSError as exc:
            log.warning("lease journal %s: cannot write (%s): a successor may not revoke "
                        "this broker's leases if it is killed", self.path, exc)  # fmt: skip
            return
        self._lines += 1
        if self._lines >= COMPACT_LINES:
            self._rewrite()

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

    def _read(self) -> dict[str, float]:
        try:
            with self.path.open("rb") as f:
                raw = f.read(MAX_JOURNAL_BYTES + 1)
        except FileNotFoundError:
            return {}
        except OSError as exc:
            log.warning("lease journal %s: cannot read (%s)", self.path, exc)
            return {}
        if len(raw) > MAX_JOURNAL_BYTES:
            log.warning("lease journal %s: over %d bytes, not read", self.path, MAX_JOURNAL_BYTES)
            return {}
        leases: dict[str, float] = {}
        for line in raw.decode(errors="replace").splitlines():
            match line.split():
                case ["+", expires, lease_id]:
                    with contextlib.suppress(ValueError):
                        leases[lease_id] = float(expires)
                case ["-", lease_id]:
                    leases.pop(lease_id, None)
        now = self._clock()
        return {i: e for i, e in leases.items() if e > now}
