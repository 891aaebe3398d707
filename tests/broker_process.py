"""A broker run as a user runs it: `sidekey run` in a subprocess, for signal and fleet tests.

Listen addresses are fixed free loopback ports (a subprocess cannot hand back a port 0), the
admin server tells readiness, and `stop()` ends only the process this helper started.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# A broker starts in well under a second; a loaded CI box may take several.
START_DEADLINE_SECONDS = 30.0
POLL_SECONDS = 0.05


@dataclass
class BrokerProcess:
    config: Path
    admin: str
    proc: subprocess.Popen[bytes] = field(repr=False)
    log_path: Path

    @classmethod
    def start(
        cls, config: Path, admin: str, *, env: dict[str, str] | None = None, drain: float = 10.0
    ) -> BrokerProcess:
        log_path = config.with_suffix(".log")
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "broker", "run", "--config", str(config),
                 "--drain-timeout", str(drain), "--log-format", "text"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
            )  # fmt: skip
        broker = cls(config, admin, proc, log_path)
        broker.wait_ready()
        return broker

    def get(self, path: str) -> tuple[int, Any]:
        try:
            with urllib.request.urlopen(f"http://{self.admin}{path}", timeout=5) as resp:
                return resp.status, json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    def wait_ready(self, deadline: float = START_DEADLINE_SECONDS) -> None:
        end = time.monotonic() + deadline
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"broker exited with {self.proc.returncode}:\n{self.log()}")
            try:
                status, _ = self.get("/readyz")
                if status == 200:
                    return
            except (urllib.error.URLError, OSError, ValueError):
                pass
            if time.monotonic() > end:
                raise RuntimeError(f"broker not ready after {deadline}s:\n{self.log()}")
            time.sleep(POLL_SECONDS)

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        """SIGTERM this process, SIGKILL it if it has not drained within a minute."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
