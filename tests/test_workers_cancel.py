"""PostgreSQL cancels under `workers: N`: a CancelRequest reaches its session whichever worker
the kernel gives its connection to (broker/session/siblings.py, adapters/postgres/_cancel.py).

A cancel comes on a new connection, which the kernel hands to any worker (a hash of the
client's port), while its key lives in the worker that served the session: before siblings
were asked, one cancel in two reached its query here. Real processes (`sidekey run` with two
workers), a real PostgreSQL with leases from a real OpenBao, real clients (psycopg's
cancel_safe over mTLS, raw CancelRequests as psql 15 sends them in plaintext).
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.pki import Pki, client_ssl_context
from tests.servers import Postgres, VaultDatabase
from tests.test_signals import DEADLINE, OTHER_ID, Setup, until

WORKERS = 2
# Sessions, each cancelled from a fresh connection: each cancel lands on its session's worker
# with probability 1/2, so without routing between workers all of them would reach their
# query with probability 2**-8 (before the fix, three runs: some of the 8 ran 30 s).
SESSIONS = 8
# A cancelled query ends within this (it ran for 30 s otherwise).
CANCELLED_WITHIN = 5.0
QUERY_CANCELED = "57014"
CANCEL_REQUEST_CODE = 80877102
SSL_REQUEST_CODE = 80877103
# Cancels that must do nothing, each from a fresh connection: all of them land on the
# session's own worker with probability 2**-16.
ATTEMPTS = 16
# Made-up cancels from one address, well past what the sibling limit lets through.
FLOOD = 300


class TwoWorkers(Setup):
    def config(self, allow: list[Any] | None = None) -> dict[str, Any]:
        config = super().config(allow)
        config["workers"] = WORKERS
        return config

    def dsn(self, spiffe_id: str | None = None) -> str:
        issued = self.pki.client(spiffe_id) if spiffe_id else self.pki.client()
        return (
            f"host=localhost port={self.port} dbname=appdb user=ignored sslmode=verify-full "
            f"sslrootcert={self.pki.bundle} sslcert={issued.cert} sslkey={issued.key} "
            "connect_timeout=10"
        )

    def full_log(self) -> str:
        return "\n".join(b.log_path.read_text(errors="replace") for b in self.brokers)


@pytest.fixture
async def setup(
    tmp_path: Path, pki: Pki, vault_database: VaultDatabase
) -> AsyncIterator[TwoWorkers]:
    s = TwoWorkers(tmp_path, pki, vault_database)
    try:
        yield s
    finally:
        for broker in s.brokers:
            await asyncio.to_thread(broker.stop)


async def _active(pg: Postgres, query: str) -> int:
    rows = await pg.admin_fetch(
        "SELECT count(*) AS n FROM pg_stat_activity WHERE query = $1 AND state = 'active'", query
    )
    return int(rows[0]["n"])


async def _raw_cancel(
    port: int,
    pid: int,
    secret: bytes,
    ssl: Any = None,
    *,
    timeout: float = 10.0,
    source: str = "127.0.0.1",
) -> bytes:
    """A CancelRequest on a fresh connection (over TLS when `ssl` is given) from the loopback
    address `source`; what the broker answered before it closed (PostgreSQL answers nothing)."""
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
        try:
            if ssl is not None:
                writer.write(struct.pack("!II", 8, SSL_REQUEST_CODE))
                assert await reader.readexactly(1) == b"S"
                await writer.start_tls(ssl, server_hostname="localhost")
            writer.write(struct.pack("!iiI", 12 + len(secret), CANCEL_REQUEST_CODE, pid) + secret)
            return await reader.read()
        finally:
            writer.close()
            await writer.wait_closed()


async def _sessions(setup: TwoWorkers, n: int) -> list[psycopg.AsyncConnection[Any]]:
    return [await psycopg.AsyncConnection.connect(setup.dsn(), autocommit=True) for _ in range(n)]


async def test_every_cancel_reaches_its_query_whichever_worker_gets_it(
    setup: TwoWorkers,
) -> None:
    setup.start()
    pg = setup.vdb.postgres
    conns = await _sessions(setup, SESSIONS)
    try:
        query = "SELECT pg_sleep(30)"
        running = [asyncio.create_task(c.execute(query)) for c in conns]

        async def all_running() -> bool:
            return await _active(pg, query) == SESSIONS

        await until(all_running, f"{SESSIONS} queries to run")
        started = time.monotonic()
        # Each cancel on a connection of its own (libpq 17+'s PQcancelConn, over mTLS with
        # the session's own certificate), so the kernel picks a worker for each.
        for conn in conns:
            await conn.cancel_safe(timeout=10)
        outcomes = await asyncio.wait_for(
            asyncio.gather(*running, return_exceptions=True), CANCELLED_WITHIN
        )
        took = time.monotonic() - started
        states = [getattr(o, "sqlstate", repr(o)) for o in outcomes]
        assert states == [QUERY_CANCELED] * SESSIONS, f"{states}\n{setup.full_log()[-4000:]}"
        assert took < CANCELLED_WITHIN
        for conn in conns:
            cur = await conn.execute("SELECT 1")
            assert await cur.fetchone() == (1,), "the session goes on after its cancel"
    finally:
        for conn in conns:
            await conn.close()


async def test_plaintext_cancels_cross_workers_too(setup: TwoWorkers) -> None:
    """psql 15's PQcancel: a plaintext CancelRequest, where the key alone decides."""
    import asyncpg

    setup.start()
    pg = setup.vdb.postgres
    conns = [await setup.connect() for _ in range(SESSIONS)]
    try:
        query = "SELECT pg_sleep(30)"
        running = [asyncio.create_task(c.fetchval(query)) for c in conns]

        async def all_running() -> bool:
            return await _active(pg, query) == SESSIONS

        await until(all_running, f"{SESSIONS} queries to run")
        for conn in conns:
            pid, secret = conn.get_server_pid(), _secret(conn._protocol.backend_secret)
            assert await _raw_cancel(setup.port, pid, secret) == b""
        outcomes = await asyncio.wait_for(
            asyncio.gather(*running, return_exceptions=True), CANCELLED_WITHIN
        )
        assert all(isinstance(o, asyncpg.QueryCanceledError) for o in outcomes), outcomes
        assert {o.sqlstate for o in outcomes if isinstance(o, asyncpg.PostgresError)} == {
            QUERY_CANCELED
        }
    finally:
        for conn in conns:
            await conn.close()


