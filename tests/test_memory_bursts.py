"""Native memory under bursts of PostgreSQL sessions (issue 19.3): a broker process takes
bursts of concurrent mTLS sessions, and its RSS must level off rather than climb per burst.

25 bursts of 300 took a fresh broker from 85 to 427 MB and still climbing while Python's own
allocations stayed flat. The quick version here runs MEMORY_BURSTS bursts of MEMORY_BURST_SIZE
(environment variables, for the full reproduction). Until the cause is found and fixed the
test runs only when MEMORY_BURSTS is set, so `make test` stays green.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import time
from pathlib import Path

import asyncpg
import pytest

from tests.brokers import base_config
from tests.pki import Pki, client_ssl_context
from tests.procs import broker_process
from tests.servers import VaultDatabase
from tests.test_postgres_adapter import SERVICE, service

BURSTS = int(os.environ.get("MEMORY_BURSTS", "12"))
BURST_SIZE = int(os.environ.get("MEMORY_BURST_SIZE", "150"))
# Bursts before the level is taken: the first ones grow the heap to its working size.
WARM_UP_BURSTS = max(2, BURSTS // 3)
# Allowed growth over the second part of the run, per burst of BURST_SIZE sessions. Before the
# fix the broker grew ~14 MB per burst of 300 (~45 KB per session) without end.
MAX_GROWTH_PER_BURST = 1.0 * 1024 * 1024
CLIENT_TIMEOUT = 60.0


async def one_session(host: str, port: int, ctx: ssl.SSLContext) -> None:
    conn = await asyncpg.connect(
        host=host, port=port, user="x", database="appdb", ssl=ctx, timeout=CLIENT_TIMEOUT
    )
    try:
        assert await conn.fetchval("SELECT 1") == 1
    finally:
        await conn.close()


@pytest.mark.skipif(
    not os.environ.get("MEMORY_BURSTS"),
    reason="issue 19.3 is not fixed yet; run with MEMORY_BURSTS=25 MEMORY_BURST_SIZE=300",
)
@pytest.mark.timeout(900)
async def test_rss_levels_off_under_bursts_of_sessions(
    tmp_path: Path, pki: Pki, vault_database: VaultDatabase
) -> None:
    pg = vault_database.postgres
    svc = service(pg, max_connections=BURST_SIZE + 50)
    config = base_config(pki, services=[svc], vault=vault_database.openbao, admin=False)
    env = {"SIDEKEY_TEST_VAULT_TOKEN": vault_database.openbao.token}
    ctx = client_ssl_context(pki, pki.client())
    async with broker_process(tmp_path, config, env=env) as proc:
        host, port = proc.address(SERVICE)
        await one_session(host, port, ctx)
        samples: list[int] = [proc.rss_bytes()]
        started = time.monotonic()
        for _ in range(BURSTS):
            results = await asyncio.gather(
                *(one_session(host, port, ctx) for _ in range(BURST_SIZE)),
                return_exceptions=True,
            )
            errors = [r for r in results if isinstance(r, BaseException)]
            assert not errors, errors[:3]
            samples.append(proc.rss_bytes())
        elapsed = time.monotonic() - started
        mb = [round(s / 2**20, 1) for s in samples]
        print(f"{BURSTS} bursts of {BURST_SIZE} in {elapsed:.0f}s; RSS MB per burst: {mb}")
        level = samples[WARM_UP_BURSTS]
        growth = samples[-1] - level
        allowed = MAX_GROWTH_PER_BURST * (BURSTS - WARM_UP_BURSTS) * BURST_SIZE / 300
        assert growth <= allowed, (
            f"RSS still climbing: {growth / 2**20:.1f} MB over the last "
            f"{BURSTS - WARM_UP_BURSTS} bursts (allowed {allowed / 2**20:.1f}); {mb}"
        )
