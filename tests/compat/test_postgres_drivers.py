"""The PostgreSQL drivers of the matrix through the broker: psql, asyncpg, psycopg 3,
psycopg2, SQLAlchemy (psycopg, asyncpg), Django, node-postgres, pgx and pgjdbc, each
connected with its row's settings in tests/compat/drivers.py and run through the same
everyday features (real PostgreSQL, real OpenBao dynamic users)."""

from __future__ import annotations

import asyncio
import io
import ssl
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import psycopg
import psycopg2
import pytest
import sqlalchemy
from sqlalchemy.ext.asyncio import create_async_engine

from broker.runtime import Broker
from tests.compat import django_project
from tests.compat.drivers import settings
from tests.compat.harness import Files, Report, build_clients, run_program, tls_env
from tests.pki import Pki
from tests.servers import VaultDatabase
from tests.test_postgres_adapter import DENIED_ID, World, host_port, psql, run, service
from tests.test_postgres_set_role import OWNER, owner_schema, owner_service

ROWS = 100_000
LARGE = f"SELECT g, repeat('x', 100) FROM generate_series(1, {ROWS}) g"


@dataclass
class Pg:
    broker: Broker
    host: str
    port: int
    files: Files
    denied: Files

    def dsn(self, driver: str, denied: bool = False) -> str:
        files = self.denied if denied else self.files
        return settings(driver, **files.values(self.host, self.port))


@pytest.fixture
def world(
    tmp_path: Path, pki: Pki, vault_database: VaultDatabase, monkeypatch: pytest.MonkeyPatch
) -> World:
    return World(tmp_path, pki, vault_database, monkeypatch)


@pytest.fixture
async def pg(world: World) -> AsyncIterator[Pg]:
    async with world.broker(service(world.vdb.postgres)) as b:
        host, port = host_port(b)
        pki = world.pki
        yield Pg(b, host, port, Files.of(pki.client()), Files.of(pki.client(DENIED_ID)))


def ssl_context(files: Files) -> ssl.SSLContext:
    """What the asyncpg, httpx and aiohttp rows say: the bundle and the SVID."""
    ctx = ssl.create_default_context(cafile=str(files.ca))
    ctx.load_cert_chain(str(files.cert), str(files.key))
    return ctx


# --------------------------------------------------------------------------- psql


async def test_psql(pg: Pg) -> None:
    report = Report("psql")
    dsn = pg.dsn("psql").removeprefix("psql '").removesuffix("'")
    with report.feature("connect"):
        code, out, err = await psql(dsn, "SELECT 1")
        assert (code, out.strip()) == (0, "1"), err
    with report.feature("prepared"):
        sql = "PREPARE add(int, int) AS SELECT $1 + $2; EXECUTE add(40, 2)"
        code, out, err = await psql(dsn, sql)
        assert code == 0 and out.split()[-1] == "42", (out, err)
    with report.feature("transaction"):
        code, out, err = await run(
            "psql", "-X", "-w", "-At", "-v", "ON_ERROR_STOP=1", dsn,
            "-c", "CREATE TEMP TABLE t (n int)", "-c", "BEGIN", "-c", "INSERT INTO t VALUES (1)",
            "-c", "ROLLBACK", "-c", "SELECT count(*) FROM t",
        )  # fmt: skip
        assert code == 0 and out.split()[-1] == "0", (out, err)
    with report.feature("copy"):
        rows = "".join(f"{i}\trow {i}\n" for i in range(1000))
        proc = await asyncio.create_subprocess_exec(
            "psql", "-X", "-w", "-At", "-v", "ON_ERROR_STOP=1", dsn,
            "-c", "CREATE TEMP TABLE t (n int, s text)", "-c", r"\copy t from stdin",
            "-c", "SELECT count(*) FROM t",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out_b, err_b = await asyncio.wait_for(proc.communicate(rows.encode()), 30)
        assert proc.returncode == 0 and out_b.split()[-1] == b"1000", (out_b, err_b)
    with report.feature("listen_notify"):
        code, out, err = await psql(
            dsn, "LISTEN ch; NOTIFY ch, 'hello'; SELECT 'pid=' || pg_backend_pid()"
        )
        pid = out.split("pid=")[1].split()[0]
        assert f'"ch" with payload "hello" received from server process with PID {pid}' in out
    with report.feature("timeout"):
        code, out, err = await psql(dsn, "SET statement_timeout = 500; SELECT pg_sleep(20)")
        assert code != 0 and "canceling statement due to statement timeout" in err, err
    with report.feature("large_result"):
        code, out, err = await psql(dsn, LARGE)
        assert code == 0 and len(out.splitlines()) == ROWS, err
    with report.feature("denied") as detail:
        code, _, err = await psql(pg.dsn("psql", denied=True).split("'")[1], "SELECT 1")
        assert code != 0
        detail.append(err)
    report.check()


# --------------------------------------------------------------------------- asyncpg


async def test_asyncpg(pg: Pg) -> None:
    report = Report("asyncpg")
    kwargs = {"host": pg.host, "port": pg.port, "user": "any", "database": "appdb"}
    with report.feature("connect"):
        conn = await asyncpg.connect(**kwargs, ssl=ssl_context(pg.files), timeout=30)
    try:
        with report.feature("prepared"):
            stmt = await conn.prepare("SELECT $1::int + $2::int")
            assert await stmt.fetchval(40, 2) == 42
        with report.feature("transaction"):
            await conn.execute("CREATE TEMP TABLE t (n int, s text)")
            with pytest.raises(ZeroDivisionError):
                async with conn.transaction():
                    await conn.execute("INSERT INTO t VALUES (1, 'x')")
                    _ = 1 / 0
            assert await conn.fetchval("SELECT count(*) FROM t") == 0
        with report.feature("copy"):
            copied = await conn.copy_records_to_table(
                "t", records=[(i, f"row {i}") for i in range(1000)]
            )
            assert copied == "COPY 1000"
        with report.feature("listen_notify"):
            heard: asyncio.Queue[int] = asyncio.Queue()
            await conn.add_listener("ch", lambda _c, pid, _ch, _p: heard.put_nowait(pid))
            await conn.execute("NOTIFY ch, 'hello'")
            assert await asyncio.wait_for(heard.get(), 10) == conn.get_server_pid()
        with report.feature("cancel"):
            with pytest.raises(TimeoutError):
                await conn.fetchval("SELECT pg_sleep(20)", timeout=0.5)
            assert await conn.fetchval("SELECT 1", timeout=10) == 1
        with report.feature("large_result"):
            assert len(await conn.fetch(LARGE)) == ROWS
    finally:
        await conn.close()
    with report.feature("denied") as detail:
        with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError) as raised:
            await asyncpg.connect(**kwargs, ssl=ssl_context(pg.denied), timeout=30)
        detail.append(str(raised.value))
    report.check()


