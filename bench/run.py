"""`make bench`: the broker against direct, PgBouncer and nginx baselines, all on loopback.

Starts every server once under one temp dir (OpenBao dev, a durable PostgreSQL 15 cluster,
PgBouncer, two nginx, an aiohttp upstream, and the broker as ``sidekey run --config``), runs
each scenario's variants interleaved (A, B, A, B, ...) for several repetitions, takes each
figure's median, prints a table and writes bench/results.json. Every process it started is
stopped by PID at the end, on failure and on Ctrl-C.

Environment knobs (all optional):

    BENCH_QUICK=1       every scenario briefly (2 s runs, 2 repetitions): a smoke check
    BENCH_DURATION=15   seconds per measured run          BENCH_REPS=3   repetitions
    BENCH_WARMUP=3      seconds of unmeasured warm-up per variant before the first repetition
    BENCH_SCALE=16      pgbench scale factor (16 branches: no row contention at -c16)
    BENCH_ONLY=pg-cpu,http-trivial   run only these scenarios (keys in bench/scenarios.py)
    BENCH_PIN=none      none (default): nothing pinned. proxy: the proxy under test (broker,
                        PgBouncer, nginx proxy) on CPU 0; isolate: proxy on CPU 0, everything
                        else on the other CPUs. "Per core" figures never depend on pinning:
                        they are operations per CPU-second of a single-threaded process
                        (utime+stime), and pinning costs the latency rows a cross-CPU wake-up
                        per hop (measured, -c1: PgBouncer +85 us pinned vs +31 us unpinned)
    BENCH_PROFILE=1     afterwards, profile the broker with py-spy (pip install py-spy into
                        .venv) under the PG CPU-bound and HTTP trivial loads; raw collapsed
                        stacks go to bench/profile/ (BENCH_PROFILE=native: with C frames)
    BENCH_QUIET_WAIT=60 seconds a full run waits, before each scenario, for other work on the
                        box to stop (0 in quick runs); it goes on regardless afterwards
    BENCH_KEEP=1        keep the temp dir (logs, configs, pgbench logs) even on success
    BENCH_OUT=path      where to write the JSON (default bench/results.json)
    BENCH_CALLGRIND=1   count instructions instead of seconds: the broker runs under
                        valgrind's callgrind (instrumentation on only inside each measured
                        window), only the broker's variants run, and the table gives its
                        instructions per operation. They repeat to ~1 % on a VM where CPU
                        seconds per request moved 60 % between repetitions: the way to judge
                        a data-path change. Rates are ~50x lower under valgrind and mean
                        nothing; no goals are judged. Default BENCH_OUT bench/callgrind.json
    BENCH_OPENSSL=dir   every process the bench starts (broker, PostgreSQL, PgBouncer, nginx,
                        pgbench, psql, the load generators) loads libssl/libcrypto from
                        dir/lib instead of the system's (LD_LIBRARY_PATH; OpenSSL 3.x keeps
                        one ABI). `make bench-openssl` builds Debian 13's OpenSSL 3.5 with
                        scripts/build-openssl.sh and runs the bench on it; the JSON records
                        which libssl each server really mapped. Default BENCH_OUT
                        bench/results-openssl.json
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import platform
import shutil
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import credbench, jwtbench, scenarios, servers
from bench.scenarios import Env, Measurement, Probe, Scenario, Summary, Variant, Verdict

# Goals of the credential-path row.
CACHE_HIT_GOAL_US = 10.0
VAULT_CALLS_PER_CONNECTION_GOAL = 0.0


@dataclass(frozen=True)
class Settings:
    quick: bool
    duration: float
    reps: int
    warmup: float
    scale: int
    pin: str
    proxy_cpus: frozenset[int] | None
    other_cpus: frozenset[int] | None
    profile: bool
    only: tuple[str, ...]
    keep: bool
    quiet_wait: float
    out: Path
    callgrind: bool
    openssl: Path | None


def settings_from_env() -> Settings:
    quick = os.environ.get("BENCH_QUICK", "") not in ("", "0")
    pin = os.environ.get("BENCH_PIN", "none")
    cpus = sorted(os.sched_getaffinity(0))
    proxy_cpus: frozenset[int] | None = None
    other_cpus: frozenset[int] | None = None
    if pin in ("proxy", "isolate") and len(cpus) >= 2:
        proxy_cpus = frozenset(cpus[:1])
        if pin == "isolate":
            other_cpus = frozenset(cpus[1:])
    elif pin not in ("proxy", "isolate", "none"):
        raise servers.BenchError(f"BENCH_PIN: proxy, isolate or none, got {pin!r}")
    only = tuple(k for k in os.environ.get("BENCH_ONLY", "").split(",") if k)
    callgrind = os.environ.get("BENCH_CALLGRIND", "") not in ("", "0")
    if callgrind and not (shutil.which("valgrind") and shutil.which("callgrind_control")):
        raise servers.BenchError("BENCH_CALLGRIND needs valgrind: apt-get install valgrind")
    default_out = "callgrind.json" if callgrind else "results.json"
    openssl = None
    if os.environ.get("BENCH_OPENSSL"):
        openssl = Path(os.environ["BENCH_OPENSSL"]).resolve()
        if not (openssl / "lib" / "libssl.so.3").exists():
            raise servers.BenchError(
                f"BENCH_OPENSSL: no lib/libssl.so.3 under {openssl} (scripts/build-openssl.sh "
                "builds one)"
            )
        if not callgrind:
            default_out = "results-openssl.json"
    known = {s.key for s in scenarios.SCENARIOS} | {"credentials"}
    unknown = [k for k in only if k not in known]
    if unknown:
        raise servers.BenchError(f"BENCH_ONLY: unknown {unknown}; known: {sorted(known)}")
    return Settings(
        quick=quick,
        # pgbench -T takes whole seconds.
        duration=float(int(os.environ.get("BENCH_DURATION", "2" if quick else "15"))),
        reps=max(2, int(os.environ.get("BENCH_REPS", "2" if quick else "3"))),
        warmup=float(os.environ.get("BENCH_WARMUP", "0" if quick else "3")),
        scale=int(os.environ.get("BENCH_SCALE", "2" if quick else "16")),
        pin=pin,
        proxy_cpus=proxy_cpus,
        other_cpus=other_cpus,
        profile=os.environ.get("BENCH_PROFILE", "") not in ("", "0"),
        only=only,
        keep=os.environ.get("BENCH_KEEP", "") not in ("", "0"),
        # Instruction counts do not depend on what else the box runs.
        quiet_wait=float(os.environ.get("BENCH_QUIET_WAIT", "0" if quick or callgrind else "60")),
        out=Path(os.environ.get("BENCH_OUT", str(servers.REPO / "bench" / default_out))),
        callgrind=callgrind,
        openssl=openssl,
    )


def say(text: str) -> None:
    print(text, flush=True)


# Other work on the box above this share of its CPUs (before the bench starts anything)
# makes every figure noisy: the bench warns and records it.
BACKGROUND_WARN_FRACTION = 0.10
# A run during which the hypervisor took this share of the CPUs is flagged in its line.
STEAL_WARN_PERCENT = 5.0
# How often a full run re-samples while it waits for the box to quieten (BENCH_QUIET_WAIT).
QUIET_POLL_SECONDS = 2.0


def quiet_check(
    seconds: float = 1.0, when: str = "before the bench started anything", *, warn: bool = True
) -> dict[str, Any]:
    """How busy the box is while the bench runs nothing (other users' work)."""
    before = servers.system_cpu_ticks()
    time.sleep(seconds)
    after = servers.system_cpu_ticks()
    busy = servers.busy_fraction(before, after)
    load = Path("/proc/loadavg").read_text().split()[:3]
    if warn and busy > BACKGROUND_WARN_FRACTION:
        say(
            f"bench: WARNING: the box is {busy:.0%} busy {when} (load average "
            f"{' '.join(load)}): figures will be noisy"
        )
    return {
        "busy_percent": round(busy * 100, 1),
        "steal_percent": round(servers.steal_fraction(before, after) * 100, 1),
        "loadavg": [float(x) for x in load],
    }


def wait_for_quiet(budget: float, key: str) -> dict[str, Any]:
    """With every bench server idle, whatever keeps the CPUs busy is someone else's work: wait
    up to `budget` seconds for it to drop below the warning level, then go on regardless."""
    deadline = time.monotonic() + budget
    waited = 0.0
    while True:
        sample = quiet_check(0.5, f"with every bench server idle (before {key})", warn=False)
        if sample["busy_percent"] <= BACKGROUND_WARN_FRACTION * 100:
            break
        if time.monotonic() >= deadline:
            say(
                f"bench: WARNING: the box is {sample['busy_percent']:.0f}% busy with every "
                f"bench server idle (before {key}, waited {waited:.0f}s): figures will be noisy"
            )
            break
        time.sleep(QUIET_POLL_SECONDS)
        waited += QUIET_POLL_SECONDS + 0.5
    sample["waited_seconds"] = round(waited, 1)
    return sample


# --------------------------------------------------------------------------- setup


def setup(settings: Settings, tools: dict[str, str], tmp: Path, procs: servers.Processes) -> Env:
    t0 = time.monotonic()
    other = settings.other_cpus
    say(f"setup: temp dir {tmp}")
    pki = servers.make_pki(tmp / "pki")
    bao = servers.start_openbao(procs, tools, tmp / "openbao")
    say(f"setup: OpenBao dev at {bao.address} (file audit device on)")
    pg = servers.start_postgres(procs, tools, tmp / "postgres", pki, other)
    say(f"setup: PostgreSQL {pg.version()} on 127.0.0.1:{pg.port} (durable); "
        f"pgbench -i -s {settings.scale}")  # fmt: skip
    servers.pgbench_init(pg, settings.scale)
    http_token = "bench-" + os.urandom(16).hex()
    servers.setup_vault(bao, pg, pki, http_token)
    bouncer = servers.start_pgbouncer(
        procs, tools=tools, base=tmp / "pgbouncer", pg=pg, pki=pki, cpus=settings.proxy_cpus
    )
    nginx_up = servers.start_nginx_upstream(
        procs, tools=tools, base=tmp / "nginx-upstream", pki=pki, token=http_token, cpus=other
    )
    upstream = servers.start_upstream(
        procs, base=tmp / "upstream", pki=pki, token=http_token, delay=0.010, cpus=other
    )
    http_upstreams = {"http-trivial": nginx_up.ports["plain"], "http-slow": upstream.plain_port}
    nginx_proxy = servers.start_nginx_proxy(
        procs,
        tools=tools,
        base=tmp / "nginx-proxy",
        pki=pki,
        token=http_token,
        upstreams=http_upstreams,
        cpus=settings.proxy_cpus,
    )
    from bench import dbrows

    want = dbrows.needed(settings.only)
    redis = dbrows.start_redis(procs, tmp / "redis", pki, other) if want["redis"] else None
    mariadb = dbrows.start_mariadb(procs, tmp / "mariadb", pki, other) if want["mariadb"] else None
    if redis is not None or mariadb is not None:
        dbrows.setup_vault(bao, redis, mariadb, pki)
        say(f"setup: redis-server {redis is not None}, MariaDB {mariadb is not None}")
    extra_services, extra_ports = dbrows.broker_services(redis, mariadb, pki)
    grpc_upstream = None
    if not settings.only or "grpc-unary" in settings.only:
        grpc_upstream = servers.start_grpc_upstream(
            procs, base=tmp / "grpc-upstream", pki=pki, token=http_token, cpus=other
        )
        extra_ports = {**extra_ports, "grpc": servers.free_port()}
        extra_services = [*extra_services, servers.grpc_service(extra_ports["grpc"], grpc_upstream)]
        say(f"setup: grpc upstream on 127.0.0.1:{grpc_upstream.plain_port} (h2c), "
            f":{grpc_upstream.tls_port} (mTLS)")  # fmt: skip
    # The token issuer of the JWT rows: its JWKS is the broker's http-jwt service's keys.
    jwt_issuer = jwtbench.BenchIssuer(tmp / "jwt")
    jwt_token = jwt_issuer.mint("ES256", servers.LOADGEN_ID)
    config, ports, admin_port = servers.write_broker_config(
        tmp / "broker",
        pki,
        bao,
        pg,
        http_upstreams,
        extra_services=extra_services,
        jwt=(jwt_issuer.jwks_path, nginx_up.ports["plain"]),
    )
    ports.update(extra_ports)
    broker = servers.start_broker(
        procs,
        tools=tools,
        config=config,
        ports=ports,
        admin_port=admin_port,
        bao=bao,
        cpus=settings.proxy_cpus,
        callgrind=settings.callgrind,
    )
    say(f"setup: broker pid {broker.proc.pid} ready (pinned to CPUs "
        f"{sorted(settings.proxy_cpus) if settings.proxy_cpus else 'all'})")  # fmt: skip
    broker_asyncio = None
    if not settings.only or "pg-loop" in settings.only:
        # The pg-loop row's second broker: the same PostgreSQL services on asyncio's loop.
        config2, ports2, admin2 = servers.write_broker_config(
            tmp / "broker-asyncio", pki, bao, pg, {}, event_loop="asyncio"
        )
        broker_asyncio = servers.start_broker(
            procs, tools=tools, config=config2, ports=ports2, admin_port=admin2, bao=bao,
            cpus=settings.proxy_cpus,
        )  # fmt: skip
        say(f"setup: asyncio-loop broker pid {broker_asyncio.proc.pid} ready")
    broker_workers = None
    if not settings.only or {"pg-workers", "http-workers"} & set(settings.only):
        # The workers rows' second broker: the same services, `workers: 2`.
        config3, ports3, admin3 = servers.write_broker_config(
            tmp / "broker-workers", pki, bao, pg, http_upstreams, workers=2
        )
        broker_workers = servers.start_broker(
            procs, tools=tools, config=config3, ports=ports3, admin_port=admin3, bao=bao,
            cpus=settings.proxy_cpus,
        )  # fmt: skip
        say(f"setup: 2-worker broker pid {broker_workers.proc.pid} ready")
    env = Env(
        settings=settings,
        tools=tools,
        pki=pki,
        tmp=tmp,
        pg=pg,
        bao=bao,
        pgbouncer=bouncer,
        nginx_upstream=nginx_up,
        nginx_proxy=nginx_proxy,
        upstream=upstream,
        broker=broker,
        http_token=http_token,
        redis=redis,
        mariadb=mariadb,
        jwt_token=jwt_token,
        broker_asyncio=broker_asyncio,
        broker_workers=broker_workers,
        grpc_upstream=grpc_upstream,
    )
    smoke(env)
    say(f"setup: done in {time.monotonic() - t0:.1f}s; every path answered a smoke request")
    return env


def smoke(env: Env) -> None:
    """One query and one request down every path, so a broken path fails here, clearly."""
    targets = ["direct", "pgbouncer", "broker", "broker-plain", "broker-local", "pgbouncer-local"]
    if env.broker_asyncio is not None:
        targets.append("broker-asyncio")
    targets.append("broker-pool")
    if env.broker_workers is not None:
        targets.append("broker-workers")
    for target in targets:
        pg_env = scenarios._pg_env(env, target)
        result = subprocess.run(
            [env.tools["psql"], "-X", "-At", "-c", "SELECT current_user"],
            env=pg_env,
            capture_output=True,
            text=True,
            check=False,
            timeout=30,
        )
        if result.returncode != 0:
            raise servers.BenchError(f"psql via {target} failed: {result.stderr.strip()}")
    ctx = ssl.create_default_context(cafile=str(env.pki.bundle))
    ctx.load_cert_chain(env.pki.loadgen.cert, env.pki.loadgen.key)
    auth = {"Authorization": f"Bearer {env.http_token}"}
    paths = {
        "broker http-trivial": (env.broker.ports["http-trivial"], {}),
        "broker http-slow": (env.broker.ports["http-slow"], {}),
        "nginx proxy": (env.nginx_proxy.ports["http-trivial"], {}),
        "nginx proxy slow": (env.nginx_proxy.ports["http-slow"], {}),
        "nginx upstream": (env.nginx_upstream.ports["tls"], auth),
        "aiohttp upstream": (env.upstream.tls_port, auth),
    }
    for name, (port, headers) in paths.items():
        conn = http.client.HTTPSConnection("localhost", port, context=ctx, timeout=10)
        try:
            conn.request("GET", "/", headers=headers)
            resp = conn.getresponse()
            body = resp.read()
        except OSError as exc:
            raise servers.BenchError(f"GET via {name} failed: {exc}") from None
        finally:
            conn.close()
        if resp.status != 200:
            raise servers.BenchError(f"GET via {name}: {resp.status} {body[:200]!r}")
        if name == "broker http-trivial":
            framing = resp.getheader("Transfer-Encoding") or (
                f"Content-Length {resp.getheader('Content-Length')}"
            )
            say(f"setup: the broker answers a 3-byte upstream body with framing: {framing}")


def versions(env: Env) -> dict[str, str]:
    def first_line(cmd: list[str]) -> str:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
            return (r.stdout or r.stderr).strip().splitlines()[0]
        return "unknown"

    import aiohttp

    try:
        import uvloop

        uvloop_version = str(getattr(uvloop, "__version__", "unknown"))
    except ImportError:
        uvloop_version = "not installed"
    python = str(servers.VENV_BIN / "python")
    return {
        "python": platform.python_version(),
        # What the broker's Python loads at run time (BENCH_OPENSSL changes it), and which
        # libssl each TLS server has mapped: proof of what was measured.
        "openssl": first_line([python, "-c", "import ssl; print(ssl.OPENSSL_VERSION)"]),
        "libssl_mapped": {
            "broker": servers.mapped_libssl(env.broker.proc.pid),
            "postgresql": servers.mapped_libssl(env.pg.proc.pid),
            "pgbouncer": servers.mapped_libssl(env.pgbouncer.proc.pid),
            "nginx-proxy": servers.mapped_libssl(env.nginx_proxy.proc.pid),
        },
        "postgresql": env.pg.version(),
        "pgbench": first_line([env.tools["pgbench"], "--version"]),
        "uvloop": uvloop_version,
        "aiohttp": aiohttp.__version__,
        "pgbouncer": first_line([env.tools["pgbouncer"], "-V"]),
        "nginx": first_line([env.tools["nginx"], "-v"]),
        "openbao": first_line([env.tools["bao"], "version"]),
        "kernel": platform.release(),
        "cpu": _cpu_model(),
        "cpus": str(os.cpu_count()),
    }


def code_state() -> dict[str, Any]:
    """Which broker was measured: HEAD, and a hash of broker/ and adapters/ as they are on
    disk (uncommitted edits included), since the numbers belong to that code."""
    import hashlib

    def git(*args: str) -> str:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            r = subprocess.run(
                ["git", *args],
                cwd=servers.REPO,
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
            )
            return r.stdout.rstrip()  # status lines start with a space: keep it
        return ""

    digest = hashlib.sha256()
    for package in ("broker", "adapters"):
        for path in sorted((servers.REPO / package).rglob("*.py")):
            digest.update(str(path.relative_to(servers.REPO)).encode() + b"\0")
            digest.update(path.read_bytes())
    dirty = [line[3:] for line in git("status", "--porcelain", "broker", "adapters").splitlines()]
    return {"head": git("rev-parse", "--short", "HEAD").strip(), "uncommitted": dirty,
            "sources_sha256": digest.hexdigest()[:16]}  # fmt: skip


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


# --------------------------------------------------------------------------- running


@dataclass
class Outcome:
    scenario: Scenario
    summaries: dict[str, Summary]
    verdict: Verdict | None
    error: str | None = None
    background: dict[str, Any] | None = None


def _fmt_rate(value: float | None, unit: str) -> str:
    return "n/a" if value is None else f"{value:,.0f} {unit}"


def _fmt_us(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value / 1000:.2f}ms" if value >= 1000 else f"{value:.0f}us"


def measured_variants(settings: Settings, scenario: Scenario) -> tuple[Variant, ...]:
    """Every variant; under BENCH_CALLGRIND only the broker's (the baselines' seconds would
    be set against a broker slowed ~50x)."""
    if settings.callgrind:
        return tuple(v for v in scenario.variants if v.proxy == "broker")
    return scenario.variants


def run_scenario(env: Env, scenario: Scenario, counter: list[int], total: int) -> Outcome:
    s = env.settings
    variants = measured_variants(s, scenario)
    runs: dict[str, list[Measurement]] = {v.name: [] for v in variants}
    background = wait_for_quiet(s.quiet_wait, scenario.key)
    try:
        if s.warmup > 0:
            for variant in variants:
                if scenario.prepare:
                    scenario.prepare(env)
                variant.run(env, Probe(env, None), s.warmup)
                say(f"         {scenario.key:<13} {variant.name:<12} warm-up {s.warmup:.0f}s")
        for rep in range(s.reps):
            for variant in variants:
                if scenario.prepare:
                    scenario.prepare(env)
                m = variant.run(env, Probe(env, variant.proxy), s.duration)
                runs[variant.name].append(m)
                counter[0] += 1
                cpu = m.cpu_us_per_op
                who = variant.proxy or "process"
                extra = f"  {who} CPU {cpu:.1f}us/op" if cpu is not None else ""
                if "instructions_per_op" in m.extra:
                    extra = f"  {m.extra['instructions_per_op']:,} instructions/op"
                if m.vault_requests is not None:
                    extra += f"  OpenBao calls {m.vault_requests}"
                if m.errors:
                    extra += f"  errors {m.errors}"
                if m.extra.get("cpu_steal_percent", 0) >= STEAL_WARN_PERCENT:
                    extra += f"  (hypervisor stole {m.extra['cpu_steal_percent']:.0f}% of the CPUs)"
                if "warning" in m.extra:
                    extra += f"  ({m.extra['warning']})"
                say(
                    f"[{counter[0]:>3}/{total}] {scenario.key:<13} {variant.name:<12} "
                    f"rep {rep + 1}/{s.reps}  {_fmt_rate(m.rate, scenario.unit):>16}  "
                    f"p50 {_fmt_us(m.p50_us):>7}  p99 {_fmt_us(m.p99_us):>7}{extra}"
                )
    except (servers.BenchError, subprocess.SubprocessError, OSError, ValueError) as exc:
        say(f"  !! {scenario.key}: {exc}")
        if not env.broker.proc.alive:
            say(f"  !! the broker exited:\n{env.broker.proc.tail()}")
        summaries = {v.name: Summary(v, runs[v.name]) for v in variants}
        return Outcome(scenario, summaries, None, str(exc), background)
    summaries = {v.name: Summary(v, runs[v.name]) for v in variants}
    verdict = None if s.callgrind else scenario.verdict(summaries)
    return Outcome(scenario, summaries, verdict, None, background)


def _time_driven(call: str) -> bool:
    """OpenBao calls a clock causes, not a connection: the KV cache's refresh-ahead (every
    0.75 x ttl per service), lease renewals/idle revocations of the lease manager, and the
    token keeper's own renewals and its check of the token when no call has shown it valid
    for TOKEN_CHECK_SECONDS (the same ~27 lookups per row whether it served 48 connections
    or 41,326)."""
    return call.startswith(
        ("read secret/data/", "update sys/leases/renew", "update sys/leases/revoke",
         "read auth/token/lookup-self", "update auth/token/renew-self")
    )  # fmt: skip


def credential_path(env: Env, outcomes: list[Outcome]) -> dict[str, Any]:
    """OpenBao calls per connection over every measured broker run, and the cache-hit cost."""
    by_scenario: dict[str, dict[str, Any]] = {}
    calls: Counter[str] = Counter()
    connections = 0
    for outcome in outcomes:
        for variant, summary in outcome.summaries.items():
            if summary.variant.proxy != "broker":
                continue
            row_calls: Counter[str] = Counter()
            row_connections = 0
            fetches = 0.0
            for m in summary.runs:
                row_calls.update(m.vault_paths or {})
                row_connections += m.connections
                fetches += m.credential_fetches or 0
            by_scenario[f"{outcome.scenario.key}/{variant}"] = {
                "connections": row_connections,
                "openbao_calls": dict(row_calls),
                "sidekey_credential_fetches": fetches,
            }
            calls.update(row_calls)
            connections += row_connections
    per_connection = sum(n for c, n in calls.items() if not _time_driven(c))
    time_driven = sum(n for c, n in calls.items() if _time_driven(c))
    ratio = per_connection / connections if connections else None
    say("credentials: timing cache hits in-process (CachedSource, LeaseManager)")
    timing = credbench.measure(env.bao.address, env.bao.token)
    hit = timing["cached_source_use_us"]
    passed = ratio == VAULT_CALLS_PER_CONNECTION_GOAL and hit <= CACHE_HIT_GOAL_US
    shown = "n/a" if ratio is None else f"{ratio:g}"
    return {
        "connections": connections,
        "openbao_calls": dict(calls),
        "connection_driven_calls": per_connection,
        "time_driven_calls": time_driven,
        "openbao_calls_per_connection": ratio,
        "by_run": by_scenario,
        "cache_hit": timing,
        "verdict": {
            "text": f"{shown} calls/conn ({per_connection} in {connections:,} conns; "
            f"+{time_driven} TTL-driven); hit {hit:.2f} us, lease hit "
            f"{timing.get('lease_manager_use_us', 0):.2f} us",
            "goal": f"0 calls/conn; hit <= {CACHE_HIT_GOAL_US:.0f} us",
            "passed": passed,
        },
    }


# --------------------------------------------------------------------------- profiling


def profile(env: Env) -> dict[str, Any]:
    """py-spy on the running broker under the PG CPU-bound (TCP+mTLS and the unix-socket
    sidecar path), churn, HTTP trivial and handshake loads."""
    py_spy = servers.VENV_BIN / "py-spy"
    if not py_spy.exists():
        raise servers.BenchError("BENCH_PROFILE=1 needs py-spy: .venv/bin/pip install py-spy")
    out_dir = servers.REPO / "bench" / "profile"
    out_dir.mkdir(exist_ok=True)
    # The broker variant of each: the steady relay, connection set-up, HTTP, TLS handshakes.
    loads = {
        key: scenarios.SCENARIOS_BY_KEY[key].variants[0]
        for key in ("pg-cpu", "pg-local", "pg-churn", "http-trivial", "handshake")
    }
    duration = max(env.settings.duration, 10.0)
    native = os.environ.get("BENCH_PROFILE") == "native"
    report: dict[str, Any] = {}
    for key, variant in loads.items():
        raw = out_dir / f"{key}{'-native' if native else ''}.txt"
        spy = subprocess.Popen(
            [str(py_spy), "record", "--pid", str(env.broker.proc.pid), "--rate", "200",
             "--duration", str(int(duration) + 1), "--format", "raw",
             "--output", str(raw), *(["--native"] if native else ["--nonblocking"])],
            stdout=subprocess.DEVNULL,
            stderr=(env.tmp / f"py-spy-{key}.log").open("w"),
        )  # fmt: skip
        try:
            m = variant.run(env, Probe(env, "broker"), duration)
            spy.wait(timeout=duration + 30)
        finally:
            if spy.poll() is None:
                spy.kill()
                spy.wait()
        if not raw.exists():
            err = (env.tmp / f"py-spy-{key}.log").read_text()[-800:]
            raise servers.BenchError(f"py-spy produced nothing: {err}")
        report[key] = {
            "rate": m.rate,
            "cpu_us_per_op": m.cpu_us_per_op,
            "raw_stacks": str(raw.relative_to(servers.REPO)),
            **summarize_stacks(raw),
        }
        say(f"profile: {key}: {m.rate:,.0f} ops/s under py-spy, stacks in {raw}")
    return report


def summarize_stacks(raw: Path, top: int = 25) -> dict[str, Any]:
    """Self and inclusive sample shares per function from py-spy's collapsed stacks."""
    self_samples: Counter[str] = Counter()
    self_functions: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f for f in stack.split(";") if f]
        if not frames:
            continue
        # Skip the process/thread header py-spy puts first ("process 123:..." / "thread ...").
        frames = [f for f in frames if not f.startswith(("process ", "thread "))]
        total += count
        if frames:
            self_samples[frames[-1]] += count
            self_functions[_function(frames[-1])] += count
        for function in {_function(f) for f in frames}:
            inclusive[function] += count

    def share(counter: Counter[str]) -> list[dict[str, Any]]:
        return [
            {"function": name, "share": round(n / total, 4)} for name, n in counter.most_common(top)
        ]

    return {
        "samples": total,
        "self_by_line": share(self_samples),
        "self_by_function": share(self_functions),
        "inclusive_by_function": share(inclusive),
    }


