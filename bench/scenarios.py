"""The scenarios of `make bench`: a table of small functions, one row per issue row.

A `Scenario` has variants (the broker and its baselines), an optional `prepare` run before
every measured run, and a `verdict` that turns the variants' medians into the row's figure
and its goal. Add a row by writing a variant function (or reusing `pgbench_variant` /
`loadgen_variant`) and appending a `Scenario` to `SCENARIOS`.

Each variant run gets a `Probe` and calls `start()`/`stop()` around its measurement window;
the probe records the CPU time (utime + stime from /proc/<pid>/stat) of the proxy under test
and, for the broker, OpenBao's audit-log request count and the broker's own
``sidekey_credential_fetches`` counter. Under BENCH_CALLGRIND it also counts the broker's
instructions: from `start()` to `stop()`, or, for pgbench, from when all its sessions are
open to shortly before its run ends (`_count_pgbench_window`).
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import servers
from bench.loadgen import percentile

# How long before a load generator's window opens: Python start-up, imports, and the TLS
# handshakes of every keep-alive connection (measured ~0.4 s for 16; doubled, plus margin).
LOADGEN_STARTUP_SECONDS = 1.5
# A tool still running this long after its window closed is stuck: killed, the run fails.
TOOL_GRACE_SECONDS = 60.0


# --------------------------------------------------------------------------- types


@dataclass
class Env:
    """What a variant needs: the running servers and the settings."""

    settings: Any  # run.Settings
    tools: Mapping[str, str]
    pki: servers.Pki
    tmp: Path
    pg: servers.Postgres
    bao: servers.OpenBao
    pgbouncer: servers.PgBouncer
    nginx_upstream: servers.Nginx
    nginx_proxy: servers.Nginx
    upstream: servers.Upstream
    broker: servers.Broker
    http_token: str
    # A JWT-SVID of the load generator's ID for the broker's http-jwt service (ES256).
    jwt_token: str = ""
    run_counter: int = 0
    # The servers of the MySQL and Redis rows (bench/dbrows.py), when one is selected.
    redis: Any = None
    mariadb: Any = None
    # The same broker on asyncio's own event loop (the pg-loop row), when it is selected.
    broker_asyncio: Any = None
    # The same broker with `workers: 2` (bench/scalerows.py), when one of its rows is.
    broker_workers: Any = None
    # The grpcio server of the grpc-unary row (bench/h2bench.py), when it is selected.
    grpc_upstream: Any = None

    def run_dir(self, name: str) -> Path:
        self.run_counter += 1
        path = self.tmp / "runs" / f"{self.run_counter:03d}-{name}"
        path.mkdir(parents=True)
        return path


@dataclass
class Measurement:
    ops: int  # transactions, responses or handshakes completed in the window
    seconds: float
    rate: float  # ops per second (pgbench's own tps where pgbench reports it)
    p50_us: float | None = None
    p99_us: float | None = None
    connections: int = 0  # client connections opened towards the target
    errors: int = 0
    proxy_cpu_s: float | None = None
    vault_requests: int | None = None  # OpenBao audit-log requests in the window (broker)
    vault_paths: dict[str, int] | None = None  # the same, by "operation path"
    credential_fetches: float | None = None  # broker's sidekey_credential_fetches delta
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def cpu_us_per_op(self) -> float | None:
        if self.proxy_cpu_s is None or not self.ops:
            return None
        return self.proxy_cpu_s / self.ops * 1e6

    def as_json(self) -> dict[str, Any]:
        data = {k: v for k, v in self.__dict__.items() if k != "extra"}
        data["cpu_us_per_op"] = self.cpu_us_per_op
        data.update(self.extra)
        return data


class Probe:
    """Measures the proxy under test across a run's window."""

    def __init__(self, env: Env, proxy: str | None) -> None:
        self.env = env
        self.proxy = proxy
        self._cpu0 = (0.0, 0.0)
        self._audit0 = 0
        self._fetch0 = 0.0
        self._sys0 = (0, 0, 0)
        self.system_busy: float | None = None
        self.steal: float | None = None
        self.cpu_s: float | None = None
        self.sys_share: float | None = None
        self.vault_requests: int | None = None
        self.vault_paths: dict[str, int] | None = None
        self.fetches: float | None = None
        # BENCH_CALLGRIND: the broker's instructions between count_start() and count_stop(),
        # and that window in wall-clock seconds since the epoch (pgbench logs its
        # transactions' times in the same clock).
        self.instructions: int | None = None
        self.window: tuple[float, float] = (0.0, 0.0)
        self._counting = False

    @property
    def counts_instructions(self) -> bool:
        return self.proxy == "broker" and self.env.settings.callgrind

    def count_start(self) -> None:
        self.env.broker.callgrind_start()
        self.window = (time.time(), 0.0)
        self._counting = True

    def count_stop(self) -> None:
        self.instructions = self.env.broker.callgrind_stop()
        self.window = (self.window[0], time.time())
        self._counting = False

    def _cpu(self) -> tuple[float, float]:
        env = self.env
        if self.proxy == "broker":
            return env.broker.cpu_split()
        if self.proxy == "pgbouncer":
            return servers.cpu_split(env.pgbouncer.proc.pid)
        if self.proxy == "broker-asyncio":
            return env.broker_asyncio.cpu_split()
        if self.proxy == "broker-workers":
            return env.broker_workers.cpu_split()
        if self.proxy == "nginx-proxy":
            return env.nginx_proxy.cpu_split()
        raise ValueError(self.proxy)

    def start(self, *, count: bool = True) -> None:
        """Open the window; `count=False` leaves the instruction count to `count_start()`."""
        if self.proxy == "broker":
            self._audit0 = self.env.bao.audit_offset()
            self._fetch0 = self.env.broker.metric_sum("sidekey_credential_fetches_total")
        if self.proxy is not None:
            self._cpu0 = self._cpu()
        self._sys0 = servers.system_cpu_ticks()
        if count and self.counts_instructions:  # last: the probe's admin requests stay out
            self.count_start()

    def stop(self) -> None:
        if self._counting:
            self.count_stop()
        now = servers.system_cpu_ticks()
        self.system_busy = servers.busy_fraction(self._sys0, now)
        self.steal = servers.steal_fraction(self._sys0, now)
        if self.proxy is not None:
            user, system = self._cpu()
            user, system = user - self._cpu0[0], system - self._cpu0[1]
            self.cpu_s = user + system
            # The kernel's share (syscalls, loopback TCP): what no Python change can remove.
            self.sys_share = system / self.cpu_s if self.cpu_s else None
        if self.proxy == "broker":
            paths = self.env.bao.audit_requests(self._audit0)
            self.vault_paths = dict(paths)
            self.vault_requests = sum(paths.values())
            self.fetches = self.env.broker.metric_sum("sidekey_credential_fetches_total") - (
                self._fetch0
            )

    def fill(self, m: Measurement, window_ops: int | None = None) -> Measurement:
        """Copy the probe's figures into `m`. `window_ops`: operations completed inside the
        instruction count's window, where the caller knows them exactly."""
        m.proxy_cpu_s = self.cpu_s
        m.vault_requests = self.vault_requests
        m.vault_paths = self.vault_paths
        m.credential_fetches = self.fetches
        if self.sys_share is not None:
            m.extra["proxy_cpu_system_share"] = round(self.sys_share, 3)
        if self.system_busy is not None:
            # All CPUs, everything on the box: near 100% means the row was CPU-bound.
            m.extra["system_cpu_busy_percent"] = round(self.system_busy * 100, 1)
        if self.steal is not None:
            m.extra["cpu_steal_percent"] = round(self.steal * 100, 1)
        if self.instructions is not None:
            # Otherwise the tool's own window and the count's (opened and closed through
            # callgrind_control, a process start each) nearly match: scaled by their lengths.
            ops = window_ops
            if ops is None:
                ops = round(m.rate * (self.window[1] - self.window[0]))
            m.extra["instructions"] = self.instructions
            m.extra["instructions_window_ops"] = ops
            m.extra["instructions_per_op"] = round(self.instructions / ops) if ops else None
        return m


