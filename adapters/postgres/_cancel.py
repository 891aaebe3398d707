"""The broker's own cancel secrets, and where each one leads upstream.

A client gets the upstream server's real process id (so `pg_backend_pid()`, a NOTIFY's
sender pid and the driver's `backend_pid` agree) with a secret key minted here, never the
upstream's: the upstream key belongs to a session authenticated with the broker's
credential, and a client (or anyone who sniffs a plaintext CancelRequest) must not be able
to cancel queries of sessions that are not its own. A process id is public (anyone on the
server can read pg_stat_activity), so the secret alone decides: a CancelRequest whose
(process id, secret) matches a live session makes the broker send the upstream's key for
that session, and only that one.
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class CancelTarget:
    """Where a cancel for one session goes: the upstream session's own key."""

    process_id: int
    secret_key: bytes = field(repr=False)
    # The SPIFFE ID that owns the session: a cancel that arrives over mTLS must come from it.
    spiffe_id: str


@dataclass(frozen=True, slots=True)
class _Entry:
    secret_key: bytes = field(repr=False)
    target: CancelTarget


class CancelKeys:
    """Broker key -> upstream key, for the sessions of one adapter that are alive now.

    Keyed by the upstream's process id; a list per id, since one address may lead to
    several servers (a load balancer) whose pids can coincide."""

    def __init__(self) -> None:
        self._entries: dict[int, list[_Entry]] = {}

    def __len__(self) -> int:
        return sum(len(entries) for entries in self._entries.values())

    def issue(self, target: CancelTarget) -> tuple[int, bytes]:
        """The (process id, secret key) a session's client gets: the upstream's process id
        and a fresh secret of the upstream key's length (a client that negotiated protocol
        3.2, with longer keys, gets a key of the length it expects)."""
        secret_key = secrets.token_bytes(len(target.secret_key))
        self._entries.setdefault(target.process_id, []).append(_Entry(secret_key, target))
        return target.process_id, secret_key

    def find(self, process_id: int, secret_key: bytes) -> CancelTarget | None:
        found = None
        for entry in self._entries.get(process_id, ()):
            # Every entry compared, in constant time each: no early exit to time.
            if hmac.compare_digest(entry.secret_key, secret_key):
                found = entry.target
        return found

    def forget(self, process_id: int, secret_key: bytes) -> None:
        entries = self._entries.get(process_id)
        if entries is None:
            return
        entries[:] = [e for e in entries if e.secret_key != secret_key]
        if not entries:
            del self._entries[process_id]
