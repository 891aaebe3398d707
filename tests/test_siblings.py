"""broker/session/siblings.py: workers asking each other, over real unix sockets.

The end-to-end use (a PostgreSQL cancel reaching its session's worker) is
tests/test_workers_cancel.py's; here, the limits: a sibling that is down or never answers,
a request or answer over its size, malformed requests, the socket's mode.
"""

from __future__ import annotations

import asyncio
import logging
import stat
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from broker.session import siblings as siblings_module
from broker.session.siblings import MAX_REQUEST_BYTES, SIBLING_TIMEOUT, Siblings

SECRET = "5ec2e7"


class Recorder:
    def __init__(self, name: str) -> None:
        self.name = name
        self.calls: list[tuple[str, str, dict[str, Any], int | None]] = []

    async def __call__(
        self, service: str, topic: str, fields: dict[str, Any], sender: int | None
    ) -> dict[str, Any] | None:
        self.calls.append((service, topic, fields, sender))
        if service != "orders-db":
            return None
        if fields.get("big"):
            return {"x": "y" * 4096}
        return {"known": fields.get("key") == self.name}


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[tuple[Siblings, Siblings, Recorder, Recorder]]:
    paths = [tmp_path / "siblings-1.sock", tmp_path / "siblings-2.sock"]
    one, two = Siblings(1, paths[0], [paths[1]]), Siblings(2, paths[1], [paths[0]])
    rec1, rec2 = Recorder("one"), Recorder("two")
    await one.start(rec1)
    await two.start(rec2)
    try:
        yield one, two, rec1, rec2
    finally:
        await one.stop()
        await two.stop()


async def test_a_worker_asks_its_sibling_and_hears_its_answer(
    pair: tuple[Siblings, Siblings, Recorder, Recorder],
) -> None:
    one, two, _, rec2 = pair
    assert await one.ask("orders-db", "cancel", {"key": "two"}) == [{"known": True}]
    assert await two.ask("orders-db", "cancel", {"key": "two"}) == [{"known": False}]
    assert rec2.calls == [("orders-db", "cancel", {"key": "two"}, 1)], "the asker's number"
    # A service the sibling does not run: an empty answer.
    assert await one.ask("gone", "cancel", {}) == [{}]
    assert stat.S_IMODE(one.own.stat().st_mode) == 0o600, "only the broker's user connects"


async def test_a_sibling_that_is_down_is_left_out(tmp_path: Path) -> None:
    alone = Siblings(1, tmp_path / "siblings-1.sock", [tmp_path / "siblings-2.sock"])
    await alone.start(Recorder("one"))
    try:
        started = time.monotonic()
        assert await alone.ask("orders-db", "cancel", {"key": "x"}) == []
        assert time.monotonic() - started < SIBLING_TIMEOUT
    finally:
        await alone.stop()
    assert not alone.own.exists(), "stop removes the socket"


async def test_a_sibling_that_never_answers_costs_at_most_the_timeout(tmp_path: Path) -> None:
    """A stuck sibling: a unix server that reads and never answers (a worker cannot be made
    to hang on purpose, so the stuck peer is this stand-in)."""
    held: list[asyncio.StreamWriter] = []

    async def stuck(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        await reader.readline()

    path = tmp_path / "siblings-2.sock"
    server = await asyncio.start_unix_server(stuck, path=str(path))
    asker = Siblings(1, tmp_path / "siblings-1.sock", [path])
    try:
        started = time.monotonic()
        assert await asker.ask("orders-db", "cancel", {"key": "x"}) == []
        took = time.monotonic() - started
        assert SIBLING_TIMEOUT * 0.9 <= took < SIBLING_TIMEOUT + 1.0
    finally:
        for writer in held:
            writer.close()
        server.close()


async def test_an_answer_over_its_limit_is_dropped(
    pair: tuple[Siblings, Siblings, Recorder, Recorder],
) -> None:
    one, _, _, _ = pair
    assert await one.ask("orders-db", "cancel", {"big": True}) == []


async def test_a_request_over_its_limit_is_refused_before_dispatch(
    pair: tuple[Siblings, Siblings, Recorder, Recorder], caplog: pytest.LogCaptureFixture
) -> None:
    one, two, rec1, _ = pair
    with pytest.raises(ValueError, match="at most"):
        await two.ask("orders-db", "cancel", {"key": "k" * MAX_REQUEST_BYTES})
    caplog.set_level(logging.WARNING, logger=siblings_module.log.name)
    reader, writer = await asyncio.open_unix_connection(str(one.own))
    writer.write(b'{"service":"orders-db","fields":{"s":"' + SECRET.encode() * MAX_REQUEST_BYTES)
    assert await asyncio.wait_for(reader.read(), SIBLING_TIMEOUT + 1) == b"", "closed, no answer"
    writer.close()
    assert rec1.calls == []
    assert "refused a sibling request" in caplog.text
    assert SECRET not in caplog.text, "a request's content is never logged"


@pytest.mark.parametrize(
    "line",
    [
        b"not json\n",
        b"[1, 2]\n",
        b'{"service": "orders-db", "topic": "cancel"}\n',
        b'{"service": 1, "topic": "cancel", "fields": {}}\n',
    ],
)
async def test_a_malformed_request_gets_no_answer(
    pair: tuple[Siblings, Siblings, Recorder, Recorder], line: bytes
) -> None:
    one, _, rec1, _ = pair
    reader, writer = await asyncio.open_unix_connection(str(one.own))
    writer.write(line)
    assert await asyncio.wait_for(reader.read(), SIBLING_TIMEOUT + 1) == b""
    writer.close()
    assert rec1.calls == []


async def test_a_silent_asker_is_cut_after_the_timeout(
    pair: tuple[Siblings, Siblings, Recorder, Recorder],
) -> None:
    one, _, _, _ = pair
    reader, writer = await asyncio.open_unix_connection(str(one.own))
    started = time.monotonic()
    assert await asyncio.wait_for(reader.read(), SIBLING_TIMEOUT + 2) == b""
    assert time.monotonic() - started >= SIBLING_TIMEOUT * 0.9
    writer.close()