RunFn = Callable[[Env, Probe, float], Measurement]


@dataclass(frozen=True)
class Variant:
    name: str  # "broker", "direct", "pgbouncer", "nginx", ...
    label: str  # what the table says about it
    proxy: str | None  # whose CPU to count: "broker", "pgbouncer", "nginx-proxy" or None
    run: RunFn


@dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    tool: str
    goal: str
    variants: tuple[Variant, ...]
    verdict: Callable[[Mapping[str, Summary]], Verdict]
    prepare: Callable[[Env], None] | None = None
    unit: str = "ops/s"


@dataclass
class Summary:
    """The median of each figure over a variant's repetitions."""

    variant: Variant
    runs: list[Measurement]

    def _median(self, key: Callable[[Measurement], float | None]) -> float | None:
        values = [v for v in (key(m) for m in self.runs) if v is not None]
        return statistics.median(values) if values else None

    @property
    def rate(self) -> float:
        return self._median(lambda m: m.rate) or 0.0

    @property
    def p50_us(self) -> float | None:
        return self._median(lambda m: m.p50_us)

    @property
    def p99_us(self) -> float | None:
        return self._median(lambda m: m.p99_us)

    @property
    def cpu_us_per_op(self) -> float | None:
        return self._median(lambda m: m.cpu_us_per_op)

    def extra_median(self, key: str) -> float | None:
        """The median of one of the runs' `extra` figures (those that have it)."""
        return self._median(lambda m: m.extra.get(key))

    def as_json(self) -> dict[str, Any]:
        return {
            "label": self.variant.label,
            "proxy": self.variant.proxy,
            "median": {
                "rate": self.rate,
                "p50_us": self.p50_us,
                "p99_us": self.p99_us,
                "cpu_us_per_op": self.cpu_us_per_op,
                "ops_per_cpu_second": 1e6 / self.cpu_us_per_op if self.cpu_us_per_op else None,
            },
            "runs": [m.as_json() for m in self.runs],
        }


@dataclass
class Verdict:
    figure: str  # e.g. "broker / direct TPS"
    value: float | None
    text: str  # the figure as printed
    goal: str
    passed: bool | None  # None: reported only, no goal
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- pgbench


def _pg_env(env: Env, target: str) -> dict[str, str]:
    pki = env.pki
    base = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PGHOST": "127.0.0.1",
        "PGDATABASE": servers.DATABASE,
        "PGSSLMODE": "verify-full",
        "PGSSLROOTCERT": str(pki.bundle),
        "PGSSLCERT": str(pki.pgbench.cert),
        "PGSSLKEY": str(pki.pgbench.key),
        "PGCONNECT_TIMEOUT": "10",
        "PGAPPNAME": f"bench-{target}",
    }
    if "LD_LIBRARY_PATH" in os.environ:  # BENCH_OPENSSL
        base["LD_LIBRARY_PATH"] = os.environ["LD_LIBRARY_PATH"]
    if target == "broker-local":
        # The sidecar path: a unix socket, no TLS and no password (the kernel names pgbench).
        local = servers.local_socket_dir(env.broker.config.parent)
        return {**base, "PGHOST": str(local), "PGPORT": str(servers.LOCAL_SOCKET_PORT),
                "PGSSLMODE": "disable", "PGUSER": "bench"}  # fmt: skip
    if target == "pgbouncer-local":
        assert env.pgbouncer.socket_dir is not None
        return {
            **base, "PGHOST": str(env.pgbouncer.socket_dir), "PGPORT": str(env.pgbouncer.port),
            "PGSSLMODE": "disable", "PGUSER": servers.BENCH_USER,
            "PGPASSWORD": env.pg.passwords[servers.BENCH_USER],
        }  # fmt: skip
    if target == "broker-asyncio":
        port = env.broker_asyncio.ports["pg"]
        return {**base, "PGPORT": str(port), "PGUSER": "bench"}
    if target == "broker-workers":
        return {**base, "PGPORT": str(env.broker_workers.ports["pg"]), "PGUSER": "bench"}
    if target == "broker-pool":
        return {**base, "PGPORT": str(env.broker.ports["pg-pool"]), "PGUSER": "bench"}
    if target in ("broker", "broker-plain"):
        # The broker ignores the client's user name: the identity is the certificate's.
        port = env.broker.ports[_broker_service(target)]
        return {**base, "PGPORT": str(port), "PGUSER": "bench"}
    port = env.pg.port if target == "direct" else env.pgbouncer.port
    return {
        **base,
        "PGPORT": str(port),
        "PGUSER": servers.BENCH_USER,
        "PGPASSWORD": env.pg.passwords[servers.BENCH_USER],
    }


_TPS = re.compile(r"^tps = ([\d.]+)", re.MULTILINE)
_PROCESSED = re.compile(r"number of transactions actually processed: (\d+)")
_FAILED = re.compile(r"number of failed transactions: (\d+)")
_CONN_TIME = re.compile(r"average connection time = ([\d.]+) ms")


def run_pgbench(
    env: Env,
    probe: Probe,
    duration: float,
    *,
    target: str,
    args: list[str],
    log: bool,
    clients: int,
    reconnect: bool = False,
) -> Measurement:
    workdir = env.run_dir(f"pgbench-{target}")
    args = [_sleep_script(env) if a == SLEEP_SCRIPT else a for a in args]
    seconds = max(1, round(duration))
    cmd = [env.tools["pgbench"], "-n", "-T", str(seconds), *args]
    counting = probe.counts_instructions
    if log or counting:
        cmd += ["-l", f"--log-prefix={workdir}/tx"]
    probe.start(count=False)
    started = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        env=_pg_env(env, target),
        cwd=workdir,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_pin(env.settings.other_cpus),  # noqa: PLW1509
    )
    try:
        if counting:
            _count_pgbench_window(
                env,
                probe,
                proc,
                target=target,
                clients=clients,
                reconnect=reconnect,
                ends=started + seconds,
            )
        stdout, stderr = proc.communicate(timeout=duration + TOOL_GRACE_SECONDS)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    elapsed = time.monotonic() - started
    probe.stop()
    (workdir / "pgbench.out").write_text(stdout + "\n--- stderr\n" + stderr)
    tps = _TPS.search(stdout)
    processed = _PROCESSED.search(stdout)
    if proc.returncode != 0 or not tps or not processed:
        raise servers.BenchError(
            f"pgbench via {target} failed ({proc.returncode}): {(stderr or stdout).strip()[-1500:]}"
        )
    ops = int(processed.group(1))
    failed = _FAILED.search(stdout)
    m = Measurement(
        ops=ops,
        seconds=float(max(1, round(duration))),
        rate=float(tps.group(1)),
        connections=ops if reconnect else clients,
        errors=int(failed.group(1)) if failed else 0,
    )
    conn_time = _CONN_TIME.search(stdout)
    if conn_time:
        m.extra["avg_connection_ms"] = float(conn_time.group(1))
    m.extra["wall_seconds"] = round(elapsed, 3)
    if log:
        hist = _pgbench_latencies(workdir)
        m.p50_us = percentile(hist, 0.50)
        m.p99_us = percentile(hist, 0.99)
        m.extra["logged_transactions"] = sum(hist.values())
    window_ops = _pgbench_ended_within(workdir, probe.window) if counting else None
    return probe.fill(m, window_ops)


