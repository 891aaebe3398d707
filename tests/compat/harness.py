"""What every matrix test shares: the workload's files as each driver takes them, the built
Go/Node/Java clients, running them, and checking that each feature of a driver's row in
tests/compat/drivers.py passed."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    load_pem_private_key,
)

from broker.identity.ca import IssuedFiles
from tests.compat.drivers import BY_NAME

REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / "scripts" / "build-compat.sh"
# One client program runs all its features, each bounded by 30 s inside; past this it hangs.
PROGRAM_TIMEOUT = 240.0
# Building the Go/Node/Java clients from empty caches (tests/compat/README.md has figures).
BUILD_TIMEOUT = 1500.0
DENIED_TEXT = "is not allowed to use service"


@dataclass(frozen=True)
class Files:
    """One identity's files: PEM certificate and key, the key as PKCS#8 DER, the bundle."""

    cert: Path
    key: Path
    key_der: Path
    ca: Path

    @classmethod
    def of(cls, issued: IssuedFiles) -> Files:
        der = issued.key.with_suffix(".pk8")
        if not der.exists():
            key = load_pem_private_key(issued.key.read_bytes(), password=None)
            der.write_bytes(key.private_bytes(Encoding.DER, PrivateFormat.PKCS8, NoEncryption()))
            der.chmod(0o600)  # libpq and pgjdbc refuse a key others may read
        return cls(issued.cert, issued.key, der, issued.bundle)

    def values(self, host: str, port: int) -> dict[str, Any]:
        return {
            "host": host, "port": port, "cert": self.cert, "key": self.key,
            "key_der": self.key_der, "ca": self.ca, "url": f"https://{host}:{port}",
        }  # fmt: skip


@dataclass
class Report:
    """What one driver's run said, feature by feature."""

    driver: str
    results: dict[str, tuple[bool, str]] = field(default_factory=dict)

    @contextlib.contextmanager
    def feature(self, name: str) -> Iterator[list[str]]:
        """Run a feature in-process: an exception fails it; append to the list for detail."""
        detail: list[str] = []
        try:
            yield detail
        except Exception as exc:  # every failure is a result to report
            self.results[name] = (False, f"{type(exc).__name__}: {exc}")
        else:
            self.results[name] = (True, " ".join(detail))

    def add_lines(self, output: str) -> None:
        for line in output.splitlines():
            if line.startswith("{"):
                record = json.loads(line)
                self.results[record["feature"]] = (bool(record["ok"]), str(record["detail"]))

    def check(self) -> None:
        """Every feature of the driver's row passed; a denied identity was told why."""
        expected = BY_NAME[self.driver].features
        failed = {f: self.results.get(f, (False, "did not run")) for f in expected}
        failed = {f: r for f, r in failed.items() if not r[0]}
        assert not failed, f"{self.driver}: {failed}"
        if "denied" in expected:
            assert DENIED_TEXT in self.results["denied"][1], self.results["denied"]


def build_clients() -> Path:
    """The directory of the built Go/Node/Java clients (built now if missing)."""
    result = subprocess.run(
        [str(BUILD_SCRIPT)], capture_output=True, text=True, timeout=BUILD_TIMEOUT, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"scripts/build-compat.sh failed:\n{result.stderr[-4000:]}")
    return Path(result.stdout.strip().splitlines()[-1])


async def run_program(argv: list[str], env: dict[str, str], cwd: Path | None = None) -> str:
    """Run one client program; its stdout (JSON lines). Fails on a hang or a crash."""
    proc = await asyncio.create_subprocess_exec(
        *argv, cwd=cwd, env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(proc.communicate(), PROGRAM_TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    if proc.returncode != 0:
        raise AssertionError(f"{argv[0]} exited {proc.returncode}: {err.decode()[-2000:]}")
    return out.decode()


def tls_env(files: Files, denied: Files) -> dict[str, str]:
    return {
        "COMPAT_CERT": str(files.cert), "COMPAT_KEY": str(files.key),
        "COMPAT_KEY_DER": str(files.key_der), "COMPAT_CA": str(files.ca),
        "COMPAT_DENIED_CERT": str(denied.cert), "COMPAT_DENIED_KEY": str(denied.key),
        "COMPAT_DENIED_KEY_DER": str(denied.key_der),
    }  # fmt: skip
