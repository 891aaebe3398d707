"""The deny list's format in OpenBao KV v2: one field per offboarded identity.

    secret/sidekey/deny   spiffe://example.org/ns/prod/sa/orders = {"reason": "...",
                                                                    "at": "...", "by": "..."}

Field values are JSON strings (KV fields are strings to every reader, `bao kv get` included).
A value that is not JSON still denies its identity, with the raw text as the reason: a
hand-edited entry must never fail open.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

# A reason is free text for people; longer than this is a paste accident.
MAX_REASON_CHARS = 1000


@dataclass(frozen=True, slots=True)
class DenyEntry:
    """An offboarded identity, as the deny list holds it."""

    spiffe_id: str
    reason: str
    at: str = ""
    by: str = ""


def decode(fields: Mapping[str, str]) -> dict[str, DenyEntry]:
    entries: dict[str, DenyEntry] = {}
    for spiffe_id, value in fields.items():
        try:
            raw = json.loads(value)
        except ValueError:
            raw = {"reason": value}
        if not isinstance(raw, dict):
            raw = {"reason": str(raw)}
        entries[spiffe_id] = DenyEntry(
            spiffe_id,
            str(raw.get("reason", ""))[:MAX_REASON_CHARS],
            str(raw.get("at", "")),
            str(raw.get("by", "")),
        )
    return entries


def encode(entry: DenyEntry) -> str:
    return json.dumps(
        {"reason": entry.reason[:MAX_REASON_CHARS], "at": entry.at, "by": entry.by},
        separators=(",", ":"),
    )