def _function(frame: str) -> str:
    """'name (path:line)' -> 'name (path)': py-spy's frames carry the line."""
    name, _, where = frame.partition(" (")
    return f"{name} ({where.rsplit(':', 1)[0]})" if where else name


# --------------------------------------------------------------------------- report


def print_instructions(outcomes: list[Outcome]) -> None:
    say("")
    say("The broker's instructions per operation under callgrind (median; every repetition)")
    for o in outcomes:
        for name, summary in o.summaries.items():
            each = [m.extra["instructions_per_op"] for m in summary.runs]
            if each:
                say(f"{o.scenario.key:<13} {name:<12} {statistics.median(each):>12,.0f}   "
                    f"({', '.join(f'{n:,}' for n in each)})")  # fmt: skip
            else:
                say(f"{o.scenario.key:<13} {name:<12} {'ERROR':>12}   {(o.error or '')[:60]}")


def print_tables(outcomes: list[Outcome], creds: dict[str, Any] | None) -> None:
    say("")
    say("Per variant (median of repetitions; CPU = the proxy's utime+stime per operation)")
    header = f"{'scenario':<13} {'variant':<12} {'rate':>16} {'p50':>8} {'p99':>8} " + (
        f"{'proxy CPU/op':>13} {'ops/core-s':>11}"
    )
    say(header)
    say("-" * len(header))
    for o in outcomes:
        for name, summary in o.summaries.items():
            cpu = summary.cpu_us_per_op
            say(
                f"{o.scenario.key:<13} {name:<12} "
                f"{_fmt_rate(summary.rate if summary.runs else None, o.scenario.unit):>16} "
                f"{_fmt_us(summary.p50_us):>8} {_fmt_us(summary.p99_us):>8} "
                f"{(f'{cpu:.1f}us' if cpu else '-'):>13} "
                f"{(f'{1e6 / cpu:,.0f}' if cpu else '-'):>11}"
            )
    say("")
    say("Goals")
    header = f"{'scenario':<13} {'figure':<36} {'result':<34} {'goal':<30} {'':<4} tool"
    say(header)
    say("-" * len(header))
    for o in outcomes:
        v = o.verdict
        if v is None:
            say(f"{o.scenario.key:<13} {'ERROR':<36} {(o.error or '')[:60]}")
            continue
        mark = {True: "PASS", False: "FAIL", None: "-"}[v.passed]
        say(f"{o.scenario.key:<13} {v.figure:<36} {v.text:<34} {v.goal:<30} {mark:<4} "
            f"{o.scenario.tool}")  # fmt: skip
        for note in v.notes:
            say(f"{'':<13} {'':<36} ({note})")
    if creds is not None:
        v = creds["verdict"]
        mark = "PASS" if v["passed"] else "FAIL"
        say(f"{'credentials':<13} {'OpenBao calls/conn; cache-hit cost':<36} {v['goal']:<30} "
            f"{mark:<4} OpenBao audit log + in-process timing")  # fmt: skip
        say(f"{'':<13} {v['text']}")