# A -c16 pgbench's connections through a broker under callgrind take seconds to open.
CALLGRIND_SESSIONS_SECONDS = 120.0
# The count's window closes this long before pgbench's -T ends: its disconnects stay out.
CALLGRIND_TAIL_SECONDS = 1.0


def _broker_service(target: str) -> str:
    """The broker's PostgreSQL service a pgbench target goes through."""
    return {"broker": "pg", "broker-local": "pg-local"}.get(target, "pg-plain")


def _count_pgbench_window(
    env: Env,
    probe: Probe,
    proc: subprocess.Popen[str],
    *,
    target: str,
    clients: int,
    reconnect: bool,
    ends: float,
) -> None:
    """Count the broker's instructions over pgbench's steady state: from when all `clients`
    sessions are open (at once for -C, where opening them is the work) to shortly before
    its -T runs out. pgbench's -l log then says how many transactions ended inside."""
    if not reconnect and not _sessions_open(env, proc, _broker_service(target), clients):
        return  # pgbench failed: its own error is the one to report
    probe.count_start()
    # pgbench's -T runs from when its connections are open: at least until `ends`.
    time.sleep(max(1.0, ends - time.monotonic() - CALLGRIND_TAIL_SECONDS))
    probe.count_stop()


def _sessions_open(env: Env, proc: subprocess.Popen[str], service: str, clients: int) -> bool:
    """Poll the broker until `clients` sessions of `service` are open; False if pgbench
    exited first."""
    deadline = time.monotonic() + CALLGRIND_SESSIONS_SECONDS
    while proc.poll() is None:
        active = env.broker.metric_sum("sidekey_sessions_active", service=service)
        if active >= clients:
            return True
        if time.monotonic() > deadline:
            raise servers.BenchError(f"only {active:.0f} of {clients} sessions opened")
        time.sleep(servers.POLL_SECONDS)
    return False


def _pgbench_ended_within(workdir: Path, window: tuple[float, float]) -> int:
    """Transactions in pgbench's -l logs that ended inside `window` (epoch seconds): the
    fifth and sixth columns are each one's end time, seconds and microseconds."""
    ended = 0
    for path in workdir.glob("tx.*"):
        with path.open("rb") as f:
            for line in f:
                parts = line.split()
                if (
                    len(parts) >= 6
                    and window[0] <= int(parts[4]) + int(parts[5]) / 1e6 <= window[1]
                ):
                    ended += 1
    return ended


def _pgbench_latencies(workdir: Path) -> Counter[int]:
    """Per-transaction latencies (us) from pgbench's -l logs: third column of each line."""
    hist: Counter[int] = Counter()
    for path in workdir.glob("tx.*"):
        with path.open("rb") as f:
            for line in f:
                parts = line.split(maxsplit=3)
                if len(parts) >= 3:
                    hist[int(parts[2])] += 1
    return hist


def _pin(cpus: frozenset[int] | None) -> Callable[[], None] | None:
    if not cpus:
        return None

    def setup() -> None:
        os.sched_setaffinity(0, cpus)

    return setup


def pgbench_variant(
    name: str,
    label: str,
    args: list[str],
    *,
    clients: int,
    log: bool = True,
    reconnect: bool = False,
) -> Variant:
    proxy = {
        "broker": "broker", "broker-plain": "broker", "broker-local": "broker",
        "pgbouncer": "pgbouncer", "pgbouncer-local": "pgbouncer",
        "broker-asyncio": "broker-asyncio", "broker-pool": "broker",
        "broker-workers": "broker-workers",
    }.get(name)  # fmt: skip

    def run(env: Env, probe: Probe, duration: float) -> Measurement:
        return run_pgbench(
            env,
            probe,
            duration,
            target=name,
            args=args,
            log=log,
            clients=clients,
            reconnect=reconnect,
        )

    return Variant(name, label, proxy, run)


def _prepare_tpcb(env: Env) -> None:
    """Same starting state for every TPC-B run: no history rows, fresh stats, no dirty WAL."""
    env.pg.psql("TRUNCATE pgbench_history")
    env.pg.psql("VACUUM ANALYZE pgbench_branches, pgbench_tellers, pgbench_accounts")
    env.pg.psql("CHECKPOINT")


# Placeholder in a pgbench argument list for the path of the pg_sleep custom script.
SLEEP_SCRIPT = "{sleep-script}"


def _sleep_script(env: Env) -> str:
    path = env.tmp / "pg_sleep.sql"
    if not path.exists():
        path.write_text("SELECT pg_sleep(0.002);\n")
    return str(path)


# --------------------------------------------------------------------------- load generator


def run_loadgen(
    env: Env,
    probe: Probe,
    duration: float,
    *,
    mode: str,
    port: int,
    processes: int,
    per_process: int,
    headers: tuple[str, ...] = (),
    module: str = "bench.loadgen",
    extra: tuple[str, ...] = (),
) -> Measurement:
    """`module`: the load generator (bench.loadgen, or bench.h2bench for the HTTP/2 rows,
    which takes the same arguments and reports the same JSON), with `extra` arguments."""
    workdir = env.run_dir(f"loadgen-{mode}-{port}")
    pki = env.pki
    start_at = time.time() + LOADGEN_STARTUP_SECONDS
    count_flag = "--connections" if mode in ("http", "grpc", "h2") else "--threads"
    cmd = [
        str(servers.VENV_BIN / "python"), "-m", module, mode, *extra,
        "--port", str(port), "--cert", str(pki.loadgen.cert), "--key", str(pki.loadgen.key),
        "--ca", str(pki.bundle), count_flag, str(per_process),
        "--start-at", repr(start_at), "--duration", str(duration),
    ]  # fmt: skip
    for header in headers:
        cmd += ["--header", header]
    procs: list[subprocess.Popen[str]] = []
    try:
        for i in range(processes):
            procs.append(
                subprocess.Popen(
                    cmd,
                    cwd=servers.REPO,
                    stdout=subprocess.PIPE,
                    stderr=(workdir / f"loadgen-{i}.err").open("w"),
                    text=True,
                    # No threads in the harness while it spawns; sched_setaffinity is async-safe.
                    preexec_fn=_pin(env.settings.other_cpus),  # noqa: PLW1509
                )
            )
        time.sleep(max(0.0, start_at - time.time()))
        probe.start()
        time.sleep(max(0.0, start_at + duration - time.time()))
        probe.stop()
        reports = []
        for i, proc in enumerate(procs):
            out, _ = proc.communicate(timeout=TOOL_GRACE_SECONDS)
            if proc.returncode != 0 or not out.strip():
                err = (workdir / f"loadgen-{i}.err").read_text()[-1500:]
                raise servers.BenchError(f"loadgen {mode} :{port} failed: {err}")
            reports.append(json.loads(out))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    (workdir / "reports.json").write_text(json.dumps(reports))
    hist: Counter[int] = Counter()
    for report in reports:
        hist.update({int(k): v for k, v in report["hist"].items()})
    ok = sum(r["ok"] for r in reports)
    errors = sum(r["errors"] + r["non2xx"] for r in reports)
    m = Measurement(
        ops=ok,
        seconds=duration,
        rate=ok / duration,
        p50_us=percentile(hist, 0.50),
        p99_us=percentile(hist, 0.99),
        connections=ok if mode in ("handshake", "resume") else processes * per_process,
        errors=errors,
    )
    client_cpu = [r["cpu_seconds"] for r in reports if "cpu_seconds" in r]
    if ok and len(client_cpu) == len(reports):
        # What the load generator itself spent per operation, for rows where it shares the
        # cores with what it measures.
        m.extra["client_cpu_us_per_op"] = round(sum(client_cpu) / ok * 1e6, 1)
    late = max(float(r.get("started_late", 0.0)) for r in reports)
    if late > 0.2:
        m.extra["warning"] = f"a load generator finished {late:.2f}s late"
    statuses: Counter[str] = Counter()
    for r in reports:
        statuses.update(r.get("statuses", {}))
    if statuses:
        m.extra["statuses"] = dict(statuses)
    if mode in ("handshake", "resume"):
        m.extra["negotiated"] = reports[0].get("negotiated")
        m.extra["resumed"] = sum(int(r.get("resumed", 0)) for r in reports)
        if mode == "resume" and m.extra["resumed"] < ok:
            m.extra["warning"] = f"only {m.extra['resumed']} of {ok} handshakes resumed"
    return probe.fill(m)


