"""`sidekey access`: who could reach what, and who did, at a time T (or in a window), from
audit trails alone.

- **Could reach**: per trail (one broker), the `policy` event in force at T (the last one at
  or before it) gives each service's rules; the deny list in force is that event's `denied`
  plus the `offboard`/`onboard` events between it and T. A rule's `hours` is evaluated at T;
  `from` and `claims` depend on the caller and are reported as conditions.
- **Did reach**: sessions and requests open at T (or overlapping the window): a
  `session_end` or `request` spans [time - duration_ms, time]; a `session_start` with no end
  in the trail is open from its time on. Each with its upstream user and lease.

Several trails (every replica of a fleet) are read together and merged by time. The scan is
DuckDB's JSON reader (parallel, columnar, filtering while it parses): on a 10-million-line
trail in three files it answered in the time bench/README.md gives, where a Python loop over
the lines with orjson took several times as long (same box, same files).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from broker.config import AllowRule, parse_rule
from broker.errors import SidekeyError
from broker.policy import in_window, rule_matches

EVENTS_KEPT = ("policy", "offboard", "onboard", "session_start", "session_end", "request")
# The columns read from each line; the reader skips the rest of a line without building it.
COLUMNS = {
    # Parsed by the reader itself: a TIMESTAMP column cost less than strings cast later.
    "time": "TIMESTAMP",
    "event": "VARCHAR",
    "service": "VARCHAR",
    "spiffe_id": "VARCHAR",
    "peer": "VARCHAR",
    "upstream_user": "VARCHAR",
    "lease_id": "VARCHAR",
    "duration_ms": "DOUBLE",
    "reason": "VARCHAR",
    "services": "JSON",
    "denied": "JSON",
    "credential": "JSON",
}


def _stamp(t: datetime) -> str:
    """The audit trail's own time format, so times compare as strings (no parsing)."""
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f") + "Z"


def access(
    paths: Sequence[Path],
    since: datetime,
    until: datetime,
    *,
    identity: str | None = None,
    service: str | None = None,
) -> dict[str, Any]:
    try:
        import duckdb  # noqa: PLC0415 - only `sidekey access` needs it
    except ImportError:
        raise SidekeyError(
            "sidekey access needs DuckDB: pip install 'sidekey[governance]'"
        ) from None
    t1, t2 = _naive(since), _naive(until)
    con = duckdb.connect()
    files = [str(p) for p in paths]
    columns = "{" + ", ".join(f"'{k}': '{v}'" for k, v in COLUMNS.items()) + "}"
    # One scan of every file: control events whole, traffic only where it overlaps [t1, t2].
    con.execute(
        f"""
        CREATE TEMP TABLE ev AS
        WITH lines AS (
            SELECT filename AS trail, time, event, service, spiffe_id, peer, upstream_user,
                   lease_id, duration_ms, reason, services, denied, credential
            FROM read_json(?, format = 'newline_delimited', columns = {columns},
                           filename = true, ignore_errors = true)
            WHERE event IN ('policy', 'offboard', 'onboard', 'session_end')
               OR (event = 'session_start' AND time <= ?)
               OR (event = 'request' AND time >= ?)
        ), spans AS (
            SELECT *, CASE WHEN event IN ('session_end', 'request') THEN time - to_microseconds(
                               CAST(coalesce(duration_ms, 0) * 1000 AS BIGINT)) END AS began
            FROM lines
        )
        -- Requests are most of a trail: keep only those overlapping the window.
        SELECT * FROM spans WHERE event <> 'request' OR began <= ?
        """,  # noqa: S608 - the column list is this module's constant
        [files, t2, t1, t2],
    )
    could = _could_reach(con, t2, identity, service)
    did = _did_reach(con, t1, t2, identity, service)
    return {
        "since": _stamp(since), "until": _stamp(until), "trails": files,
        "engine": f"duckdb {duckdb.__version__}", "could_reach": could, "did_reach": did,
    }  # fmt: skip


def _naive(t: datetime) -> datetime:
    """UTC without a zone: what the trail's TIMESTAMP column holds."""
    return t.astimezone(UTC).replace(tzinfo=None)


def _out(t: datetime | None) -> str | None:
    return None if t is None else t.strftime("%Y-%m-%dT%H:%M:%S.%f") + "Z"


def _could_reach(
    con: Any, at: datetime, identity: str | None, service: str | None
) -> list[dict[str, Any]]:
    rows = con.execute(
        """
        SELECT trail, time, event, spiffe_id, services, denied FROM ev
        WHERE event IN ('policy', 'offboard', 'onboard') AND time <= ?
        ORDER BY trail, time
        """,
        [at],
    ).fetchall()
    when = at.replace(tzinfo=UTC)
    in_force: dict[str, tuple[str, list[Any], set[str]]] = {}
    for trail, time, event, spiffe_id, services, denied in rows:
        if event == "policy":
            in_force[trail] = (_out(time) or "", _json(services) or [], set(_json(denied) or []))
        elif trail in in_force and spiffe_id:
            (in_force[trail][2].add if event == "offboard" else in_force[trail][2].discard)(
                spiffe_id
            )
    seen = _seen_identities(con)
    out: list[dict[str, Any]] = []
    for trail, (policy_time, services, denied) in sorted(in_force.items()):
        for svc in services:
            if service is not None and svc.get("name") != service:
                continue
            for raw in svc.get("rules", []):
                rule = parse_rule(raw, f"{trail}: policy of {policy_time}")
                row = _rule_row(rule, identity, seen, denied, when)
                if row is not None:
                    out.append({"trail": trail, "policy_time": policy_time,
                                "service": svc.get("name"), **row})  # fmt: skip
    return out