async def test_a_wrong_key_or_another_identity_cancels_nothing_on_any_worker(
    setup: TwoWorkers,
) -> None:
    """Mirrors test_postgres_pid's single-worker test: a guessed secret for the real pid, and
    the right key over mTLS from another identity, both ignored by the worker that holds
    the session as by the one that does not."""
    setup.start()
    pg = setup.vdb.postgres
    conn = await setup.connect()
    try:
        pid, secret = conn.get_server_pid(), _secret(conn._protocol.backend_secret)
        query = "SELECT pg_sleep(5)"
        running = asyncio.create_task(conn.fetchval(query))

        async def started() -> bool:
            return await _active(pg, query) == 1

        await until(started, "the query to run")
        other = client_ssl_context(setup.pki, setup.pki.client(OTHER_ID))
        wrong = bytes(b ^ 0xFF for b in secret)
        for _ in range(ATTEMPTS):
            assert await _raw_cancel(setup.port, pid, wrong) == b""
            assert await _raw_cancel(setup.port, pid, secret, other) == b""
        assert await asyncio.wait_for(running, DEADLINE) is None, "the query ran to its end"
        log = setup.full_log()
        # The refusal was made by the worker holding the session, for cancels that reached
        # its sibling: the caller's identity travels with the cancel.
        assert f"ignoring cancel from {OTHER_ID}: not the session's identity" in log
        assert "forwarded by worker" in log, log[-4000:]
        assert secret.hex() not in log, "no secret in the log"
    finally:
        await conn.close()


async def test_cancels_passed_to_the_other_workers_are_limited_per_peer_address(
    setup: TwoWorkers,
) -> None:
    """A CancelRequest needs no TLS and no identity, and a worker that does not hold its key
    asks every other worker: a peer sending made-up keys is limited to SIBLING_CANCELS_BURST
    at once and SIBLING_CANCELS_PER_SECOND after, per worker; past it its cancels are dropped
    (counted, logged once). A cancel from another address still reaches its query."""
    from adapters.postgres._cancel import SIBLING_CANCELS_BURST, SIBLING_CANCELS_PER_SECOND
    from tests.test_workers import _metrics

    setup.start()
    pg = setup.vdb.postgres
    conn = await setup.connect()
    try:
        pid, secret = conn.get_server_pid(), _secret(conn._protocol.backend_secret)
        wrong = bytes(b ^ 0xFF for b in secret)
        began = time.monotonic()
        for _ in range(FLOOD):
            assert await _raw_cancel(setup.port, pid, wrong) == b""
        took = time.monotonic() - began
        query = "SELECT pg_sleep(30)"
        running = asyncio.create_task(conn.fetchval(query))

        async def started() -> bool:
            return await _active(pg, query) == 1

        await until(started, "the query to run")
        assert await _raw_cancel(setup.port, pid, secret, source="127.0.0.2") == b""
        with pytest.raises(Exception, match="canceling statement"):
            await asyncio.wait_for(running, CANCELLED_WITHIN)
        counts = {
            name.split('outcome="')[1].split('"')[0]: value
            for name, value in _metrics(setup.admin).items()
            if name.startswith("sidekey_cancel_requests_total{")
        }
        passed_most = WORKERS * (SIBLING_CANCELS_BURST + SIBLING_CANCELS_PER_SECOND * took)
        assert counts.get("limited", 0) >= FLOOD - passed_most, (counts, took)
        assert counts.get("limited", 0) + counts.get("unknown", 0) == FLOOD, counts
        assert counts.get("forwarded") == 1, counts
        assert setup.full_log().count("not passed to the other workers") == WORKERS
    finally:
        await conn.close()


def _secret(secret: object) -> bytes:
    # asyncpg keeps the BackendKeyData secret as an int (protocol 3.0's 4 bytes).
    return struct.pack("!i", secret) if isinstance(secret, int) else bytes(secret)  # type: ignore[call-overload]