def loadgen_variant(
    name: str,
    label: str,
    proxy: str | None,
    port: Callable[[Env], int],
    *,
    mode: str = "http",
    processes: int = 2,
    per_process: int = 16,
    send_credential: bool = False,
    module: str = "bench.loadgen",
    extra: tuple[str, ...] = (),
) -> Variant:
    """`send_credential`: the client sends the header itself (direct rows: no proxy injects)."""

    def run(env: Env, probe: Probe, duration: float) -> Measurement:
        headers = (f"Authorization: Bearer {env.http_token}",) if send_credential else ()
        return run_loadgen(
            env,
            probe,
            duration,
            mode=mode,
            port=port(env),
            processes=processes,
            per_process=per_process,
            headers=headers,
            module=module,
            extra=extra,
        )

    return Variant(name, label, proxy, run)


# --------------------------------------------------------------------------- tokens

# Python start-up, imports and minting the tokens before a jwtbench window opens (256 RS256
# signatures take ~0.5 s on this box; doubled, plus margin).
JWTBENCH_STARTUP_SECONDS = 3.0


def jwtbench_variant(name: str, label: str, alg: str, mode: str) -> Variant:
    """Token verification in a process of its own (bench/jwtbench.py): its CPU per
    verification is the figure, so `proxy` is None and the run fills the CPU in itself."""

    def run(env: Env, probe: Probe, duration: float) -> Measurement:
        start_at = time.time() + JWTBENCH_STARTUP_SECONDS
        cmd = [
            str(servers.VENV_BIN / "python"), "-m", "bench.jwtbench",
            "--key-dir", str(env.tmp / "jwt"), "--alg", alg, "--mode", mode,
            "--sub", servers.LOADGEN_ID, "--duration", str(duration), "--start-at", repr(start_at),
        ]  # fmt: skip
        proc = subprocess.Popen(
            cmd,
            cwd=servers.REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            # Where the proxy under test would run: it stands for the broker's verifier.
            preexec_fn=_pin(env.settings.proxy_cpus),  # noqa: PLW1509
        )
        try:
            time.sleep(max(0.0, start_at - time.time()))
            probe.start()
            out, err = proc.communicate(
                timeout=duration + JWTBENCH_STARTUP_SECONDS + TOOL_GRACE_SECONDS
            )
            probe.stop()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if proc.returncode != 0 or not out.strip():
            raise servers.BenchError(f"jwtbench {alg} {mode} failed: {err.strip()[-1500:]}")
        report = json.loads(out)
        m = Measurement(
            ops=report["ops"], seconds=report["wall_s"], rate=report["ops"] / report["wall_s"]
        )
        probe.fill(m)
        m.proxy_cpu_s = report["cpu_s"]
        return m

    return Variant(name, label, None, run)


def jwt_loadgen_variant(name: str, label: str, service: str, *, token: bool) -> Variant:
    """Keep-alive HTTP through the broker's `service`; with `token`, every request carries the
    bench's JWT-SVID. Records the broker's signature checks and cache hits in the window."""

    def run(env: Env, probe: Probe, duration: float) -> Measurement:
        headers = (f"Authorization: Bearer {env.jwt_token}",) if token else ()

        def counts() -> tuple[float, float]:
            name = "sidekey_jwt_verifications_total"
            return (
                env.broker.metric_sum(name, outcome="ok"),
                env.broker.metric_sum(name, outcome="cached"),
            )

        before = counts()
        m = run_loadgen(
            env, probe, duration, mode="http", port=env.broker.ports[service], processes=2,
            per_process=16, headers=headers,
        )  # fmt: skip
        after = counts()
        if token:
            m.extra["signature_checks"] = after[0] - before[0]
            m.extra["cache_hits"] = after[1] - before[1]
        return m

    return Variant(name, label, "broker", run)


def jwt_per_core(s: Mapping[str, Summary]) -> Verdict:
    figures = {
        name: 1e6 / summary.cpu_us_per_op if summary.cpu_us_per_op else None
        for name, summary in s.items()
    }
    text = ", ".join(
        f"{name} {value:,.0f}" if value else f"{name} n/a" for name, value in figures.items()
    )
    return Verdict(
        figure="verifications per core-second",
        value=figures.get("es256"),
        text=text,
        goal="reported (no goal)",
        passed=None,
        extra={f"{name}_per_core_second": value for name, value in figures.items()},
    )


def jwt_vs_mtls(s: Mapping[str, Summary]) -> Verdict:
    jwt_cpu, mtls_cpu = s["jwt"].cpu_us_per_op, s["mtls"].cpu_us_per_op
    ratio = jwt_cpu / mtls_cpu if jwt_cpu and mtls_cpu else None
    checks = sum(m.extra.get("signature_checks", 0) for m in s["jwt"].runs)
    hits = sum(m.extra.get("cache_hits", 0) for m in s["jwt"].runs)
    text = (
        f"{ratio:.3f} ({jwt_cpu:.1f} vs {mtls_cpu:.1f} us/req)" if ratio and jwt_cpu and mtls_cpu
        else "n/a"
    )  # fmt: skip
    return Verdict(
        figure="JWT / mTLS broker CPU per request",
        value=ratio,
        text=text + f"; {checks:.0f} signature check(s), {hits:,.0f} cache hits",
        # One token in every run: its first request anywhere pays the check, no other does.
        goal="one token: <= 1 signature check",
        passed=checks <= 1 and hits > 0,
        notes=[
            f"jwt: {1e6 / jwt_cpu:,.0f} req/core-s" if jwt_cpu else "jwt: n/a",
            f"mtls: {1e6 / mtls_cpu:,.0f} req/core-s" if mtls_cpu else "mtls: n/a",
        ],
        extra={"signature_checks": checks, "cache_hits": hits},
    )