def results_json(
    settings: Settings,
    *,
    background: dict[str, Any],
    code: dict[str, Any],
    env: Env,
    outcomes: list[Outcome],
    creds: dict[str, Any] | None,
    prof: dict[str, Any] | None,
    started: float,
) -> dict[str, Any]:
    return {
        "generated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "wall_seconds": round(time.monotonic() - started, 1),
        "settings": {
            "quick": settings.quick,
            "duration_seconds": settings.duration,
            "repetitions": settings.reps,
            "warmup_seconds": settings.warmup,
            "pgbench_scale": settings.scale,
            "pin": settings.pin,
            "proxy_cpus": sorted(settings.proxy_cpus) if settings.proxy_cpus else None,
            "other_cpus": sorted(settings.other_cpus) if settings.other_cpus else None,
            "order": "variants interleaved within each repetition (A, B, A, B, ...)",
            "cpu_source": "/proc/<pid>/stat utime+stime deltas over each run's window",
            "callgrind": settings.callgrind,
            "openssl_dir": str(settings.openssl) if settings.openssl else None,
        },
        "background_before_start": background,
        "loadavg_at_end": [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]],
        "versions": versions(env),
        "code": code,
        "scenarios": {
            o.scenario.key: {
                "title": o.scenario.title,
                "tool": o.scenario.tool,
                "goal": o.scenario.goal,
                "unit": o.scenario.unit,
                "error": o.error,
                "background_before": o.background,
                "verdict": None
                if o.verdict is None
                else {
                    "figure": o.verdict.figure,
                    "value": o.verdict.value,
                    "text": o.verdict.text,
                    "goal": o.verdict.goal,
                    "passed": o.verdict.passed,
                    **o.verdict.extra,
                },
                "variants": {name: s.as_json() for name, s in o.summaries.items()},
            }
            for o in outcomes
        },
        "credentials": creds,
        "profile": prof,
    }


