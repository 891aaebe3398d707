"""The MySQL and Redis clients of the matrix through the broker: the mysql CLI (MariaDB's),
PyMySQL, go-sql-driver/mysql, redis-cli, redis-py and go-redis, each configured with its
row's settings in tests/compat/drivers.py, against real MariaDB and redis-server with
per-workload users from OpenBao."""

from __future__ import annotations

import asyncio
import shlex
import time
from pathlib import Path

import pymysql
import pytest
import redis

from tests.compat.drivers import settings
from tests.compat.harness import Files, Report, build_clients, run_program, tls_env
from tests.pki import Pki
from tests.servers_mysql_redis import MariaDB, RedisServer, VaultEngine
from tests.test_mysql_adapter import World as MysqlWorld
from tests.test_mysql_adapter import host_port as mysql_host_port
from tests.test_redis_adapter import World as RedisWorld
from tests.test_redis_adapter import host_port as redis_host_port

DENIED_ID = "spiffe://example.org/ns/prod/sa/intruder"
ROWS = 100_000
BIG = 5_000_000


@pytest.fixture
def mysql_world(
    tmp_path: Path, pki: Pki, mariadb: MariaDB, vault_mysql: VaultEngine,
    monkeypatch: pytest.MonkeyPatch,
) -> MysqlWorld:  # fmt: skip
    return MysqlWorld(tmp_path, pki, mariadb, vault_mysql, monkeypatch)


@pytest.fixture
def redis_world(
    tmp_path: Path, pki: Pki, redis_server: RedisServer, vault_redis: VaultEngine,
    monkeypatch: pytest.MonkeyPatch,
) -> RedisWorld:  # fmt: skip
    return RedisWorld(tmp_path, pki, redis_server, vault_redis, monkeypatch)


@pytest.fixture(scope="module")
def clients() -> Path:
    return build_clients()


