"""Real client programs run from a test, and the address a broker's service listens on: the
set-up the adapters' end-to-end tests share (PostgreSQL, MySQL, Redis, local attestation).

    code, out, err = await run_client(["psql", dsn, "-c", "SELECT 1"])
    host, port = host_port(broker, "orders-db")
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping, Sequence

from broker.runtime import Broker

# A client program against a local broker answers in well under a second; a loaded CI box
# takes more, and one that has not finished in this long is hanging.
CLIENT_TIMEOUT = 30.0


def host_port(broker: Broker, service: str) -> tuple[str, int]:
    """Where `service` of an in-process broker listens (TCP)."""
    host, _, port = broker.address(service).rpartition(":")
    return host, int(port)


async def run_client(
    argv: Sequence[str], *, env: Mapping[str, str] | None = None, timeout: float = CLIENT_TIMEOUT
) -> tuple[int, str, str]:
    """Run a client program without blocking the event loop the broker runs on: (exit code,
    stdout, stderr). `env` is added to this process's environment; a client still running
    after `timeout` is killed and TimeoutError raised."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **env} if env else None,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()
