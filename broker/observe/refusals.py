"""A cap on the `deny` lines callers that proved no identity can make the broker write.

Anyone who can reach a listener can be refused: a TLS handshake with an untrusted certificate
or none, a bad token, a unix-socket peer no `local:` rule matches. Each refusal is a `deny`
line, so a client repeating one in a loop grows the audit trail by a line per attempt (and,
with `audit.required`, can fill the disk whose loss stops the broker serving anyone). So per
service and peer address (the host without its port; a unix peer's uid), the first
`audit.refusal_lines_per_minute` refusals of each minute are written in full, and the rest of
that minute are counted into one `deny_suppressed` line when it ends (or when the broker
stops): how many there were and the last one's reason. Metrics still count every refusal.
Denials of a proven identity (policy said no) are not capped: only a caller holding a valid
SVID or token can make those.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

WINDOW_SECONDS = 60.0
# Peers counted at once across all services; past it, a service's further peers share one
# count under the address "*" until windows end (each entry is ~200 bytes).
MAX_PEERS = 4096


def peer_host(peer: str) -> str:
    """The part of an audit `peer` that names the caller, not its connection: `host` of
    ``host:port``, ``[v6]`` of ``[v6]:port``, ``unix:uid=N`` of ``unix:pid=…,uid=N,gid=…``."""
    if peer.startswith("unix:"):
        for part in peer[5:].split(","):
            if part.startswith("uid="):
                return f"unix:{part}"
        return "unix"
    host, sep, port = peer.rpartition(":")
    return host if sep and port.isdigit() and (":" not in host or host.startswith("[")) else peer


@dataclass
class _Window:
    service: str
    adapter: str
    peer: str
    started: float
    written: int = 0
    suppressed: int = 0
    reason: str = ""


class RefusalLimiter:
    """Which refusals get a `deny` line (see the module docstring); `emit` writes the
    `deny_suppressed` summaries."""

    def __init__(
        self,
        lines_per_minute: int,
        emit: Callable[[dict[str, Any]], object],
        *,
        clock: Callable[[], float] = time.monotonic,
        window: float = WINDOW_SECONDS,
    ) -> None:
        # 0: every refusal is written. Set again by a reload.
        self.lines_per_minute = lines_per_minute
        self._emit = emit
        self._clock = clock
        self._window = window
        self._windows: dict[tuple[str, str], _Window] = {}
        self._timer: asyncio.TimerHandle | None = None
        # Windows that have suppressed something (a summary to write when they end).
        self._suppressing = 0

    def admit(self, service: str, adapter: str, peer: str, reason: str) -> bool:
        """Whether this refusal gets its `deny` line; if not, it is counted for the summary."""
        if self.lines_per_minute <= 0:
            return True
        now = self._clock()
        key = (service, peer_host(peer))
        w = self._current(key, now)
        if w is None and len(self._windows) >= MAX_PEERS:
            self.flush(now)
            if len(self._windows) >= MAX_PEERS:
                key = (service, "*")
                w = self._current(key, now)
        if w is None:
            w = self._windows[key] = _Window(service, adapter, key[1], now)
        if w.written < self.lines_per_minute:
            w.written += 1
            return True
        if not w.suppressed:
            self._suppressing += 1
        w.suppressed += 1
        w.reason = reason
        self._schedule(w.started + self._window - now)
        return False

    def flush(self, now: float | None = None) -> None:
        """End the windows that are over by `now` (all of them with None, as at a stop),
        writing the summary of each that suppressed something. The table is in the order
        the windows started, so this stops at the first one still running."""
        for key, w in list(self._windows.items()):
            if now is not None and now - w.started < self._window:
                break
            self._end(key, w)

    def _current(self, key: tuple[str, str], now: float) -> _Window | None:
        w = self._windows.get(key)
        if w is not None and now - w.started >= self._window:
            self._end(key, w)
            return None
        return w

    def _end(self, key: tuple[str, str], w: _Window) -> None:
        del self._windows[key]
        if w.suppressed:
            self._suppressing -= 1
            self._emit(
                {
                    "service": w.service,
                    "adapter": w.adapter,
                    "peer": w.peer,
                    "refusals": w.suppressed,
                    "window_seconds": self._window,
                    "reason": w.reason,
                }
            )

    def _schedule(self, delay: float) -> None:
        """A summary is written when its window ends, whether or not the caller comes back."""
        if self._timer is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (a unit test driving `flush` itself)
        self._timer = loop.call_later(max(0.0, delay), self._tick)

    def _tick(self) -> None:
        self._timer = None
        now = self._clock()
        self.flush(now)
        if self._suppressing:
            # The oldest window ends first (the table is in starting order): each tick
            # ends at least one, and reads only those that ended.
            oldest = next(iter(self._windows.values()))
            self._schedule(oldest.started + self._window - now)

    def close(self) -> None:
        """Write every pending summary and stop the timer (the broker is stopping)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.flush()