# --------------------------------------------------------------------------- main


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> int:
    started = time.monotonic()
    signal.signal(signal.SIGTERM, _terminate)
    try:
        settings = settings_from_env()
        tools = servers.require_tools()
    except servers.BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    selected = [s for s in scenarios.SCENARIOS if not settings.only or s.key in settings.only]
    total = sum(len(measured_variants(settings, s)) for s in selected) * settings.reps
    say(f"bench: {'quick' if settings.quick else 'full'} run: {len(selected)} scenarios, "
        f"{total} measured runs of {settings.duration:.0f}s, {settings.reps} repetitions, "
        f"pin={settings.pin}")  # fmt: skip
    if settings.openssl:
        # Inherited by every process the bench starts (pgbench's minimal env copies it).
        os.environ["LD_LIBRARY_PATH"] = str(settings.openssl / "lib")
        say(f"bench: every process loads OpenSSL from {settings.openssl / 'lib'}")
    background = quiet_check()
    code = code_state()  # before the broker starts: the code it runs
    tmp = Path(tempfile.mkdtemp(prefix="sidekey-bench-"))
    tmp.chmod(0o755)  # the postgres account must reach its directories inside
    procs = servers.Processes()
    ok = False
    try:
        env = setup(settings, tools, tmp, procs)
        counter = [0]
        outcomes = [run_scenario(env, s, counter, total) for s in selected]
        creds = None
        if settings.callgrind:
            prof = None
            print_instructions(outcomes)
        else:
            if not settings.only or "credentials" in settings.only or len(selected) > 1:
                creds = credential_path(env, outcomes)
            prof = profile(env) if settings.profile else None
            print_tables(outcomes, creds)
        data = results_json(
            settings,
            background=background,
            code=code,
            env=env,
            outcomes=outcomes,
            creds=creds,
            prof=prof,
            started=started,
        )
        settings.out.write_text(json.dumps(data, indent=2) + "\n")
        say(f"\nwrote {settings.out} ({time.monotonic() - started:.0f}s in all)")
        ok = all(o.error is None for o in outcomes)
        return 0 if ok else 1
    except servers.BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted; stopping every server it started", file=sys.stderr)
        return 130
    finally:
        # Ignore a second Ctrl-C while stopping: a half-stopped run leaves servers behind.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        procs.stop_all()
        if ok and not settings.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"bench: logs and configs kept in {tmp}", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
