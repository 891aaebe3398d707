"""`pool:` of a service: logged-in upstream connections kept per identity (session mode).

    pool: {mode: session, size: 20, idle: 60s, wait: 5s}

`size` caps the upstream connections of one (identity, database, client parameters) key, in
use and idle together; a client past it waits up to `wait` for one to be handed back, then
is refused. An idle connection is closed after `idle`. Durations are seconds, as a number or
with a unit (`500ms`, `60s`, `5m`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from broker.errors import ConfigError

from .section import Section

POOL_MODES = ("session",)
DEFAULT_POOL_SIZE = 20
MAX_POOL_SIZE = 10_000
DEFAULT_POOL_IDLE_SECONDS = 60.0
# A client waiting for a full pool's connection: past this it is refused, not left hanging.
DEFAULT_POOL_WAIT_SECONDS = 5.0
MAX_POOL_SECONDS = 24 * 3600.0
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


@dataclass(frozen=True, slots=True)
class PoolConfig:
    mode: str = "session"
    size: int = DEFAULT_POOL_SIZE
    idle: float = DEFAULT_POOL_IDLE_SECONDS
    wait: float = DEFAULT_POOL_WAIT_SECONDS


def parse_pool(s: Section) -> PoolConfig:
    pool = PoolConfig(
        mode=s.choice("mode", POOL_MODES, "session"),
        size=s.integer("size", 1, MAX_POOL_SIZE, DEFAULT_POOL_SIZE),
        idle=_duration(s, "idle", DEFAULT_POOL_IDLE_SECONDS),
        wait=_duration(s, "wait", DEFAULT_POOL_WAIT_SECONDS),
    )
    s.finish()
    return pool


def _duration(s: Section, key: str, default: float) -> float:
    value = s.raw(key, default)
    if isinstance(value, bool):
        raise ConfigError(f"{s.at(key)}: must be a duration (60s, 500ms, 5m), got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value))
        if match is None:
            raise ConfigError(f"{s.at(key)}: must be a duration (60s, 500ms, 5m), got {value!r}")
        seconds = float(match.group(1)) * _UNIT[match.group(2)]
    if not 0 < seconds <= MAX_POOL_SECONDS:
        raise ConfigError(f"{s.at(key)}: must be above 0 and at most 24h, got {value!r}")
    return seconds
