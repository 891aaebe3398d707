"""The rows of issue 18 sections 3 and 4: session reuse (`pool:`) and every core (`workers`).

- pg-churn-pool: `pgbench -C -S` (a new connection, one SELECT, a disconnect per
  transaction) through the broker's pooled service, against PostgreSQL direct (a fork, TLS
  and SCRAM per connection) and PgBouncer in session mode (the same TLS settings); the
  unpooled broker for reference.
- pg-workers / http-workers: the same broker config with `workers: 2` against `workers: 1`,
  on this 2-core box where the load generator and PostgreSQL (or nginx) share the cores. The
  figures per broker CPU-second (all the broker's processes) show what a bigger machine's
  scaling would be once the load generator has cores of its own.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from bench import scenarios as sc


def _scaling(
    num: str, den: str, goal: float, figure: str
) -> Callable[[Mapping[str, sc.Summary]], sc.Verdict]:
    """`num` / `den` throughput against `goal`, and each variant's ops per CPU-second."""
    base = sc.ratio(num, den, goal, figure)

    def verdict(s: Mapping[str, sc.Summary]) -> sc.Verdict:
        v = base(s)
        for name in (num, den):
            cpu = s[name].cpu_us_per_op
            if cpu:
                per_core = 1e6 / cpu
                v.extra[f"{name}_ops_per_cpu_second"] = per_core
                v.notes.append(f"{name}: {per_core:,.0f}/core-s")
            client = s[name].extra_median("client_cpu_us_per_op")
            if client:
                v.notes.append(f"{name}: load generator {client:.0f}us CPU/op")
        # Everything on the box (load generator and upstream included) with one worker: what
        # a second one can add here is about the idle rest (more only when the one-worker
        # runs were slow per operation, less when two workers cost more per operation).
        busy = s[den].extra_median("system_cpu_busy_percent")
        if busy:
            headroom = 100.0 / busy
            v.extra["idle_headroom_with_one_worker"] = headroom
            v.notes.append(
                f"idle headroom: all CPUs / {busy:.0f}% busy with {den} = {headroom:.2f}"
            )
        return v

    return verdict


def _workers_port(service: str) -> Callable[[sc.Env], int]:
    return lambda env: env.broker_workers.ports[service]


SCALE_SCENARIOS: tuple[Any, ...] = (
    sc.Scenario(
        key="pg-churn-pool",
        title="PG connect + one SELECT + disconnect: pgbench -C -S -c8, pooled upstream sessions",
        tool="pgbench",
        goal="pooled broker / direct connections/s >= 3.0",
        variants=(
            sc.pgbench_variant(
                "broker-pool",
                "sidekey, pool: {mode: session} (mTLS in, verify-full upstream)",
                sc.CHURN,
                clients=8,
                reconnect=True,
            ),
            sc.pgbench_variant("direct", sc.PG_DIRECT, sc.CHURN, clients=8, reconnect=True),
            sc.pgbench_variant("pgbouncer", sc.PG_BOUNCER, sc.CHURN, clients=8, reconnect=True),
            sc.pgbench_variant(
                "broker", sc.PG_BROKER + ", no pool", sc.CHURN, clients=8, reconnect=True
            ),
        ),
        verdict=sc.ratio("broker-pool", "direct", 3.0, "pooled broker / direct connections/s"),
        unit="conn/s",
    ),
    sc.Scenario(
        key="pg-workers",
        title="PG CPU-bound -S -M prepared -c16: workers: 2 vs workers: 1 (same box)",
        tool="pgbench",
        goal="2 workers / 1 worker TPS >= 1.3",
        variants=(
            sc.pgbench_variant(
                "broker-workers",
                sc.PG_BROKER + ", workers: 2",
                sc.SELECT_ONLY,
                clients=16,
                log=False,
            ),
            sc.pgbench_variant(
                "broker", sc.PG_BROKER + ", workers: 1", sc.SELECT_ONLY, clients=16, log=False
            ),
        ),
        verdict=_scaling("broker-workers", "broker", 1.3, "2 workers / 1 worker TPS"),
        unit="tps",
    ),
    sc.Scenario(
        key="http-workers",
        title="HTTP, trivial upstream (nginx return 200), 32 keep-alive connections: "
        "workers: 2 vs workers: 1",
        tool="bench/loadgen.py (mTLS, 2 processes x 16 connections)",
        goal="2 workers / 1 worker req/s >= 1.3",
        variants=(
            sc.loadgen_variant(
                "broker-workers",
                "sidekey workers: 2 -> nginx upstream",
                "broker-workers",
                _workers_port("http-trivial"),
            ),
            sc.loadgen_variant(
                "broker",
                "sidekey workers: 1 -> nginx upstream",
                "broker",
                sc._broker("http-trivial"),
            ),
        ),
        verdict=_scaling("broker-workers", "broker", 1.3, "2 workers / 1 worker req/s"),
        unit="req/s",
    ),
)