# --------------------------------------------------------------------------- verdicts


def ratio(
    num: str, den: str, goal: float, figure: str
) -> Callable[[Mapping[str, Summary]], Verdict]:
    def verdict(s: Mapping[str, Summary]) -> Verdict:
        a, b = s[num].rate, s[den].rate
        value = a / b if b else None
        notes, extra = [], {}
        for other in s:
            if other not in (num, den) and b and s[other].runs:
                r = s[other].rate / b
                extra[f"{other}_over_{den}"] = r
                notes.append(f"{other} / {den}: {r:.3f}")
        return Verdict(
            figure=figure,
            value=value,
            text=f"{value:.3f}" if value is not None else "n/a",
            goal=f">= {goal:.2f}",
            passed=value is not None and value >= goal,
            notes=notes,
            extra=extra,
        )

    return verdict


def added_latency(p50_goal: float, p99_goal: float) -> Callable[[Mapping[str, Summary]], Verdict]:
    def verdict(s: Mapping[str, Summary]) -> Verdict:
        b, d = s["broker"], s["direct"]
        if None in (b.p50_us, d.p50_us, b.p99_us, d.p99_us):
            return Verdict("added latency p50 / p99", None, "n/a", "", None)
        add50 = b.p50_us - d.p50_us  # type: ignore[operator]
        add99 = b.p99_us - d.p99_us  # type: ignore[operator]
        notes, extra = [], {"added_p50_us": add50, "added_p99_us": add99}
        for name, other in s.items():
            if name not in ("broker", "direct") and other.p50_us is not None:
                o50, o99 = other.p50_us - d.p50_us, (other.p99_us or 0) - d.p99_us  # type: ignore[operator]
                extra[f"{name}_added_p50_us"], extra[f"{name}_added_p99_us"] = o50, o99
                notes.append(f"{name}: +{o50:.0f} us / +{o99:.0f} us")
        return Verdict(
            figure="added latency p50 / p99",
            value=add50,
            text=f"+{add50:.0f} us / +{add99:.0f} us",
            goal=f"<= +{p50_goal:.0f} us / <= +{p99_goal:.0f} us",
            passed=add50 <= p50_goal and add99 <= p99_goal,
            notes=notes,
            extra=extra,
        )

    return verdict


def per_core(
    goal: float, figure: str, vs: str | None
) -> Callable[[Mapping[str, Summary]], Verdict]:
    """Broker ops per broker CPU-second against `goal`; with `vs`, also the throughput ratio."""

    def verdict(s: Mapping[str, Summary]) -> Verdict:
        cpu = s["broker"].cpu_us_per_op
        value = 1e6 / cpu if cpu else None
        text = f"{value:,.0f}/core-s" if value is not None else "n/a"
        extra: dict[str, Any] = {"broker_ops_per_cpu_second": value}
        notes = []
        if vs is not None:
            other = s[vs]
            r = s["broker"].rate / other.rate if other.rate else None
            extra[f"broker_over_{vs}_rate"] = r
            text += f"; broker/{vs} {r:.3f}" if r is not None else ""
            if other.cpu_us_per_op:
                extra[f"{vs}_ops_per_cpu_second"] = 1e6 / other.cpu_us_per_op
                notes.append(f"{vs}: {1e6 / other.cpu_us_per_op:,.0f}/core-s")
        return Verdict(
            figure=figure,
            value=value,
            text=text,
            goal=f">= {goal:,.0f}/core-s",
            passed=value is not None and value >= goal,
            notes=notes,
            extra=extra,
        )

    return verdict


# --------------------------------------------------------------------------- the table


def _broker(service: str) -> Callable[[Env], int]:
    return lambda env: env.broker.ports[service]


PG_BROKER = "sidekey (mTLS in, verify-full upstream)"
PG_DIRECT = "direct PostgreSQL (mTLS, SCRAM)"
PG_BOUNCER = "PgBouncer session mode (mTLS in, verify-full upstream)"
PG_BROKER_PLAIN = "sidekey, upstream TLS off (informational)"
# The same proxy hop by a C proxy: calibrates what any proxy costs on this box.
PG_BOUNCER_INFO = "PgBouncer (informational: any proxy hop on this box)"


SLEEP = ["-M", "prepared", "-c16", "-j2", "-f", SLEEP_SCRIPT]
SELECT_ONLY = ["-S", "-M", "prepared", "-c16", "-j2"]
TPCB = ["-c16", "-j2"]
SELECT_C1 = ["-S", "-c1", "-j1"]
CHURN = ["-C", "-S", "-c8", "-j2"]