# --------------------------------------------------------------------------- psycopg 3


async def test_psycopg3(pg: Pg) -> None:
    report = Report("psycopg 3")
    dsn = pg.dsn("psycopg 3").split("'")[1]
    for negotiation in ("", " sslnegotiation=direct"):
        with report.feature("connect"):
            conn = await psycopg.AsyncConnection.connect(dsn + negotiation, autocommit=True)
            await conn.close()
    conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
    async with conn:
        with report.feature("prepared"):
            cur = await conn.execute("SELECT %s::int + %s::int", (40, 2), prepare=True)
            assert await cur.fetchone() == (42,)
        with report.feature("transaction"):
            await conn.execute("CREATE TEMP TABLE t (n int, s text)")
            with pytest.raises(ZeroDivisionError):
                async with conn.transaction():
                    await conn.execute("INSERT INTO t VALUES (1, 'x')")
                    _ = 1 / 0
            assert await (await conn.execute("SELECT count(*) FROM t")).fetchone() == (0,)
        with report.feature("copy"):
            async with conn.cursor().copy("COPY t FROM STDIN") as copy:
                for i in range(1000):
                    await copy.write_row((i, f"row {i}"))
            assert await (await conn.execute("SELECT count(*) FROM t")).fetchone() == (1000,)
        with report.feature("listen_notify"):
            await conn.execute("LISTEN ch")
            await conn.execute("NOTIFY ch, 'hello'")
            async for note in conn.notifies(timeout=10, stop_after=1):
                assert (note.payload, note.pid) == ("hello", conn.info.backend_pid)
        with report.feature("cancel"):
            query = asyncio.create_task(conn.execute("SELECT pg_sleep(20)"))
            await asyncio.sleep(0.5)
            await conn.cancel_safe(timeout=10)
            with pytest.raises(psycopg.errors.QueryCanceled):
                await query
        with report.feature("large_result"):
            assert len(await (await conn.execute(LARGE)).fetchall()) == ROWS
    with report.feature("denied") as detail:
        with pytest.raises(psycopg.OperationalError) as raised:
            await psycopg.AsyncConnection.connect(pg.dsn("psycopg 3", denied=True).split("'")[1])
        detail.append(str(raised.value))
    report.check()


# --------------------------------------------------------------------------- psycopg2


