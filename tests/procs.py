"""A broker as its own process (`python -m broker run`), for tests that measure it (RSS, open
file descriptors) or stop it, and that must not share an event loop with their clients.

    async with broker_process(tmp_path, config, env={...}) as proc:
        host, port = proc.address("orders-db")
        proc.rss_bytes(), proc.open_fds()

Every line the broker logs is kept in `proc.log_lines` (JSON objects) for secret scans.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from tests.brokers import write_config

# A broker process binds its listeners within a second or two; a loaded CI box gets more.
START_SECONDS = 60.0
# SIGTERM drains and revokes leases; a broker that takes longer than this is killed.
STOP_SECONDS = 60.0
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


class BrokerProcess:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.listening: dict[str, str] = {}
        self.admin: str | None = None
        self.log_lines: list[dict[str, Any]] = []
        self.raw_log = bytearray()
        self._reader: asyncio.Task[None] | None = None
        self._bound = asyncio.Event()
        self._want: set[str] = set()

    def address(self, service: str) -> tuple[str, int]:
        host, _, port = self.listening[service].rpartition(":")
        return host, int(port)

    def rss_bytes(self) -> int:
        """Resident set size now (/proc/PID/statm)."""
        with open(f"/proc/{self.pid}/statm") as f:
            return int(f.read().split()[1]) * PAGE_SIZE

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            self.raw_log += line
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            self.log_lines.append(entry)
            msg = str(entry.get("msg", ""))
            if msg.startswith("listening service="):
                fields = dict(part.split("=", 1) for part in msg.split()[1:] if "=" in part)
                self.listening[fields["service"]] = fields["address"]
                if self._want <= set(self.listening):
                    self._bound.set()
        self._bound.set()

    async def stop(self) -> int:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), STOP_SECONDS)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        if self._reader is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._reader, 10)
        assert self.proc.returncode is not None
        return self.proc.returncode


@asynccontextmanager
async def broker_process(
    directory: Path,
    config: dict[str, Any],
    *,
    env: dict[str, str] | None = None,
    extra_args: tuple[str, ...] = (),
) -> AsyncIterator[BrokerProcess]:
    """Run `python -m broker run` on `config` until every service listens; SIGTERM on exit."""
    path = write_config(directory, config)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "broker", "run", "--config", str(path), *extra_args,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE, env={**os.environ, **(env or {})},
    )  # fmt: skip
    broker = BrokerProcess(proc)
    broker._want = {s["name"] for s in config["services"]}
    broker._reader = asyncio.create_task(broker._read())
    try:
        await asyncio.wait_for(broker._bound.wait(), START_SECONDS)
        if not broker._want <= set(broker.listening):
            log = broker.raw_log.decode()[-3000:]
            raise RuntimeError(f"broker exited before listening:\n{log}")
        yield broker
    finally:
        await broker.stop()