SCENARIOS: tuple[Scenario, ...] = (
    Scenario(
        key="pg-latency",
        title="PG latency-bound: SELECT pg_sleep(0.002), -M prepared -c16",
        tool="pgbench",
        goal="broker / direct TPS >= 0.93",
        variants=(
            pgbench_variant("broker", PG_BROKER, SLEEP, clients=16),
            pgbench_variant("direct", PG_DIRECT, SLEEP, clients=16),
            pgbench_variant("pgbouncer", PG_BOUNCER_INFO, SLEEP, clients=16),
        ),
        verdict=ratio("broker", "direct", 0.93, "broker / direct TPS"),
        unit="tps",
    ),
    Scenario(
        key="pg-cpu",
        title="PG CPU-bound: pgbench -S -M prepared -c16",
        tool="pgbench",
        goal="broker / PgBouncer TPS >= 0.90",
        variants=(
            pgbench_variant("broker", PG_BROKER, SELECT_ONLY, clients=16, log=False),
            pgbench_variant("pgbouncer", PG_BOUNCER, SELECT_ONLY, clients=16, log=False),
            pgbench_variant("direct", PG_DIRECT, SELECT_ONLY, clients=16, log=False),
            pgbench_variant("broker-plain", PG_BROKER_PLAIN, SELECT_ONLY, clients=16, log=False),
        ),
        verdict=ratio("broker", "pgbouncer", 0.90, "broker / PgBouncer TPS"),
        unit="tps",
    ),
    Scenario(
        key="pg-tpcb",
        title="PG durable TPC-B (fsync, synchronous_commit on) -c16",
        tool="pgbench",
        goal="broker / direct TPS >= 0.75",
        variants=(
            pgbench_variant("broker", PG_BROKER, TPCB, clients=16),
            pgbench_variant("direct", PG_DIRECT, TPCB, clients=16),
            pgbench_variant("pgbouncer", PG_BOUNCER_INFO, TPCB, clients=16),
        ),
        verdict=ratio("broker", "direct", 0.75, "broker / direct TPS"),
        prepare=_prepare_tpcb,
        unit="tps",
    ),
    Scenario(
        key="pg-c1",
        title="PG -S -c1: added latency (pgbench -l per-transaction log)",
        tool="pgbench",
        goal="added p50 <= +30 us, p99 <= +150 us",
        variants=(
            pgbench_variant("broker", PG_BROKER, SELECT_C1, clients=1),
            pgbench_variant("direct", PG_DIRECT, SELECT_C1, clients=1),
            pgbench_variant("pgbouncer", PG_BOUNCER_INFO, SELECT_C1, clients=1),
            pgbench_variant("broker-plain", PG_BROKER_PLAIN, SELECT_C1, clients=1),
        ),
        verdict=added_latency(30, 150),
        unit="tps",
    ),
    Scenario(
        key="pg-churn",
        title="PG connection churn: pgbench -C -S -c8 (a new mTLS connection per transaction)",
        tool="pgbench",
        goal="broker / direct connections/s >= 0.70",
        variants=(
            pgbench_variant("broker", PG_BROKER, CHURN, clients=8, reconnect=True),
            pgbench_variant("direct", PG_DIRECT, CHURN, clients=8, reconnect=True),
        ),
        verdict=ratio("broker", "direct", 0.70, "broker / direct connections/s"),
        unit="conn/s",
    ),
    Scenario(
        key="http-slow",
        title="HTTP, upstream takes 10 ms (aiohttp), 32 keep-alive connections",
        tool="bench/loadgen.py (mTLS, 2 processes x 16 connections)",
        goal="broker / direct req/s >= 0.97",
        variants=(
            loadgen_variant(
                "broker",
                "sidekey -> aiohttp upstream",
                "broker",
                _broker("http-slow"),
                processes=2,
                per_process=16,
            ),
            loadgen_variant(
                "direct",
                "aiohttp upstream over mTLS",
                None,
                lambda env: env.upstream.tls_port,
                send_credential=True,
                processes=2,
                per_process=16,
            ),
        ),
        verdict=ratio("broker", "direct", 0.97, "broker / direct req/s"),
        unit="req/s",
    ),
    Scenario(
        key="http-trivial",
        title="HTTP, trivial upstream (nginx return 200), 32 keep-alive connections",
        tool="bench/loadgen.py (mTLS, 2 processes x 16 connections)",
        goal="broker req/s per broker core >= 8,000; ratio to nginx reported",
        variants=(
            loadgen_variant(
                "broker",
                "sidekey -> nginx upstream",
                "broker",
                _broker("http-trivial"),
                processes=2,
                per_process=16,
            ),
            loadgen_variant(
                "nginx",
                "nginx proxy_pass + proxy_set_header (1 worker)",
                "nginx-proxy",
                lambda env: env.nginx_proxy.ports["http-trivial"],
                processes=2,
                per_process=16,
            ),
            loadgen_variant(
                "ceiling",
                "nginx return 200 over mTLS (load generator ceiling)",
                None,
                lambda env: env.nginx_upstream.ports["tls"],
                send_credential=True,
                processes=2,
                per_process=16,
            ),
        ),
        verdict=per_core(8000, "broker req/s per broker core", "nginx"),
        unit="req/s",
    ),
    Scenario(
        key="handshake",
        title="Inbound mTLS handshakes (ECDSA P-256 SVIDs, TLS 1.3, no resumption)",
        tool="bench/loadgen.py handshake (2 processes x 4 threads)",
        goal="full handshakes/s per broker core >= 900",
        variants=(
            loadgen_variant(
                "broker",
                "sidekey http listener",
                "broker",
                _broker("http-trivial"),
                mode="handshake",
                processes=2,
                per_process=4,
            ),
            loadgen_variant(
                "nginx",
                "nginx ssl_verify_client on (1 worker)",
                "nginx-proxy",
                lambda env: env.nginx_proxy.ports["http-trivial"],
                mode="handshake",
                processes=2,
                per_process=4,
            ),
        ),
        verdict=per_core(900, "handshakes per broker core-second", "nginx"),
        unit="hs/s",
    ),
    Scenario(
        key="jwt-verify",
        title="Inbound JWT-SVID verification per core (JwtAuthority.verify, own process)",
        tool="bench/jwtbench.py",
        goal="reported: ES256, RS256 (a signature check each), and a token seen again (cached)",
        variants=(
            jwtbench_variant(
                "es256", "ES256 (P-256), distinct tokens, no cache", "ES256", "uncached"
            ),
            jwtbench_variant(
                "rs256", "RS256 (2048-bit), distinct tokens, no cache", "RS256", "uncached"
            ),
            jwtbench_variant(
                "cached", "ES256, the same token again (cache hit)", "ES256", "cached"
            ),
        ),
        verdict=jwt_per_core,
        unit="verif/s",
    ),
    Scenario(
        key="http-jwt",
        title="HTTP request authenticated by a JWT-SVID vs by mTLS, 32 keep-alive connections, "
        "trivial upstream (nginx return 200)",
        tool="bench/loadgen.py (2 processes x 16 connections)",
        goal="reported: broker CPU per request, JWT vs mTLS; a reused token is never checked twice",
        variants=(
            jwt_loadgen_variant(
                "jwt", "sidekey client_auth: jwt (Bearer JWT-SVID, ES256)", "http-jwt", token=True
            ),
            jwt_loadgen_variant(
                "mtls", "sidekey client_auth: mtls (X.509-SVID)", "http-trivial", token=False
            ),
        ),
        verdict=jwt_vs_mtls,
        unit="req/s",
    ),
)


def _sysbench_variant(name: str, label: str) -> Variant:
    from bench import dbrows

    def run(env: Env, probe: Probe, duration: float) -> Measurement:
        return dbrows.run_sysbench(env, probe, duration, target=name, threads=16)

    return Variant(name, label, "broker" if name == "broker" else None, run)


def _redis_variant(name: str, label: str) -> Variant:
    from bench import dbrows

    def run(env: Env, probe: Probe, duration: float) -> Measurement:
        return dbrows.run_redis_benchmark(env, probe, duration, target=name, clients=16)

    return Variant(name, label, "broker" if name == "broker" else None, run)


def _prepare_mysql(env: Env) -> None:
    from bench import dbrows

    dbrows.prepare_mysql(env)


SCENARIOS = (
    *SCENARIOS,
    Scenario(
        key="redis-getset",
        title="Redis: redis-benchmark -t get,set -P 1 -c 16, TLS both legs",
        tool="redis-benchmark --tls",
        goal="broker / direct req/s >= 0.85",
        variants=(
            _redis_variant("broker", "redis-benchmark -> sidekey (mTLS) -> redis-server (TLS)"),
            _redis_variant("direct", "redis-benchmark -> redis-server (TLS)"),
        ),
        verdict=ratio("broker", "direct", 0.85, "broker / direct req/s"),
        unit="req/s",
    ),
    Scenario(
        key="mysql-point-select",
        title="MySQL: sysbench oltp_point_select --threads=16, TLS both legs (MariaDB 10.11)",
        tool="sysbench --mysql-ssl=on",
        goal="broker / direct queries/s >= 0.85",
        variants=(
            _sysbench_variant("broker", "sysbench -> sidekey (mTLS) -> MariaDB (TLS)"),
            _sysbench_variant("direct", "sysbench -> MariaDB (TLS)"),
        ),
        verdict=ratio("broker", "direct", 0.85, "broker / direct queries/s"),
        prepare=_prepare_mysql,
        unit="q/s",
    ),
)

# --------------------------------------------------------------------------- streaming

# Bytes each way of the transfer row: the 1 GB, smaller with BENCH_TRANSFER_MB.
TRANSFER_BYTES = int(os.environ.get("BENCH_TRANSFER_MB", "1024")) * 1024 * 1024
# The broker's memory may grow by less than this over a 1 GB upload and a 1 GB download.
TRANSFER_RSS_GOAL_MB = 50.0
# Time to first byte through the broker within 2 ms of direct (issue 17).
TTFB_ADDED_P50_GOAL_US = 2000.0
TTFB_ADDED_P99_GOAL_US = 5000.0
MIB = 1024 * 1024


