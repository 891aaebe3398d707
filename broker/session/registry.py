"""What is live right now: open sessions and kept-alive connections per identity, who is
offboarded, and when each identity last used each service.

Every TCP session (from the policy decision to its end) and every HTTP client connection
(from its first proven request to its close) is an `Entry` here, with a way to close it.
A config reload closes the entries the new policy denies; an offboarding closes every entry
of one identity. Both go through `Registry.close`, which audits a `session_closed` event
per entry through the callback the runtime gives it.

Usage (first use, last use, calls in the last 24 hours per identity and service) is counted
here too, for the inventory; `note_use` is on every request's path, so it is a dict lookup
and two additions.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from broker.governance.denylist import DenyEntry
from broker.identity import WorkloadIdentity

# Calls are counted in hourly buckets: "calls in the last 24 h" is the sum of the last 24.
USAGE_BUCKET_SECONDS = 3600
USAGE_BUCKETS = 24


class Entry:
    """One live session or connection of a proven identity on one service."""

    __slots__ = ("_close", "closed", "identity", "kind", "peer", "service")

    def __init__(
        self,
        identity: WorkloadIdentity,
        service: str,
        peer: str,
        kind: str,
        close: Callable[[str], None],
    ) -> None:
        self.identity = identity
        self.service = service
        self.peer = peer
        # "session" (TCP), "connection" (HTTP keep-alive) or "pooled" (an idle upstream
        # session kept for the identity's next client: broker.session.pool)
        self.kind = kind
        self._close = close
        # Why it was closed by the broker (reload, offboarding); None while open.
        self.closed: str | None = None

    def close(self, reason: str) -> bool:
        """Close it now; False if it was already closed by us."""
        if self.closed is not None:
            return False
        self.closed = reason
        self._close(reason)
        return True

    def __repr__(self) -> str:
        return f"Entry({self.kind} {self.identity.spiffe_id} on {self.service} from {self.peer})"


@dataclass(slots=True)
class Usage:
    """One identity's use of one service since the broker started."""

    first: float
    last: float
    # Hour number (time // 3600) -> calls in that hour, at most USAGE_BUCKETS + 1 kept.
    hours: dict[int, int] = field(default_factory=dict)

    def calls_24h(self, now: float) -> int:
        current = int(now // USAGE_BUCKET_SECONDS)
        return sum(n for hour, n in self.hours.items() if current - hour < USAGE_BUCKETS)


class Registry:
    """Live sessions and connections, offboarded identities and usage, for one broker."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._entries: dict[str, set[Entry]] = {}
        self._usage: dict[tuple[str, str], Usage] = {}
        self._denied: Mapping[str, DenyEntry] = MappingProxyType({})
        self._clock = clock

    # -- live entries ------------------------------------------------------------------------

    def add(
        self,
        identity: WorkloadIdentity,
        service: str,
        peer: str,
        kind: str,
        close: Callable[[str], None],
    ) -> Entry:
        entry = Entry(identity, service, peer, kind, close)
        self._entries.setdefault(identity.spiffe_id, set()).add(entry)
        return entry

    def discard(self, entry: Entry) -> None:
        entries = self._entries.get(entry.identity.spiffe_id)
        if entries is not None:
            entries.discard(entry)
            if not entries:
                del self._entries[entry.identity.spiffe_id]

    def of(self, spiffe_id: str) -> list[Entry]:
        return list(self._entries.get(spiffe_id, ()))

    def __iter__(self) -> Iterator[Entry]:
        for entries in list(self._entries.values()):
            yield from list(entries)

    def __len__(self) -> int:
        return sum(len(e) for e in self._entries.values())

    # -- the deny list -----------------------------------------------------------------------

    @property
    def denied(self) -> Mapping[str, DenyEntry]:
        """Offboarded identities (SPIFFE ID -> entry); replaced whole, never mutated."""
        return self._denied

    def set_denied(self, denied: Mapping[str, DenyEntry]) -> None:
        self._denied = MappingProxyType(dict(denied))

    # -- usage -------------------------------------------------------------------------------

    def note_use(self, spiffe_id: str, service: str) -> None:
        now = self._clock()
        hour = int(now // USAGE_BUCKET_SECONDS)
        usage = self._usage.get((spiffe_id, service))
        if usage is None:
            usage = self._usage[(spiffe_id, service)] = Usage(now, now)
        usage.last = now
        hours = usage.hours
        if hour in hours:
            hours[hour] += 1
            return
        hours[hour] = 1
        if len(hours) > USAGE_BUCKETS + 1:
            for old in [h for h in hours if hour - h >= USAGE_BUCKETS]:
                del hours[old]

    def usage(self) -> dict[tuple[str, str], Usage]:
        return dict(self._usage)
