"""Generate a large audit trail for `sidekey access` measurements, and time the question.

    .venv/bin/python bench/audit_trail.py --lines 10000000 --trails 3 --dir /tmp/trail
    .venv/bin/python bench/audit_trail.py --dir /tmp/trail --query-only

Each trail is one broker's: a policy event at its start and a reload every ~1M lines, then
HTTP requests (80 %), PostgreSQL session_start/session_end pairs (~16 %), denials, and an
offboarding, all chained as the broker writes them (broker.observe.audit.chain_line), one
hour of traffic spread over the lines. The figure goes to bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import random
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson

from broker.observe.audit import chain_line

START = datetime(2026, 11, 30, 13, 30, tzinfo=UTC)
SPAN = timedelta(hours=1)
IDS = [f"spiffe://example.org/ns/prod/sa/app-{i}" for i in range(200)]
SERVICES = ["orders-api", "orders-db", "billing-api", "billing-db"]


def policy(reason: str, at: str, allow: list[str]) -> dict[str, object]:
    return {
        "time": at, "event": "policy", "reason": reason, "config": "/etc/sidekey.yaml",
        "config_sha256": "0" * 64, "trust_domain": "example.org",
        "services": [{"name": s, "adapter": "http" if s.endswith("api") else "postgres",
                      "credentials": "vault-kv:secret/x", "rules": [{"id": a} for a in allow]}
                     for s in SERVICES],
        "identities": [], "denied": [],
    }  # fmt: skip


def stamp(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.%f") + "Z"


def generate(path: Path, lines: int, seed: int) -> None:
    rnd = random.Random(seed)
    prev, seq = b"", 0
    step = SPAN / lines
    with path.open("wb", buffering=1 << 20) as out:

        def write(record: dict[str, object]) -> None:
            nonlocal prev, seq
            seq += 1
            line = chain_line(orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE),
                              prev, seq, seq == 1)  # fmt: skip
            prev = line[-35:-3]
            out.write(line)

        open_sessions: list[tuple[str, str, str, str, datetime]] = []
        for i in range(lines):
            t = START + step * i
            at = stamp(t)
            if i % 1_000_000 == 0:
                count = 150 if i == 0 else 100 + (i // 1_000_000) % 50
                allow = [*IDS[:count], "spiffe://example.org/ns/ci/**"]
                write(policy("start" if i == 0 else "reload", at, allow))
                continue
            if i == lines // 2:
                write({"time": at, "event": "offboard", "spiffe_id": IDS[7], "reason": "bench",
                       "sessions_closed": 0, "leases_revoked": {}})  # fmt: skip
                continue
            roll = rnd.random()
            sid = IDS[rnd.randrange(len(IDS))]
            peer = (
                f"10.{seed}.{rnd.randrange(256)}.{rnd.randrange(256)}:{rnd.randrange(1024, 65535)}"
            )
            if roll < 0.08 and len(open_sessions) < 500:
                svc = rnd.choice(("orders-db", "billing-db"))
                user = f"v-token-app-rw-{rnd.getrandbits(40):x}"
                lease = f"database/creds/app-rw/{rnd.getrandbits(60):x}"
                open_sessions.append((svc, sid, peer, user + "|" + lease, t))
                write({"time": at, "event": "session_start", "service": svc, "adapter": "postgres",
                       "spiffe_id": sid, "auth_method": "x509-svid", "peer": peer,
                       "decision": "allow", "rule": sid, "upstream": "10.9.0.5:5432",
                       "upstream_user": user, "database": "appdb",
                       "credential": {"provider": "vault-database", "path": "database/creds/app-rw",
                                      "lease_id": lease}, "lease_id": lease})  # fmt: skip
            elif roll < 0.16 and open_sessions:
                svc, sid, peer, ul, began = open_sessions.pop(rnd.randrange(len(open_sessions)))
                user, lease = ul.split("|")
                write({"time": at, "event": "session_end", "service": svc, "adapter": "postgres",
                       "spiffe_id": sid, "auth_method": "x509-svid", "peer": peer,
                       "decision": "allow", "rule": sid, "outcome": "ok", "database": "appdb",
                       "bytes_client_to_upstream": rnd.randrange(10**6),
                       "bytes_upstream_to_client": rnd.randrange(10**7),
                       "duration_ms": round((t - began).total_seconds() * 1000, 1),
                       "ended_by": "client", "upstream_user": user, "lease_id": lease})  # fmt: skip
            elif roll < 0.17:
                write({"time": at, "event": "deny", "service": rnd.choice(SERVICES),
                       "spiffe_id": "spiffe://example.org/ns/dev/sa/intruder", "peer": peer,
                       "decision": "deny", "reason": "not allowed"})  # fmt: skip
            else:
                svc = rnd.choice(("orders-api", "billing-api"))
                write({"time": at, "event": "request", "service": svc, "adapter": "http",
                       "spiffe_id": sid, "auth_method": "x509-svid", "peer": peer,
                       "decision": "allow", "rule": sid,
                       "credential": {"provider": "vault-kv", "path": f"secret/{svc}",
                                      "version": 3},
                       "method": "GET", "path": "/v1/orders", "status": 200, "upstream_status": 200,
                       "bytes_in": 0, "bytes_out": rnd.randrange(10**5),
                       "duration_ms": round(rnd.random() * 50, 1)})  # fmt: skip


def python_loop(paths: list[Path], at: str) -> int:
    """The baseline: what `access` would be as a hand-written loop (orjson per line, the
    sessions and requests open at `at`); returns how many it found."""
    found = 0
    when = datetime.fromisoformat(at.replace("Z", "+00:00"))
    for path in paths:
        with path.open("rb") as f:
            for line in f:
                event = orjson.loads(line)
                kind = event.get("event")
                if kind not in ("session_end", "request"):
                    continue
                ended = datetime.fromisoformat(event["time"].replace("Z", "+00:00"))
                began = ended - timedelta(milliseconds=event.get("duration_ms", 0))
                if began <= when <= ended:
                    found += 1
    return found


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lines", type=int, default=10_000_000)
    parser.add_argument("--trails", type=int, default=3)
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--query-only", action="store_true")
    parser.add_argument("--baseline", action="store_true", help="also time a Python loop")
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    paths = [args.dir / f"broker-{i}.jsonl" for i in range(args.trails)]
    if not args.query_only:
        t0 = time.perf_counter()
        per = args.lines // args.trails
        with multiprocessing.Pool(min(args.trails, 2)) as pool:
            pool.starmap(generate, [(p, per, i) for i, p in enumerate(paths)])
        size = sum(p.stat().st_size for p in paths)
        print(f"generated {per * args.trails:,} lines, {size / 1e9:.2f} GB in "
              f"{time.perf_counter() - t0:.0f}s")  # fmt: skip
    at = stamp(START + SPAN * 0.6)
    for extra in ([], ["--identity", IDS[3]], ["--service", "orders-db"]):
        cmd = [sys.executable, "-m", "broker", "access", "--audit", *map(str, paths),
               "--at", at, "--json", *extra]  # fmt: skip
        t0 = time.perf_counter()
        result = subprocess.run(cmd, capture_output=True, text=True, check=True)
        took = time.perf_counter() - t0
        out = json.loads(result.stdout)
        print(f"access --at {at} {' '.join(extra)}: {took:.2f}s, could {len(out['could_reach'])}"
              f" rows, did {len(out['did_reach'])} rows, engine {out['engine']}")  # fmt: skip
    if args.baseline:
        t0 = time.perf_counter()
        found = python_loop(paths, at)
        print(f"baseline python loop (orjson per line): {time.perf_counter() - t0:.2f}s, "
              f"{found} open at {at}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
