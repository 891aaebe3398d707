"""The audit trail: one JSON line per decision and per session.

Answers "which workload had access to what, when". Events carry identities, services, rules,
credential references (provider, path, version, lease id) and byte counts — never a secret
value: callers pass `CredentialRef.to_audit()`, not a credential.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import IO, Any

log = logging.getLogger("sidekey.audit")


class AuditLog:
    """Appends JSON lines to a file (or stderr's sibling stream when no file is configured).

    Writes are synchronous and flushed per event: one short line costs a few microseconds,
    far less than the decision it records, and an audit line must not sit in a buffer when
    the process dies.
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        # Opened on first use, so building a broker to validate a config (`sidekey check`)
        # creates no file.
        self._stream: IO[str] | None = None

    def _open(self) -> IO[str]:
        if self.path is None:
            return sys.stdout
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        return os.fdopen(fd, "a", encoding="utf-8")

    def emit(self, event: str, **fields: Any) -> None:
        record = {
            "time": _now(),
            "event": event,
            **{k: v for k, v in fields.items() if v is not None},
        }
        try:
            if self._stream is None:
                self._stream = self._open()
            self._stream.write(json.dumps(record, default=str, separators=(",", ":")) + "\n")
            self._stream.flush()
        except (OSError, ValueError) as exc:
            log.error("audit write failed: %s", exc)

    def close(self) -> None:
        if self._stream is not None and self.path is not None:
            self._stream.close()
        self._stream = None


def _now() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e6):06d}Z"