async def run(argv: list[str], stdin: bytes | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.PIPE if stdin is not None else None,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(stdin), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


# --------------------------------------------------------------------------- MySQL


async def test_mysql_cli(mysql_world: MysqlWorld) -> None:
    report = Report("mysql CLI")
    pki = mysql_world.pki
    async with mysql_world.broker() as b:
        host, port = mysql_host_port(b)
        files, denied = Files.of(pki.client()), Files.of(pki.client(DENIED_ID))
        cli = [*shlex.split(settings("mysql CLI", **files.values(host, port))), "-N", "-B"]

        async def sql(statements: str) -> str:
            code, out, err = await run([*cli, "-e", statements])
            assert code == 0, err
            return out

        with report.feature("connect"):
            assert (await sql("SELECT 1")).strip() == "1"
        with report.feature("prepared"):
            out = await sql(
                "PREPARE s FROM 'SELECT ? + ?'; SET @a = 40, @b = 2; EXECUTE s USING @a, @b"
            )
            assert out.split()[-1] == "42"
        with report.feature("transaction"):
            out = await sql(
                "CREATE TEMPORARY TABLE t (n int); START TRANSACTION; INSERT INTO t VALUES (1); "
                "ROLLBACK; SELECT count(*) FROM t"
            )
            assert out.split()[-1] == "0"
        with report.feature("bulk_insert"):
            out = await sql(
                "CREATE TEMPORARY TABLE t (n int); INSERT INTO t SELECT seq FROM seq_1_to_1000; "
                "SELECT count(*) FROM t"
            )
            assert out.split()[-1] == "1000"
        with report.feature("large_result"):
            out = await sql(f"SELECT seq, REPEAT('x', 100) FROM seq_1_to_{ROWS}")
            assert len(out.splitlines()) == ROWS
        with report.feature("denied") as detail:
            denied_cli = shlex.split(settings("mysql CLI", **denied.values(host, port)))
            code, out, err = await run([*denied_cli, "-e", "SELECT 1"])
            assert code != 0
            detail.append(err)
    report.check()


def _pymysql(report: Report, host: str, port: int, files: Files, denied: Files) -> None:
    def connect(f: Files) -> pymysql.connections.Connection[pymysql.cursors.Cursor]:
        ssl = {"ca": str(f.ca), "cert": str(f.cert), "key": str(f.key)}
        return pymysql.connect(host=host, port=port, user="any", database="appdb", ssl=ssl,
                               read_timeout=30)  # fmt: skip

    with report.feature("connect"):
        conn = connect(files)
    try:
        cur = conn.cursor()
        with report.feature("prepared"):
            cur.execute("SELECT %s + %s", (40, 2))  # PyMySQL quotes client-side
            assert cur.fetchone() == (42,)
        with report.feature("transaction"):
            cur.execute("CREATE TEMPORARY TABLE t (n int, s varchar(40))")
            conn.begin()
            cur.execute("INSERT INTO t VALUES (1, 'x')")
            conn.rollback()
            cur.execute("SELECT count(*) FROM t")
            assert cur.fetchone() == (0,)
        with report.feature("bulk_insert"):
            cur.executemany("INSERT INTO t VALUES (%s, %s)", [(i, f"row {i}") for i in range(1000)])
            conn.commit()
            cur.execute("SELECT count(*) FROM t")
            assert cur.fetchone() == (1000,)
        with report.feature("timeout"):
            started = time.monotonic()
            with pytest.raises(pymysql.err.OperationalError, match="max_statement_time"):
                cur.execute("SET STATEMENT max_statement_time = 0.5 FOR SELECT SLEEP(20)")
            assert time.monotonic() - started < 10
        with report.feature("large_result"):
            cur.execute(f"SELECT seq, REPEAT('x', 100) FROM seq_1_to_{ROWS}")
            assert len(cur.fetchall()) == ROWS
    finally:
        conn.close()
    with report.feature("denied") as detail:
        with pytest.raises(pymysql.err.OperationalError) as raised:
            connect(denied)
        detail.append(str(raised.value))


async def test_pymysql(mysql_world: MysqlWorld) -> None:
    report = Report("PyMySQL")
    pki = mysql_world.pki
    async with mysql_world.broker() as b:
        host, port = mysql_host_port(b)
        files, denied = Files.of(pki.client()), Files.of(pki.client(DENIED_ID))
        await asyncio.to_thread(_pymysql, report, host, port, files, denied)
    report.check()


async def test_go_sql_driver_mysql(mysql_world: MysqlWorld, clients: Path) -> None:
    report = Report("go-sql-driver/mysql")
    pki = mysql_world.pki
    async with mysql_world.broker() as b:
        host, port = mysql_host_port(b)
        files, denied = Files.of(pki.client()), Files.of(pki.client(DENIED_ID))
        env = {"COMPAT_ADDRESS": f"{host}:{port}", "COMPAT_DATABASE": "appdb",
               **tls_env(files, denied)}  # fmt: skip
        report.add_lines(await run_program([str(clients / "compat-go"), "mysql"], env))
    report.check()


# --------------------------------------------------------------------------- Redis


async def test_redis_cli(redis_world: RedisWorld) -> None:
    report = Report("redis-cli")
    pki = redis_world.pki
    async with redis_world.broker() as b:
        host, port = redis_host_port(b)
        files, denied = Files.of(pki.client()), Files.of(pki.client(DENIED_ID))
        cli = shlex.split(settings("redis-cli", **files.values(host, port)))
        key = f"compat:cli:{time.monotonic_ns()}"

        async def cmd(*args: str, stdin: bytes | None = None) -> str:
            code, out, err = await run([*cli, *args], stdin)
            assert code == 0 and not out.startswith("ERR"), (out, err)
            return out

        with report.feature("connect"):
            assert (await cmd("PING")).strip() == "PONG"
        with report.feature("get_set"):
            await cmd("SET", key, "42")
            assert (await cmd("GET", key)).strip() == "42"
        with report.feature("transaction"):
            out = await cmd(stdin=f"MULTI\nINCR {key}\nINCR {key}\nEXEC\n".encode())
            assert out.split()[-1] == "44", out
        with report.feature("bulk_insert"):
            pipe = "".join(f"RPUSH {key}:list {i}\n" for i in range(1000)).encode()
            await cmd("--pipe", stdin=pipe)
            assert (await cmd("LLEN", f"{key}:list")).strip() == "1000"
        with report.feature("large_result"):
            await cmd("-x", "SET", f"{key}:big", stdin=b"x" * BIG)
            assert len((await cmd("GET", f"{key}:big")).strip()) == BIG
        await cmd("DEL", key, f"{key}:list", f"{key}:big")
        with report.feature("denied") as detail:
            denied_cli = shlex.split(settings("redis-cli", **denied.values(host, port)))
            _, out, err = await run([*denied_cli, "GET", key])
            assert "NOPERM" in out + err
            detail.append(out + err)
    report.check()


def _redis_py(report: Report, host: str, port: int, files: Files, denied: Files) -> None:
    def client(f: Files) -> redis.Redis:
        return redis.Redis(host=host, port=port, ssl=True, ssl_certfile=str(f.cert),
                           ssl_keyfile=str(f.key), ssl_ca_certs=str(f.ca), socket_timeout=30,
                           decode_responses=True)  # fmt: skip

    r = client(files)
    key = f"compat:py:{time.monotonic_ns()}"
    try:
        with report.feature("connect"):
            assert r.ping()
        with report.feature("get_set"):
            r.set(key, "42")
            assert r.get(key) == "42"
        with report.feature("transaction"), r.pipeline(transaction=True) as pipe:
            pipe.incr(key).incr(key)
            assert pipe.execute() == [43, 44]
        with report.feature("bulk_insert"):
            with r.pipeline(transaction=False) as pipe:
                for i in range(1000):
                    pipe.rpush(f"{key}:list", i)
                pipe.execute()
            assert r.llen(f"{key}:list") == 1000
        with report.feature("pubsub"):
            sub = r.pubsub()
            sub.subscribe(f"{key}:chan")
            assert sub.get_message(timeout=10)["type"] == "subscribe"  # type: ignore[index]
            r.publish(f"{key}:chan", "hello")
            message = sub.get_message(timeout=10)
            assert message is not None and message["data"] == "hello"
            sub.close()
        with report.feature("timeout"):
            started = time.monotonic()
            assert r.blpop([f"{key}:empty"], timeout=0.5) is None
            assert time.monotonic() - started < 10
        with report.feature("large_result"):
            r.set(f"{key}:big", "x" * BIG)
            assert len(r.get(f"{key}:big") or "") == BIG
        r.delete(key, f"{key}:list", f"{key}:big")
    finally:
        r.close()
    with report.feature("denied") as detail:
        with pytest.raises(redis.exceptions.ResponseError) as raised:
            client(denied).get(key)
        detail.append(str(raised.value))


async def test_redis_py(redis_world: RedisWorld) -> None:
    report = Report("redis-py")
    pki = redis_world.pki
    async with redis_world.broker() as b:
        host, port = redis_host_port(b)
        files, denied = Files.of(pki.client()), Files.of(pki.client(DENIED_ID))
        await asyncio.to_thread(_redis_py, report, host, port, files, denied)
    report.check()


async def test_go_redis(redis_world: RedisWorld, clients: Path) -> None:
    report = Report("go-redis")
    pki = redis_world.pki
    async with redis_world.broker() as b:
        host, port = redis_host_port(b)
        files, denied = Files.of(pki.client()), Files.of(pki.client(DENIED_ID))
        env = {"COMPAT_ADDRESS": f"{host}:{port}", **tls_env(files, denied)}
        report.add_lines(await run_program([str(clients / "compat-go"), "redis"], env))
    report.check()
