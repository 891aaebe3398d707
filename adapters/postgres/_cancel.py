"""The broker's own cancel secrets, and where each one leads upstream.

A client gets the upstream server's real process id (so `pg_backend_pid()`, a NOTIFY's
sender pid and the driver's `backend_pid` agree) with a secret key minted here, never the
upstream's: the upstream key belongs to a session authenticated with the broker's
credential, and a client (or anyone who sniffs a plaintext CancelRequest) must not be able
to cancel queries of sessions that are not its own. A process id is public (anyone on the
server can read pg_stat_activity), so the secret alone decides: a CancelRequest whose
(process id, secret) matches a live session makes the broker send the upstream's key for
that session, and only that one.

Under `workers: N` a cancel comes on a new connection that the kernel gives to any worker,
while the key lives in the worker that served the session: a worker that does not know a
key asks its siblings (`broker.session.siblings`, CANCEL_TOPIC) with the key and the caller's
identity, and the one that knows it decides and cancels exactly as if the cancel had come to
it. A key no worker knows is dropped silently, as PostgreSQL does.

A CancelRequest needs no TLS and no identity, and asking the siblings costs a connection to
each of them: a peer sending made-up keys would make every worker do N-1 times the work it
takes to send one. So the cancels a worker passes on are limited per peer address
(`SiblingCancelRate`, a token bucket: 20 a second, 40 at once); past it a cancel is dropped
as an unknown key would be, counted, and logged once a minute. A cancel whose key this
worker holds is never limited.
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from broker.observe.refusals import peer_host
from broker.spiffeid import MAX_SPIFFE_ID_BYTES

# SiblingCancelRate's bucket per peer address: cancels a second, and at once. A client's
# cancels are one per statement timeout or Ctrl-C; a pool of connections timing out together
# is the burst.
SIBLING_CANCELS_PER_SECOND = 20.0
SIBLING_CANCELS_BURST = 40.0
# Peer addresses with a bucket at once; past it, the others share one ("*").
MAX_CANCEL_PEERS = 4096


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


class SiblingCancelRate:
    """Whether a cancel from `peer` may be passed to the other workers (module docstring)."""

    def __init__(
        self,
        per_second: float = SIBLING_CANCELS_PER_SECOND,
        burst: float = SIBLING_CANCELS_BURST,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.per_second, self.burst = per_second, burst
        self._clock = clock
        # Peer address -> (tokens, when last counted), least recently counted first; one
        # refilled to the full burst is dropped when the table is full (a peer absent from
        # it starts full), oldest first, so dropping reads only what it drops.
        self._buckets: dict[str, tuple[float, float]] = {}

    def allow(self, peer: str) -> bool:
        now = self._clock()
        key = peer_host(peer)
        if key not in self._buckets and len(self._buckets) >= MAX_CANCEL_PEERS:
            refill = self.burst / self.per_second
            while self._buckets:
                oldest = next(iter(self._buckets))
                if now - self._buckets[oldest][1] < refill:
                    break
                del self._buckets[oldest]
            if len(self._buckets) >= MAX_CANCEL_PEERS:
                key = "*"
        tokens, then = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - then) * self.per_second)
        allowed = tokens >= 1.0
        self._buckets[key] = (tokens - 1.0 if allowed else tokens, now)
        return allowed


@dataclass(frozen=True, slots=True)
class CancelCaller:
    """Who sent a CancelRequest, as far as its connection proves it."""

    # Whether the cancel came over TLS with a client certificate.
    certificate: bool
    # The SPIFFE ID that certificate proves; None if it proves none.
    spiffe_id: str | None

    def may_cancel(self, target: CancelTarget) -> bool:
        """The key found the session; over mTLS the key is not enough, it must be the
        session's owner asking. Without a certificate (a token session's cancel, or
        plaintext) the key is all a PostgreSQL client has, as with the server itself."""
        return not self.certificate or self.spiffe_id == target.spiffe_id


# What a worker asks its siblings (broker.session.siblings) when a cancel's key is not one of
# its own: the key, and who asked, so the worker that holds the session decides as if the
# cancel had come to it.
CANCEL_TOPIC = "cancel"
# BackendKeyData's secret: 4 bytes in protocol 3.0, up to 256 in 3.2.
MAX_SECRET_BYTES = 256


def cancel_fields(process_id: int, secret_key: bytes, caller: CancelCaller) -> dict[str, Any]:
    return {
        "process_id": process_id,
        "secret_key": secret_key.hex(),
        "certificate": caller.certificate,
        "spiffe_id": caller.spiffe_id,
    }


def parse_cancel_fields(fields: dict[str, Any]) -> tuple[int, bytes, CancelCaller]:
    """The fields of `cancel_fields`, checked; raises ValueError (naming no value)."""
    process_id = fields.get("process_id")
    secret = fields.get("secret_key")
    certificate = fields.get("certificate")
    spiffe_id = fields.get("spiffe_id")
    if not (
        isinstance(process_id, int)
        and not isinstance(process_id, bool)
        and isinstance(secret, str)
        and 0 < len(secret) <= 2 * MAX_SECRET_BYTES
        and isinstance(certificate, bool)
        and (
            spiffe_id is None
            or (isinstance(spiffe_id, str) and len(spiffe_id.encode()) <= MAX_SPIFFE_ID_BYTES)
        )
    ):
        raise ValueError("malformed cancel request from a sibling worker")
    try:
        secret_key = bytes.fromhex(secret)
    except ValueError:
        raise ValueError("malformed cancel request from a sibling worker") from None
    return process_id, secret_key, CancelCaller(certificate, spiffe_id)