def _rule_row(
    rule: AllowRule, identity: str | None, seen: set[str], denied: set[str], when: datetime
) -> dict[str, Any] | None:
    if identity is not None:
        if not rule_matches(rule.id, identity):
            return None
        candidates = [identity]
    else:
        candidates = sorted(i for i in seen if rule_matches(rule.id, i))
    if rule.hours is not None and not in_window(rule.hours, when):
        return None  # outside its time window at T: it allowed nobody then
    conditions = {k: v for k, v in rule.to_json().items() if k in ("from", "claims", "hours")}
    return {
        "rule": rule.id,
        "conditions": conditions or None,
        "identities": [i for i in candidates if i not in denied],
        "offboarded": [i for i in candidates if i in denied],
        "pattern": rule.id.endswith("*"),
    }


def _seen_identities(con: Any) -> set[str]:
    rows = con.execute("SELECT DISTINCT spiffe_id FROM ev WHERE spiffe_id IS NOT NULL").fetchall()
    return {r[0] for r in rows}


def _did_reach(
    con: Any, t1: datetime, t2: datetime, identity: str | None, service: str | None
) -> list[dict[str, Any]]:
    where = ""
    params: list[Any] = [t2, t1, t2, t2, t1]
    if identity is not None:
        where += " AND spiffe_id = ?"
        params.append(identity)
    if service is not None:
        where += " AND service = ?"
        params.append(service)
    rows = con.execute(
        f"""
        WITH ends AS (
            SELECT * FROM ev WHERE event IN ('session_end', 'request')
        ), spans AS (
            SELECT trail, CASE event WHEN 'request' THEN 'request' ELSE 'session' END AS kind,
                   service, spiffe_id, peer, began, time AS ended, upstream_user, lease_id,
                   json_extract_string(credential, '$.path') AS credential
            FROM ends WHERE began <= ?
            UNION ALL
            SELECT s.trail, 'session', s.service, s.spiffe_id, s.peer, s.time, NULL,
                   s.upstream_user, s.lease_id, json_extract_string(s.credential, '$.path')
            FROM ev s
            WHERE s.event = 'session_start' AND NOT EXISTS (
                SELECT 1 FROM ends e
                WHERE e.event = 'session_end' AND e.trail = s.trail AND e.peer = s.peer
                  AND e.service = s.service AND e.time >= s.time
                  -- duration_ms is rounded to 0.1 ms: began may be just after the start
                  AND e.began <= s.time + INTERVAL 1 SECOND)
        )
        SELECT * FROM spans
        WHERE (ended IS NULL OR ended >= ?) AND began <= ?
          AND (ended IS NOT NULL OR began <= ?) AND (ended IS NULL OR ended >= ?) {where}
        ORDER BY began, trail
        """,  # noqa: S608 - placeholders only
        params,
    ).fetchall()
    keys = ("trail", "kind", "service", "spiffe_id", "peer", "began", "ended",
            "upstream_user", "lease_id", "credential")  # fmt: skip
    out = []
    for row in rows:
        item = {k: v for k, v in zip(keys, row, strict=True) if v is not None}
        for key in ("began", "ended"):
            if key in item:
                item[key] = _out(item[key])
        out.append(item)
    return out


def _json(value: Any) -> Any:
    import json  # noqa: PLC0415

    if value is None or isinstance(value, list | dict):
        return value
    return json.loads(value)


def usage_from_trails(paths: Sequence[Path], now: datetime) -> dict[tuple[str, str], Any]:
    """Per (identity, service): first and last use, calls in the 24 h before `now`, and the
    source hosts, from the `request` and `session_start` events of the trails."""
    import duckdb  # noqa: PLC0415

    from broker.governance.posture import Use  # noqa: PLC0415

    day_before = _stamp(now - timedelta(days=1))
    rows = (
        duckdb.connect()
        .execute(
            """
        SELECT spiffe_id, service, min(time), max(time),
               count(*) FILTER (WHERE time >= ?),
               list(DISTINCT regexp_replace(peer, ':[0-9]+$', ''))
        FROM read_json(?, format = 'newline_delimited',
                       columns = {'time': 'VARCHAR', 'event': 'VARCHAR', 'service': 'VARCHAR',
                                  'spiffe_id': 'VARCHAR', 'peer': 'VARCHAR'},
                       ignore_errors = true)
        WHERE event IN ('request', 'session_start') AND spiffe_id IS NOT NULL
          AND time <= ?
        GROUP BY ALL
        """,
            [day_before, [str(p) for p in paths], _stamp(now)],
        )
        .fetchall()
    )
    return {
        (sid, svc): Use(_parse(first), _parse(last), calls, frozenset(h for h in hosts if h))
        for sid, svc, first, last, calls, hosts in rows
    }


def _parse(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00"))