def _streambench(
    env: Env, mode: str, port: int, *, credential: bool, duration: float = 0.0
) -> dict[str, Any]:
    cmd = [
        str(servers.VENV_BIN / "python"), "-m", "bench.streambench", mode,
        "--port", str(port), "--cert", str(env.pki.loadgen.cert),
        "--key", str(env.pki.loadgen.key), "--ca", str(env.pki.bundle),
        "--duration", str(duration), "--bytes", str(TRANSFER_BYTES),
    ]  # fmt: skip
    if credential:
        cmd += ["--header", f"Authorization: Bearer {env.http_token}"]
    proc = subprocess.run(
        cmd, cwd=servers.REPO, capture_output=True, text=True,
        timeout=duration + TOOL_GRACE_SECONDS * 5, check=False,
        preexec_fn=_pin(env.settings.other_cpus),
    )  # fmt: skip
    if proc.returncode != 0:
        raise servers.BenchError(f"streambench {mode} :{port} failed: {proc.stderr[-1500:]}")
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def ttfb_variant(
    name: str, label: str, proxy: str | None, port: Callable[[Env], int], *, credential: bool
) -> Variant:
    """Fresh mTLS connections one after another from a client with Nagle on: the time from
    its request to the first response byte (bench/streambench.py says why Nagle matters)."""

    def run(env: Env, probe: Probe, duration: float) -> Measurement:
        probe.start()
        r = _streambench(env, "ttfb", port(env), credential=credential, duration=duration)
        probe.stop()
        first = r["first_byte_us"]
        m = Measurement(
            ops=len(first), seconds=duration, rate=len(first) / duration,
            p50_us=_quantile(first, 0.50), p99_us=_quantile(first, 0.99),
            connections=len(first), errors=r["errors"],
        )  # fmt: skip
        m.extra["handshake_p50_us"] = _quantile(r["handshake_us"], 0.50)
        return probe.fill(m)

    return Variant(name, label, proxy, run)