def _psycopg2(report: Report, dsn: str, denied_dsn: str) -> None:
    with report.feature("connect"):
        conn = psycopg2.connect(dsn)
    try:
        cur = conn.cursor()
        with report.feature("prepared"):
            cur.execute("PREPARE add(int, int) AS SELECT $1 + $2")
            cur.execute("EXECUTE add(%s, %s)", (40, 2))
            assert cur.fetchone() == (42,)
        with report.feature("transaction"):
            cur.execute("CREATE TEMP TABLE t (n int, s text)")
            conn.commit()
            cur.execute("INSERT INTO t VALUES (1, 'x')")
            conn.rollback()
            cur.execute("SELECT count(*) FROM t")
            assert cur.fetchone() == (0,)
        with report.feature("copy"):
            cur.copy_expert(
                "COPY t FROM STDIN", io.StringIO("".join(f"{i}\trow {i}\n" for i in range(1000)))
            )
            cur.execute("SELECT count(*) FROM t")
            assert cur.fetchone() == (1000,)
        with report.feature("listen_notify"):
            conn.commit()
            conn.autocommit = True
            cur.execute("LISTEN ch")
            cur.execute("NOTIFY ch, 'hello'")
            conn.poll()
            note = conn.notifies.pop()
            assert (note.payload, note.pid) == ("hello", conn.info.backend_pid)
        with report.feature("timeout"):
            cur.execute("SET statement_timeout = 500")
            with pytest.raises(psycopg2.errors.QueryCanceled):
                cur.execute("SELECT pg_sleep(20)")
            cur.execute("RESET statement_timeout")
        with report.feature("large_result"):
            cur.execute(LARGE)
            assert len(cur.fetchall()) == ROWS
    finally:
        conn.close()
    with report.feature("denied") as detail:
        with pytest.raises(psycopg2.OperationalError) as raised:
            psycopg2.connect(denied_dsn)
        detail.append(str(raised.value))


# In a process of its own: psycopg2's connection.cancel() keeps the GIL through libpq's
# blocking PQcancel, which would stall the in-process broker that must answer it.
PSYCOPG2_CANCEL = """
import sys, threading, psycopg2, psycopg2.errors
conn = psycopg2.connect(sys.argv[1])
threading.Timer(0.5, conn.cancel).start()
try:
    conn.cursor().execute("SELECT pg_sleep(20)")
except psycopg2.errors.QueryCanceled as exc:
    print("cancelled:", exc)
"""


async def test_psycopg2(pg: Pg) -> None:
    report = Report("psycopg2")
    dsn = pg.dsn("psycopg2").split("'")[1]
    await asyncio.to_thread(_psycopg2, report, dsn, pg.dsn("psycopg2", denied=True).split("'")[1])
    with report.feature("cancel") as detail:
        code, out, err = await run(sys.executable, "-c", PSYCOPG2_CANCEL, dsn)
        assert code == 0 and "canceling statement due to user request" in out, (out, err)
        detail.append(out)
    report.check()


# --------------------------------------------------------------------------- SQLAlchemy


def _sqlalchemy_sync(report: Report, url: str, denied_url: str) -> None:
    engine = sqlalchemy.create_engine(url)
    try:
        with report.feature("connect"), engine.connect() as conn:
            assert conn.execute(sqlalchemy.text("SELECT 1")).scalar() == 1
        with engine.connect() as conn:
            with report.feature("prepared"):
                add = sqlalchemy.text("SELECT CAST(:a AS int) + :b")
                got = conn.execute(add, {"a": 40, "b": 2})
                assert got.scalar() == 42
            with report.feature("transaction"):
                conn.execute(sqlalchemy.text("CREATE TEMP TABLE t (n int, s text)"))
                conn.commit()
                conn.execute(sqlalchemy.text("INSERT INTO t VALUES (1, 'x')"))
                conn.rollback()
                assert conn.execute(sqlalchemy.text("SELECT count(*) FROM t")).scalar() == 0
            with report.feature("bulk_insert"):
                conn.execute(
                    sqlalchemy.text("INSERT INTO t VALUES (:n, :s)"),
                    [{"n": i, "s": f"row {i}"} for i in range(1000)],
                )
                assert conn.execute(sqlalchemy.text("SELECT count(*) FROM t")).scalar() == 1000
            with report.feature("large_result"):
                assert len(conn.execute(sqlalchemy.text(LARGE)).all()) == ROWS
    finally:
        engine.dispose()
    denied = sqlalchemy.create_engine(denied_url)
    with report.feature("denied") as detail:
        with pytest.raises(sqlalchemy.exc.OperationalError) as raised, denied.connect():
            pass
        detail.append(str(raised.value))
    denied.dispose()


