"""`workers: N`: one parent process supervising N worker processes that share every listener.

One Python process uses one core. With `workers` above 1, `sidekey run` becomes a parent
that does no broker work itself:

- it binds every service's listener once, before any worker starts: a unix socket is one
  socket every worker inherits and accepts on; a TCP listener is one SO_REUSEPORT socket per
  worker on the same port (the kernel spreads connections over them; port 0 becomes the
  port the first one got);
- it starts each worker as `sidekey run` of the same config (a fresh interpreter, never a
  fork of a process with an event loop), handing it its sockets, a private admin socket and
  the read end of a pipe whose EOF tells it the parent is gone, and every worker's socket for
  its siblings' requests (broker.session.siblings: a PostgreSQL cancel reaches the worker
  that holds its session, whichever worker the kernel gave it to);
- a worker that exits while the parent is not stopping is started again, after a backoff that
  doubles per consecutive failure (WORKER_RESTART_*); the dead worker's TCP sockets are
  closed at once, so new connections go to the workers that are up;
- SIGHUP is forwarded to every worker (each reloads on its own); SIGTERM/SIGINT too, and the
  parent exits once every worker has drained and revoked its leases;
- the admin server runs here only: /readyz is ready when every worker is, /metrics adds up
  the workers' (broker.observe.aggregate), /inventory is the first worker's with every
  worker's live leases, POST /reload reloads every worker.

Each worker is a whole broker: its own vault token, leases (revoked when it stops), deny-list
watcher and caches, and audit lines that name it (`worker`), appended to the one trail with a
hash chain per worker. A worker killed outright (SIGKILL, OOM) cannot revoke its leases:
they end at their TTL, as a killed single-process broker's do.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from broker.config import Config, ListenAddress, load_config
from broker.credentials.journal import orphaned, worker_journal
from broker.errors import SidekeyError
from broker.observe.admin import AdminServer
from broker.observe.aggregate import merge
from broker.session.net import bind_shared

log = logging.getLogger("sidekey.supervisor")

# A crashed worker is started again after this, doubling per consecutive crash up to the
# maximum; one that ran this long before it died starts its count afresh.
WORKER_RESTART_MIN_SECONDS = 0.5
WORKER_RESTART_MAX_SECONDS = 30.0
WORKER_STABLE_SECONDS = 30.0
# A worker's admin socket answers from its event loop: a loaded worker takes milliseconds.
WORKER_ADMIN_TIMEOUT = 5.0
# After SIGTERM a worker drains (drain_timeout), then revokes leases and closes the vault
# token: this much more before the parent kills it.
STOP_GRACE_SECONDS = 30.0


@dataclass
class Worker:
    number: int
    admin: Path
    # Where this worker answers its siblings' requests (broker.session.siblings).
    siblings: Path
    # The slot's lease record: a worker started again revokes what a killed one left in it
    # (broker.credentials.journal).
    journal: Path
    # This worker's listening sockets by service: its own SO_REUSEPORT socket for TCP, the
    # shared one for unix.
    sockets: dict[str, socket.socket] = field(default_factory=dict)
    proc: asyncio.subprocess.Process | None = None
    started: float = 0.0
    restarts: int = 0
    failures: int = 0
    last_exit: int | None = None


class Supervisor:
    """The parent of `workers: N` (see the module docstring)."""

    def __init__(
        self,
        config: Config,
        *,
        count: int,
        drain_timeout: float,
        log_args: list[str],
    ) -> None:
        self.config = config
        self.count = count
        self.drain_timeout = drain_timeout
        self._log_args = log_args
        self._rundir = Path(tempfile.mkdtemp(prefix="sidekey-workers-"))
        # The lease journals outlive the parent only in a state_dir.
        journals = config.state_dir or self._rundir
        self.workers = [
            Worker(
                n,
                self._rundir / f"worker-{n}.sock",
                self._rundir / f"siblings-{n}.sock",
                journals / worker_journal(n),
            )
            for n in range(1, count + 1)
        ]
        # Journals of slots this broker does not run (a predecessor with more workers, or a
        # single process): worker 1 takes them over at its start.
        self._orphaned = (
            orphaned(config.state_dir, keep={w.journal.name for w in self.workers})
            if config.state_dir is not None
            else []
        )
        # The bound address of each service (a TCP port 0 resolved), and the unix sockets
        # every worker shares.
        self._bound: dict[str, ListenAddress] = {}
        self._unix: dict[str, socket.socket] = {}
        self._stopping = False
        self._stopped = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._sessions: dict[int, aiohttp.ClientSession] = {}
        self._parent_r, self._parent_w = os.pipe()
        self.admin: AdminServer | None = None

    # -- sockets ------------------------------------------------------------------------------

    def _bind_all(self) -> None:
        for service in self.config.services:
            listen = service.listen
            if listen.path is not None:
                self._unix[service.name] = bind_shared(listen, service.socket_mode)
                self._bound[service.name] = listen
            else:
                first = bind_shared(listen)
                port = first.getsockname()[1]
                self._bound[service.name] = ListenAddress(host=listen.host, port=port)
                self.workers[0].sockets[service.name] = first
            log.info("listening service=%s address=%s workers=%d",
                     service.name, self._bound[service.name], self.count)  # fmt: skip

    def _sockets_for(self, worker: Worker) -> None:
        for service in self.config.services:
            if service.name in self._unix:
                worker.sockets[service.name] = self._unix[service.name]
            elif service.name not in worker.sockets and service.name in self._bound:
                worker.sockets[service.name] = bind_shared(self._bound[service.name])

    def _release_tcp(self, worker: Worker) -> None:
        """Close the parent's copy of a worker's TCP sockets once the worker holds them: the
        socket then lives as long as the worker's listener, so a worker that stops
        accepting (SIGTERM) or dies leaves no socket queueing connections nobody takes, and
        the kernel sends new ones to the workers that are up."""
        for name, sock in list(worker.sockets.items()):
            if name not in self._unix:
                sock.close()
                del worker.sockets[name]

    def _retire_sockets(self, config: Config) -> None:
        """After a reload: services removed or moved elsewhere lose the parent's sockets (a
        moved TCP service is bound by the workers themselves, sharing its port)."""
        now = {s.name: s.listen for s in config.services}
        before = {s.name: s.listen for s in self.config.services}
        for name in list(self._bound):
            if now.get(name) != before.get(name):
                self._bound.pop(name)
                sock = self._unix.pop(name, None)
                if sock is not None:
                    sock.close()

    # -- workers ------------------------------------------------------------------------------

    async def _spawn(self, worker: Worker) -> None:
        self._sockets_for(worker)
        for stale in (worker.admin, worker.siblings):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
        fds = {name: sock.fileno() for name, sock in worker.sockets.items()}
        siblings = json.dumps([str(w.siblings) for w in self.workers])
        argv = [
            sys.executable, "-m", "broker", "run", "--config", str(self.config.path),
            "--drain-timeout", str(self.drain_timeout), *self._log_args,
            "--worker", str(worker.number), "--worker-admin", str(worker.admin),
            "--worker-sockets", json.dumps(fds), "--worker-parent-fd", str(self._parent_r),
            "--worker-siblings", siblings, "--worker-journal", str(worker.journal),
        ]  # fmt: skip
        if worker.number == 1 and self._orphaned:
            argv += ["--worker-adopt", json.dumps([str(p) for p in self._orphaned])]
        worker.proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, pass_fds=[*fds.values(), self._parent_r]
        )
        worker.started = time.monotonic()
        self._release_tcp(worker)
        log.info("worker %d started pid=%d", worker.number, worker.proc.pid)

    async def _watch(self, worker: Worker) -> None:
        """Keep one worker slot running until the parent stops."""
        while True:
            assert worker.proc is not None
            code = await worker.proc.wait()
            worker.last_exit = code
            if self._stopping:
                return
            ran = time.monotonic() - worker.started
            worker.failures = 1 if ran >= WORKER_STABLE_SECONDS else worker.failures + 1
            delay = min(
                WORKER_RESTART_MAX_SECONDS,
                WORKER_RESTART_MIN_SECONDS * 2 ** (worker.failures - 1),
            )
            log.error("worker %d (pid %d) exited with %s after %.1fs; starting it again in %.1fs",
                      worker.number, worker.proc.pid, _exit_text(code), ran, delay)  # fmt: skip
            await asyncio.sleep(delay)
            if self._stopping:
                return
            worker.restarts += 1
            try:
                await self._spawn(worker)
            except OSError as exc:
                log.error("worker %d cannot be started: %s", worker.number, exc)
                worker.proc = None
                await asyncio.sleep(WORKER_RESTART_MAX_SECONDS)
                continue

    def _signal_all(self, sig: signal.Signals) -> None:
        for worker in self.workers:
            if worker.proc is not None and worker.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    worker.proc.send_signal(sig)

    # -- running --------------------------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        try:
            self._bind_all()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self._stopped.set)
            loop.add_signal_handler(signal.SIGHUP, self._sighup)
            for worker in self.workers:
                await self._spawn(worker)
                task = loop.create_task(self._watch(worker), name=f"watch-worker-{worker.number}")
                self._tasks.add(task)
            if self.config.admin is not None:
                self.admin = AdminServer(self, self.config.admin.listen)
                await self.admin.start()
            log.info("supervising %d workers (pids %s)", self.count,
                     ", ".join(str(w.proc.pid) for w in self.workers if w.proc))  # fmt: skip
            await self._stopped.wait()
            log.info("signal received: stopping %d workers", self.count)
            loop.remove_signal_handler(signal.SIGHUP)
            return await self._stop()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            await self._cleanup()

    def _sighup(self) -> None:
        log.info("SIGHUP: forwarding to %d workers", self.count)
        self._signal_all(signal.SIGHUP)
        self._reread()

    def _reread(self) -> None:
        """The config as the workers will read it (the sockets kept if it is broken)."""
        try:
            config = load_config(self.config.path)
        except SidekeyError as exc:
            log.error("reload refused, the running config stays: %s", exc)
            return
        self._adopt(config)

    def _adopt(self, config: Config) -> None:
        if config.worker_count != self.count:
            log.warning("reload: workers changed to %d; it takes effect at restart",
                        config.worker_count)  # fmt: skip
        self._retire_sockets(config)
        self.config = dataclasses.replace(config, workers=self.config.workers)

    async def _stop(self) -> int:
        self._stopping = True
        # The shared unix sockets die with the workers' listeners: new connections are
        # refused from the moment every worker stops accepting, as with one process.
        for sock in self._unix.values():
            sock.close()
        self._signal_all(signal.SIGTERM)
        deadline = self.drain_timeout + STOP_GRACE_SECONDS
        procs = [w.proc for w in self.workers if w.proc is not None]
        try:
            async with asyncio.timeout(deadline):
                await asyncio.gather(*(p.wait() for p in procs))
        except TimeoutError:
            for proc in procs:
                if proc.returncode is None:
                    log.error("worker pid %d did not stop in %.0fs: killing it", proc.pid, deadline)
                    proc.kill()
            await asyncio.gather(*(p.wait() for p in procs))
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        codes = [p.returncode for p in procs]
        log.info("all %d workers stopped (exit codes %s)", len(procs), codes)
        return 0 if all(code == 0 for code in codes) else 1

    async def _cleanup(self) -> None:
        if self.admin is not None:
            await self.admin.stop()
        for session in self._sessions.values():
            await session.close()
        for worker in self.workers:
            self._release_tcp(worker)
        for name, sock in self._unix.items():
            sock.close()
            path = self._bound[name].path
            if path is not None:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        os.close(self._parent_r)
        os.close(self._parent_w)
        shutil.rmtree(self._rundir, ignore_errors=True)

    # -- asking the workers -----------------------------------------------------------------

    def _session(self, worker: Worker) -> aiohttp.ClientSession:
        session = self._sessions.get(worker.number)
        if session is None:
            session = self._sessions[worker.number] = aiohttp.ClientSession(
                connector=aiohttp.UnixConnector(path=str(worker.admin)),
                timeout=aiohttp.ClientTimeout(total=WORKER_ADMIN_TIMEOUT),
            )
        return session

    async def _ask(self, worker: Worker, method: str, path: str) -> tuple[int, bytes]:
        """(status, body) of a worker's admin answer; (0, why) when it cannot answer."""
        if worker.proc is None or worker.proc.returncode is not None:
            return 0, b"not running"
        try:
            async with self._session(worker).request(method, f"http://worker{path}") as resp:
                return resp.status, await resp.read()
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            return 0, str(exc).encode()

    async def _ask_all(self, method: str, path: str) -> list[tuple[int, bytes]]:
        return list(await asyncio.gather(*(self._ask(w, method, path) for w in self.workers)))

    def _worker_info(self, worker: Worker) -> dict[str, Any]:
        running = worker.proc is not None and worker.proc.returncode is None
        return {
            "worker": worker.number,
            "pid": worker.proc.pid if worker.proc is not None and running else None,
            "running": running,
            "restarts": worker.restarts,
            "last_exit": worker.last_exit,
        }

    # -- what the admin server shows (broker.observe.admin.AdminView) -------------------------

    async def readiness(self) -> tuple[bool, dict[str, Any]]:
        answers = await self._ask_all("GET", "/readyz")
        workers, bodies = [], []
        for worker, (status, raw) in zip(self.workers, answers, strict=True):
            info = self._worker_info(worker)
            info["ready"] = status == 200
            body = _json(raw)
            if body is None:
                info["error"] = raw.decode(errors="replace")[:200] or f"HTTP {status}"
            else:
                bodies.append(body)
            workers.append(info)
        ready = all(w["ready"] for w in workers)
        # The first answering worker's view of identity, vault and services, and each one's
        # readiness: a worker that is not ready makes the whole broker not ready.
        out: dict[str, Any] = {**(bodies[0] if bodies else {}), "ready": ready}
        out["workers"] = workers
        return ready, out

    async def metrics_text(self) -> bytes:
        answers = await self._ask_all("GET", "/metrics")
        texts = [raw for status, raw in answers if status == 200]
        up = GaugeMetricFamily(
            "sidekey_worker_up", "1 while the worker runs and answers its parent", labels=["worker"]
        )
        restarts = CounterMetricFamily(
            "sidekey_worker_restarts", "Times a worker was started again after it exited",
            labels=["worker"],
        )  # fmt: skip
        for worker, (status, _) in zip(self.workers, answers, strict=True):
            up.add_metric([str(worker.number)], 1.0 if status == 200 else 0.0)
            restarts.add_metric([str(worker.number)], worker.restarts)
        configured = GaugeMetricFamily("sidekey_workers", "Worker processes configured")
        configured.add_metric([], self.count)
        return merge(texts, extra=[configured, up, restarts])

    async def inventory(self) -> dict[str, Any]:
        answers = await self._ask_all("GET", "/inventory")
        bodies = [
            (w, body)
            for w, (status, raw) in zip(self.workers, answers, strict=True)
            if status == 200 and (body := _json(raw)) is not None
        ]
        if not bodies:
            raise SidekeyError("no worker answered")
        out = dict(bodies[0][1])
        out["identities"] = _merge_identities([body.get("identities", []) for _, body in bodies])
        out["services"] = _merge_services([body.get("services", []) for _, body in bodies])
        out["workers"] = [self._worker_info(w) for w in self.workers]
        return out

    async def reload(self) -> dict[str, Any]:
        """Check the config here (a broken one changes no worker), then reload every worker."""
        config = load_config(self.config.path)  # raises ConfigError: nothing changes
        answers = await self._ask_all("POST", "/reload")
        results = []
        errors = []
        for worker, (_, raw) in zip(self.workers, answers, strict=True):
            body = _json(raw) or {"ok": False, "error": raw.decode(errors="replace")[:200]}
            results.append({"worker": worker.number, **body})
            if not body.get("ok"):
                errors.append(f"worker {worker.number}: {body.get('error')}")
        self._adopt(config)
        if errors:
            raise SidekeyError("; ".join(errors))
        summary = {k: v for k, v in results[0].items() if k not in ("ok", "worker")}
        return {**summary, "workers": results}


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return None


def _exit_text(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-code).name}"
    return f"code {code}"


def _merge_identities(lists: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The first worker's identities, with every worker's live leases and use counts."""
    first, rest = lists[0], lists[1:]
    by_key = {
        (ident["id"], svc["service"]): svc for ident in first for svc in ident.get("services", [])
    }
    for other in rest:
        for ident in other:
            for svc in ident.get("services", []):
                mine = by_key.get((ident["id"], svc["service"]))
                if mine is None:
                    continue
                held = svc.get("credential", {}).get("live_leases")
                if held:
                    mine["credential"].setdefault("live_leases", []).extend(held)
                mine["calls_24h"] = mine.get("calls_24h", 0) + svc.get("calls_24h", 0)
    return first


def _merge_services(lists: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The first worker's services, with every worker's pools side by side."""
    first = lists[0]
    for service in first:
        pools = [
            p
            for services in lists
            for other in services
            if other.get("name") == service.get("name") and (p := other.get("pool")) is not None
        ]
        if pools:
            service["pool"] = pools[0] if len(pools) == 1 else {"workers": pools}
    return first
