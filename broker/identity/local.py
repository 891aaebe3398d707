"""Local attestation: the SPIFFE ID of a caller on a unix socket, from what the kernel says.

The broker reads the peer's credentials from the socket (``SO_PEERCRED``: pid, uid and gid as
they were at connect(), which the caller cannot forge) and walks the service's `local:` rules;
the first whose selectors all match gives the ID, as SPIRE's unix workload attestor does.
`uid` and `gid` come from the socket itself. `exe`, `pod_uid` and `cgroup` are read from
``/proc/<pid>`` and only when a rule whose other selectors matched asks for them:

- the process is pinned by a pidfd (``SO_PEERPIDFD``, Linux 6.5+; else ``pidfd_open`` of the
  pid right away), and what was read counts only if the process is still alive afterwards,
  so a pid reused by another process is never read as the caller;
- ``/proc/<pid>/exe`` is readable only by the process's own uid or a privileged broker
  (ptrace access mode): when it cannot be read, an `exe` rule does not match (fail closed);
- ``/proc/<pid>/cgroup`` is readable by anyone; a Kubernetes pod's UID is in its path
  (``.../kubepods/burstable/pod<uid>/<container>`` or, under the systemd driver,
  ``kubepods-burstable-pod<uid_with_underscores>.slice``).

A caller no rule matches is refused with an `IdentityError` that names its uid, gid and pid
(the adapter answers in its protocol). See docs/security.md for the trust model.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import re
import select
import socket
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from broker.config import LocalRule

from .workload import IdentityError, WorkloadIdentity

# socket.SO_PEERPIDFD appeared in Python 3.13; the value is Linux's (asm-generic/socket.h).
SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77)
_UCRED = struct.Struct("3i")
# /proc/<pid>/cgroup of a process in a pod is a few hundred bytes; more is not a cgroup file.
MAX_CGROUP_BYTES = 64 * 1024
# A pod UID in a cgroup path: cgroupfs driver `pod<uuid>`, systemd driver `pod<uuid with _>`.
_POD_UID = re.compile(
    r"pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12})"
)
_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class PeerCredentials:
    """The kernel-verified identity of a unix socket peer (SO_PEERCRED), and a pidfd that
    pins its process while the broker reads /proc (-1 when none could be had)."""

    pid: int
    uid: int
    gid: int
    pidfd: int = -1

    def close(self) -> None:
        if self.pidfd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.pidfd)


def peer_credentials(sock: socket.socket, *, pin: bool = False) -> PeerCredentials | None:
    """The peer of a connected unix socket; with `pin`, also a pidfd of its process (the
    caller closes it with `PeerCredentials.close`)."""
    if not hasattr(socket, "SO_PEERCRED"):  # pragma: no cover - Linux only
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    except OSError:
        return None
    pid, uid, gid = _UCRED.unpack(raw)
    pidfd = -1
    if pin:
        try:
            pidfd = sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD)
        except OSError:
            pidfd = _pidfd_open(pid)
    return PeerCredentials(pid, uid, gid, pidfd)


def _pidfd_open(pid: int) -> int:
    opener = getattr(os, "pidfd_open", None)
    if opener is None or pid <= 0:  # pragma: no cover - Linux < 5.3
        return -1
    try:
        fd: int = opener(pid)
    except OSError:
        return -1
    return fd


class _Process:
    """What /proc says about the peer's process, read at most once per caller."""

    __slots__ = ("_cgroups", "_exe", "_peer", "_proc")

    def __init__(self, peer: PeerCredentials, proc: str) -> None:
        self._peer = peer
        self._proc = proc
        self._exe: str | bool | None = False  # False: not read yet
        self._cgroups: tuple[str, ...] | bool | None = False

    def exe(self) -> str | None:
        if self._exe is False:
            self._exe = self._pinned(lambda: os.readlink(f"{self._proc}/{self._peer.pid}/exe"))
        assert not isinstance(self._exe, bool)
        return self._exe

    def cgroups(self) -> tuple[str, ...] | None:
        if self._cgroups is False:
            self._cgroups = self._pinned(self._read_cgroups)
        assert not isinstance(self._cgroups, bool)
        return self._cgroups

    def _read_cgroups(self) -> tuple[str, ...]:
        with open(f"{self._proc}/{self._peer.pid}/cgroup", "rb") as f:
            data = f.read(MAX_CGROUP_BYTES + 1)
        if len(data) > MAX_CGROUP_BYTES:
            raise OSError("cgroup file too large")
        # hierarchy-ID:controllers:path, one line per hierarchy (one line "0::" on v2).
        return tuple(
            line.split(":", 2)[2] for line in data.decode(errors="replace").splitlines()
            if line.count(":") >= 2
        )  # fmt: skip

    def _pinned(self, read: Callable[[], _T]) -> _T | None:
        """`read()` if it succeeds and the process is still the peer afterwards, else None."""
        if self._peer.pidfd < 0:
            return None  # no pidfd: the pid could name another process by now
        try:
            value = read()
        except OSError:
            return None
        # A pidfd turns readable once its process has exited: its pid may be reused since.
        ready, _, _ = select.select([self._peer.pidfd], [], [], 0)
        return None if ready else value


def pod_uid(cgroups: Sequence[str]) -> str | None:
    """The Kubernetes pod UID a process's cgroup paths name, or None."""
    for path in cgroups:
        found = _POD_UID.search(path)
        if found:
            return found.group(1).replace("_", "-")
    return None


def attest_socket(rules: Sequence[LocalRule], sock: socket.socket | None) -> WorkloadIdentity:
    """The identity the first matching rule gives the peer of the unix socket `sock`;
    raises IdentityError (naming the peer's uid when no rule matches)."""
    if sock is None or sock.family != socket.AF_UNIX:
        raise IdentityError("local rules identify callers on a unix socket only")
    peer = peer_credentials(sock, pin=any(rule.needs_process for rule in rules))
    if peer is None:
        raise IdentityError("the kernel gave no credentials for the caller (SO_PEERCRED)")
    try:
        return attest(rules, peer)
    finally:
        peer.close()


def attest(
    rules: Sequence[LocalRule], peer: PeerCredentials, proc: str = "/proc"
) -> WorkloadIdentity:
    """The identity the first matching rule gives `peer`; raises IdentityError naming its
    uid when none matches."""
    process = _Process(peer, proc)
    for index, rule in enumerate(rules):
        if _matches(rule, peer, process):
            return WorkloadIdentity(spiffe_id=rule.id, method="local", proof_id=f"local[{index}]")
    raise IdentityError(
        f"no local rule matches the caller (uid {peer.uid}, gid {peer.gid}, pid {peer.pid}): "
        "add a local: entry for it, or connect as a user one names"
    )


def _matches(rule: LocalRule, peer: PeerCredentials, process: _Process) -> bool:
    if rule.uid is not None and rule.uid != peer.uid:
        return False
    if rule.gid is not None and rule.gid != peer.gid:
        return False
    if rule.exe is not None and process.exe() != rule.exe:
        return False
    if rule.pod_uid is not None or rule.cgroup is not None:
        cgroups = process.cgroups()
        if cgroups is None:
            return False
        if rule.pod_uid is not None and pod_uid(cgroups) != rule.pod_uid:
            return False
        if rule.cgroup is not None and not any(
            fnmatch.fnmatchcase(path, rule.cgroup) for path in cgroups
        ):
            return False
    return True