async def test_sqlalchemy_psycopg(pg: Pg) -> None:
    report = Report("SQLAlchemy + psycopg")
    url = pg.dsn("SQLAlchemy + psycopg").split("'")[1]
    denied = pg.dsn("SQLAlchemy + psycopg", denied=True).split("'")[1]
    await asyncio.to_thread(_sqlalchemy_sync, report, url, denied)
    report.check()


async def test_sqlalchemy_asyncpg(pg: Pg) -> None:
    report = Report("SQLAlchemy + asyncpg")
    url = f"postgresql+asyncpg://any@{pg.host}:{pg.port}/appdb"
    engine = create_async_engine(url, connect_args={"ssl": ssl_context(pg.files)})
    text = sqlalchemy.text
    try:
        with report.feature("connect"):
            async with engine.connect() as conn:
                assert (await conn.execute(text("SELECT 1"))).scalar() == 1
        async with engine.connect() as conn:
            with report.feature("prepared"):
                got = await conn.execute(text("SELECT CAST(:a AS int) + :b"), {"a": 40, "b": 2})
                assert got.scalar() == 42
            with report.feature("transaction"):
                await conn.execute(text("CREATE TEMP TABLE t (n int, s text)"))
                await conn.commit()
                await conn.execute(text("INSERT INTO t VALUES (1, 'x')"))
                await conn.rollback()
                assert (await conn.execute(text("SELECT count(*) FROM t"))).scalar() == 0
            with report.feature("bulk_insert"):
                await conn.execute(
                    text("INSERT INTO t VALUES (:n, :s)"),
                    [{"n": i, "s": f"row {i}"} for i in range(1000)],
                )
                assert (await conn.execute(text("SELECT count(*) FROM t"))).scalar() == 1000
            with report.feature("large_result"):
                assert len((await conn.execute(text(LARGE))).all()) == ROWS
    finally:
        await engine.dispose()
    denied = create_async_engine(url, connect_args={"ssl": ssl_context(pg.denied)})
    with report.feature("denied") as detail:
        with pytest.raises(sqlalchemy.exc.DBAPIError) as raised:
            async with denied.connect():
                pass
        detail.append(str(raised.value))
    await denied.dispose()
    report.check()


# --------------------------------------------------------------------------- Django


async def test_django_migrate_across_a_lease_revocation(world: World) -> None:
    report = Report("Django")
    schema = owner_schema(world.vdb)
    svc = owner_service(world, set_role=True)
    files = Files.of(world.pki.client())
    project = world.tmp_path / "django"
    with report.feature("migrate"):
        for migrations in (["0001_initial"], ["0001_initial", "0002_note"]):
            async with world.broker(svc) as b:  # stopping the broker revokes the lease
                host, port = host_port(b)
                database = django_project.database_settings(
                    host, port, bundle=files.ca, cert=files.cert, key=files.key, schema=schema
                )
                django_project.write_project(project, database, migrations)
                code, out = await django_project.migrate(project)
                assert code == 0 and f"compatapp.{migrations[-1]}... OK" in out, out
        owner = world.vdb.postgres.psql(
            f"SELECT tableowner FROM pg_tables WHERE schemaname = '{schema}' "
            "AND tablename = 'compatapp_order'",
            database="appdb",
        )
        assert owner.strip() == OWNER
    report.check()


# --------------------------------------------------------------------------- Node, Go, Java


@pytest.fixture(scope="module")
def clients() -> Path:
    return build_clients()


async def test_node_postgres(pg: Pg, clients: Path) -> None:
    report = Report("node-postgres (pg)")
    env = {"COMPAT_HOST": pg.host, "COMPAT_PORT": str(pg.port), **tls_env(pg.files, pg.denied)}
    report.add_lines(await run_program(["node", "compat.mjs", "pg"], env, cwd=clients / "node"))
    report.check()


async def test_pgx(pg: Pg, clients: Path) -> None:
    report = Report("pgx")
    env = {
        "COMPAT_DSN": pg.dsn("pgx").split("'")[1],
        "COMPAT_DENIED_DSN": pg.dsn("pgx", denied=True).split("'")[1],
    }
    report.add_lines(await run_program([str(clients / "compat-go"), "pgx"], env))
    report.check()


async def test_pgjdbc(pg: Pg, clients: Path) -> None:
    report = Report("pgjdbc")
    env = {"COMPAT_JDBC_URL": pg.dsn("pgjdbc"), "COMPAT_DENIED_JDBC_URL": pg.dsn("pgjdbc", True)}
    java = clients / "java" / "target"
    argv = ["java", "-cp", f"{java}/classes:{java}/lib/*", "compat.Compat", "pgjdbc"]
    report.add_lines(await run_program(argv, env))
    report.check()
