"""The broker's own cancel keys, and where each one leads upstream.

A client gets a BackendKeyData minted here, never the upstream's: the upstream key belongs
to a session authenticated with the broker's credential, and a client (or anyone who sniffs
a plaintext CancelRequest) must not be able to cancel queries of sessions that are not its
own. A CancelRequest names a broker key; if it matches a live session, the broker sends the
upstream's key for that session, and only that one.
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass, field

# Process ids are handed out at random rather than counted up, so a key's process id tells an
# attacker nothing and guessing a live key means guessing both halves. PostgreSQL pids are
# positive Int32s; clients store them as such.
MAX_PROCESS_ID = 0x7FFF_FFFF


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
    """Broker key -> upstream key, for the sessions of one adapter that are alive now."""

    def __init__(self) -> None:
        self._entries: dict[int, _Entry] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def issue(self, target: CancelTarget) -> tuple[int, bytes]:
        """Mint a fresh (process id, secret key) for a session and remember its target.

        The secret has the upstream key's length, so a client that negotiated protocol 3.2
        (longer keys) gets a key of the length it expects.
        """
        while True:
            process_id = secrets.randbelow(MAX_PROCESS_ID) + 1
            if process_id not in self._entries:
                break
        secret_key = secrets.token_bytes(len(target.secret_key))
        self._entries[process_id] = _Entry(secret_key, target)
        return process_id, secret_key

    def find(self, process_id: int, secret_key: bytes) -> CancelTarget | None:
        entry = self._entries.get(process_id)
        if entry is None or not hmac.compare_digest(entry.secret_key, secret_key):
            return None
        return entry.target

    def forget(self, process_id: int) -> None:
        self._entries.pop(process_id, None)