def _rss_kib(pid: int, field_name: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise servers.BenchError(f"no {field_name} in /proc/{pid}/status")


def _process_tree(pid: int) -> list[int]:
    """`pid` and its children: under `workers: N` the broker's connections live in workers."""
    tree = [pid]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                text = (entry / "stat").read_text()
            except OSError:
                continue
            if int(text[text.rindex(")") + 2 :].split()[1]) == pid:
                tree.append(int(entry.name))
    return tree


def transfer_variant(
    name: str, label: str, proxy: str | None, port: Callable[[Env], int], *, credential: bool
) -> Variant:
    """TRANSFER_BYTES up (POST /sink), then down (GET /bytes/N), on one connection; for the
    broker, how much its resident memory grew: each process's peak (VmHWM, reset through
    clear_refs before the transfer) over its resident size before it, the largest growth of
    the broker and its workers (one of them carries the connection)."""

    def run(env: Env, probe: Probe, duration: float) -> Measurement:
        del duration  # one transfer of a fixed size
        pids = _process_tree(env.broker.proc.pid) if proxy == "broker" else []
        before: dict[int, int] = {}
        for pid in pids:
            Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
            before[pid] = _rss_kib(pid, "VmRSS")
        probe.start()
        r = _streambench(env, "transfer", port(env), credential=credential)
        probe.stop()
        if r["statuses"] != [200, 200] or r["downloaded"] != r["bytes"]:
            raise servers.BenchError(f"transfer through {name} failed: {r}")
        seconds = r["upload_s"] + r["download_s"]
        moved = 2 * r["bytes"]
        m = Measurement(ops=moved // MIB, seconds=seconds, rate=moved / seconds / 1e6)
        m.extra["upload_MBps"] = round(r["bytes"] / r["upload_s"] / 1e6, 1)
        m.extra["download_MBps"] = round(r["bytes"] / r["download_s"] / 1e6, 1)
        if pids:
            added = {pid: _rss_kib(pid, "VmHWM") - rss for pid, rss in before.items()}
            busiest = max(added, key=lambda pid: added[pid])
            m.extra["broker_processes"] = len(pids)
            m.extra["broker_rss_before_mb"] = round(before[busiest] / 1024, 1)
            m.extra["broker_rss_added_mb"] = round(added[busiest] / 1024, 1)
        return probe.fill(m)

    return Variant(name, label, proxy, run)


def transfer_verdict(s: Mapping[str, Summary]) -> Verdict:
    added = [m.extra["broker_rss_added_mb"] for m in s["broker"].runs]
    worst = max(added) if added else None
    r = s["broker"].rate / s["direct"].rate if s["direct"].rate else None
    text = f"+{worst:.1f} MB" if worst is not None else "n/a"
    if r is not None:
        text += f"; broker/direct {r:.3f}"
    return Verdict(
        figure="broker RSS added over 1 GB up + 1 GB down (worst run)",
        value=worst,
        text=text,
        goal=f"< {TRANSFER_RSS_GOAL_MB:.0f} MB",
        passed=worst is not None and worst < TRANSFER_RSS_GOAL_MB,
        notes=[f"MiB each way: {TRANSFER_BYTES // MIB}"],
        extra={"broker_over_direct_rate": r, "broker_rss_added_mb": added},
    )


SCENARIOS = (
    *SCENARIOS,
    Scenario(
        key="http-ttfb",
        title="HTTP first byte on a fresh mTLS connection, client with Nagle on (aiohttp upstream)",
        tool="bench/streambench.py ttfb (one connection at a time)",
        goal=f"added p50 <= +{TTFB_ADDED_P50_GOAL_US:.0f} us",
        variants=(
            ttfb_variant(
                "broker",
                "sidekey -> aiohttp upstream",
                "broker",
                _broker("http-slow"),
                credential=False,
            ),
            ttfb_variant(
                "direct",
                "aiohttp upstream over mTLS",
                None,
                lambda env: env.upstream.tls_port,
                credential=True,
            ),
        ),
        verdict=added_latency(TTFB_ADDED_P50_GOAL_US, TTFB_ADDED_P99_GOAL_US),
        unit="conn/s",
    ),
    Scenario(
        key="http-transfer",
        title="HTTP 1 GB upload then 1 GB download on one keep-alive connection",
        tool="bench/streambench.py transfer",
        goal=f"broker RSS added < {TRANSFER_RSS_GOAL_MB:.0f} MB",
        variants=(
            transfer_variant(
                "broker",
                "sidekey -> aiohttp upstream",
                "broker",
                _broker("http-slow"),
                credential=False,
            ),
            transfer_variant(
                "direct",
                "aiohttp upstream over mTLS",
                None,
                lambda env: env.upstream.tls_port,
                credential=True,
            ),
        ),
        verdict=transfer_verdict,
        unit="MB/s",
    ),
)

# --------------------------------------------------------------------------- issue 18


def resumed_vs_full(s: Mapping[str, Summary]) -> Verdict:
    """Full and resumed mTLS handshakes per broker core-second (goals: full >= 900, resumed
    >= 3x full), side by side from one run; the full row without tickets shows their cost."""
    per_core_s = {name: 1e6 / v.cpu_us_per_op if v.cpu_us_per_op else None for name, v in s.items()}
    full, resumed = per_core_s.get("full"), per_core_s.get("resumed")
    value = resumed / full if full and resumed else None
    notes = [f"{name}: {rate:,.0f}/core-s" for name, rate in per_core_s.items() if rate]
    return Verdict(
        figure="resumed / full handshakes per broker core-second",
        value=value,
        text=(
            f"{value:.2f}x; full {full:,.0f}/core-s, resumed {resumed:,.0f}/core-s"
            if value is not None and full and resumed
            else "n/a"
        ),
        goal="full >= 900/core-s, resumed >= 3x full",
        passed=value is not None and full is not None and full >= 900 and value >= 3.0,
        notes=notes,
        extra={f"{k}_per_core_second": v for k, v in per_core_s.items()},
    )


def reported(
    verdict: Callable[[Mapping[str, Summary]], Verdict],
) -> Callable[[Mapping[str, Summary]], Verdict]:
    """`verdict`'s figure with no goal to pass or fail."""

    def only_reported(s: Mapping[str, Summary]) -> Verdict:
        v = verdict(s)
        v.goal, v.passed = "reported", None
        return v

    return only_reported


PG_LOCAL = "sidekey unix socket, client_auth: local (no TLS in), verify-full upstream"
PG_BOUNCER_LOCAL = "PgBouncer unix socket (SCRAM, no TLS in), verify-full upstream"

SCENARIOS = (
    *SCENARIOS,
    Scenario(
        key="pg-local",
        title="PG sidecar path: pgbench -S -M prepared -c16 over a unix socket",
        tool="pgbench",
        goal="broker / PgBouncer (unix socket, same upstream TLS) TPS >= 0.95",
        variants=(
            pgbench_variant("broker-local", PG_LOCAL, SELECT_ONLY, clients=16, log=False),
            pgbench_variant(
                "pgbouncer-local", PG_BOUNCER_LOCAL, SELECT_ONLY, clients=16, log=False
            ),
            pgbench_variant("direct", PG_DIRECT, SELECT_ONLY, clients=16, log=False),
        ),
        verdict=ratio("broker-local", "pgbouncer-local", 0.95, "broker / PgBouncer TPS"),
        unit="tps",
    ),
    Scenario(
        key="pg-local-tpcb",
        title="PG sidecar path: durable TPC-B -c16 over a unix socket",
        tool="pgbench",
        goal="broker / PgBouncer (unix socket, same upstream TLS) TPS >= 0.95",
        variants=(
            pgbench_variant("broker-local", PG_LOCAL, TPCB, clients=16, log=False),
            pgbench_variant("pgbouncer-local", PG_BOUNCER_LOCAL, TPCB, clients=16, log=False),
            pgbench_variant("direct", PG_DIRECT, TPCB, clients=16, log=False),
        ),
        verdict=ratio("broker-local", "pgbouncer-local", 0.95, "broker / PgBouncer TPS"),
        prepare=_prepare_tpcb,
        unit="tps",
    ),
    Scenario(
        key="handshake-resume",
        title="Inbound mTLS handshakes, full vs resumed (TLS 1.3 ticket), P-256",
        tool="bench/loadgen.py handshake / resume (2 processes x 4 threads)",
        goal="full >= 900/core-s, resumed >= 3x full",
        variants=(
            loadgen_variant(
                "full",
                "full handshake (tls_resumption on: a ticket minted)",
                "broker",
                _broker("http-trivial"),
                mode="handshake",
                processes=2,
                per_process=4,
            ),
            loadgen_variant(
                "resumed",
                "resumed from a ticket (tls_resumption on)",
                "broker",
                _broker("http-trivial"),
                mode="resume",
                processes=2,
                per_process=4,
            ),
            loadgen_variant(
                "full-noticket",
                "full handshake, tls_resumption: false",
                "broker",
                _broker("http-noticket"),
                mode="handshake",
                processes=2,
                per_process=4,
            ),
        ),
        verdict=resumed_vs_full,
        unit="hs/s",
    ),
    Scenario(
        key="pg-loop",
        title="PG CPU-bound -S -M prepared -c16: uvloop vs asyncio's own loop (same broker)",
        tool="pgbench",
        goal="reported: the asyncio-loop broker / the uvloop broker TPS and CPU per transaction",
        variants=(
            pgbench_variant("broker", PG_BROKER + ", uvloop", SELECT_ONLY, clients=16, log=False),
            pgbench_variant(
                "broker-asyncio",
                PG_BROKER + ", event_loop: asyncio",
                SELECT_ONLY,
                clients=16,
                log=False,
            ),
        ),
        verdict=reported(ratio("broker-asyncio", "broker", 0.0, "asyncio / uvloop TPS")),
        unit="tps",
    ),
)

from bench.scalerows import SCALE_SCENARIOS  # noqa: E402 - they use the helpers above

SCENARIOS = (*SCENARIOS, *SCALE_SCENARIOS)
# --------------------------------------------------------------------------- HTTP/2 (issue 17.5)

# Calls in flight per channel and channels per load generator of the gRPC row: 32 at once,
# as the HTTP rows' 2 x 16 connections.
GRPC_CHANNELS = 2
GRPC_STREAMS = 16
# Requests in flight on the one connection of the multiplexing row.
H2_STREAMS = 32

SCENARIOS = (
    *SCENARIOS,
    Scenario(
        key="grpc-unary",
        title=(
            f"gRPC unary calls, {GRPC_CHANNELS} channels x {GRPC_STREAMS} in flight "
            "(grpcio client and server)"
        ),
        tool="bench/h2bench.py grpc",
        goal="reported: broker calls per core-second, broker / direct calls/s",
        variants=(
            loadgen_variant(
                "broker",
                "grpcio -> sidekey (mTLS, h2) -> grpcio server (h2c)",
                "broker",
                _broker("grpc"),
                mode="grpc",
                processes=1,
                per_process=GRPC_CHANNELS,
                module="bench.h2bench",
                extra=("--streams", str(GRPC_STREAMS)),
            ),
            loadgen_variant(
                "direct",
                "grpcio -> grpcio server (mTLS, h2)",
                None,
                lambda env: env.grpc_upstream.tls_port,
                mode="grpc",
                processes=1,
                per_process=GRPC_CHANNELS,
                send_credential=True,
                module="bench.h2bench",
                extra=("--streams", str(GRPC_STREAMS)),
            ),
        ),
        verdict=reported(per_core(0.0, "gRPC unary calls per broker core-second", "direct")),
        unit="calls/s",
    ),
    Scenario(
        key="h2-multiplex",
        title=(
            f"HTTP/2: {H2_STREAMS} requests in flight on one mTLS connection vs HTTP/1.1 on "
            f"{H2_STREAMS} connections (nginx upstream)"
        ),
        tool="bench/h2bench.py h2, bench/loadgen.py http",
        goal="reported: h2 requests per broker core-second, h2 / HTTP/1.1 req/s",
        variants=(
            loadgen_variant(
                "broker",
                f"h2 client, 1 connection x {H2_STREAMS} streams -> sidekey -> nginx",
                "broker",
                _broker("http-trivial"),
                mode="h2",
                processes=1,
                per_process=1,
                module="bench.h2bench",
                extra=("--streams", str(H2_STREAMS)),
            ),
            loadgen_variant(
                "http1",
                f"HTTP/1.1 loadgen, {H2_STREAMS} keep-alive connections -> sidekey -> nginx",
                "broker",
                _broker("http-trivial"),
                processes=1,
                per_process=H2_STREAMS,
            ),
        ),
        verdict=reported(per_core(0.0, "h2 requests per broker core-second", "http1")),
        unit="req/s",
    ),
)

SCENARIOS_BY_KEY: dict[str, Scenario] = {s.key: s for s in SCENARIOS}
