"""Asking the other workers of `workers: N` (broker.supervisor) what only one of them knows.

Each worker is a whole broker with state of its own, and a few requests need the state of
whichever worker holds it: a PostgreSQL CancelRequest comes on a new connection, which the
kernel gives to any worker, while its key lives in the worker that served the session.

Each worker listens on a unix socket in its parent's private run directory (mode 0700, the
socket 0600: only the broker's own user can connect, the user that could read the workers'
memory anyway). A worker that does not know the answer asks every sibling at once; each
answers from its own state, through its adapter for the service named
(`Adapter.sibling_request`). One request per connection: one JSON line of at most
MAX_REQUEST_BYTES (the service, the topic, the adapter's fields), one JSON line back of at
most MAX_ANSWER_BYTES. A sibling that is not up (a worker being restarted) or does not
answer within SIBLING_TIMEOUT counts as one that does not know. Nothing here logs a request's
fields: they may carry a secret (a cancel key).

With `workers: 1` there are no siblings and none of this runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger("sidekey.siblings")

# A sibling answers from its event loop after a dict lookup: a loaded worker takes
# milliseconds. A caller waits no longer than this for all of them (a PostgreSQL client
# waits for its cancel connection to close).
SIBLING_TIMEOUT = 1.0
# A request carries a service name, a topic and a few fields: a cancel's key is at most 256
# bytes (protocol 3.2; 512 in hex), the caller's SPIFFE ID at most 2048 (the SPIFFE spec).
MAX_REQUEST_BYTES = 8 * 1024
# An answer is a few flags.
MAX_ANSWER_BYTES = 1024

# (service, topic, fields, the asking worker's number) -> the answer, or None: no such
# service or topic here.
Dispatch = Callable[[str, str, dict[str, Any], int | None], Awaitable[dict[str, Any] | None]]


class Siblings:
    """This worker's socket for its siblings' requests, and the way to ask them."""

    def __init__(self, worker: int, own: Path, others: Sequence[Path]) -> None:
        self.worker = worker
        self.own = own
        self.others = tuple(others)
        self._server: asyncio.AbstractServer | None = None
        self._dispatch: Dispatch | None = None
        self._serving: set[asyncio.Task[None]] = set()

    async def start(self, dispatch: Dispatch) -> None:
        self._dispatch = dispatch
        with contextlib.suppress(FileNotFoundError):
            self.own.unlink()  # a killed worker's socket, before its restart
        self._server = await asyncio.start_unix_server(
            self._serve, path=str(self.own), limit=MAX_REQUEST_BYTES
        )
        os.chmod(self.own, 0o600)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for task in list(self._serving):
            task.cancel()
        await asyncio.gather(*self._serving, return_exceptions=True)
        with contextlib.suppress(FileNotFoundError):
            self.own.unlink()

    # -- asking ------------------------------------------------------------------------------

    async def ask(self, service: str, topic: str, fields: dict[str, Any]) -> list[dict[str, Any]]:
        """Every sibling's answer to one request, all asked at once; a sibling that is down,
        slow or answers nonsense is left out."""
        line = json.dumps(
            {"service": service, "topic": topic, "worker": self.worker, "fields": fields},
            separators=(",", ":"),
        ).encode()
        if len(line) >= MAX_REQUEST_BYTES:
            raise ValueError(f"a sibling request is at most {MAX_REQUEST_BYTES} bytes")
        answers = await asyncio.gather(*(self._ask_one(path, line + b"\n") for path in self.others))
        return [a for a in answers if a is not None]

    async def _ask_one(self, path: Path, line: bytes) -> dict[str, Any] | None:
        try:
            async with asyncio.timeout(SIBLING_TIMEOUT):
                reader, writer = await asyncio.open_unix_connection(
                    str(path), limit=MAX_ANSWER_BYTES
                )
                try:
                    writer.write(line)
                    await writer.drain()
                    raw = await reader.readline()
                finally:
                    writer.close()
            answer = json.loads(raw)
        except (OSError, TimeoutError, ValueError) as exc:
            # ValueError: an answer over the limit, or not JSON.
            log.debug("sibling %s did not answer: %s", path.name, type(exc).__name__)
            return None
        return answer if isinstance(answer, dict) else None

    # -- answering ---------------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._serving.add(task)
        try:
            async with asyncio.timeout(SIBLING_TIMEOUT):
                answer = await self._answer(await reader.readline())
            writer.write(json.dumps(answer, separators=(",", ":")).encode() + b"\n")
            await writer.drain()
        except (OSError, TimeoutError, ValueError) as exc:
            # ValueError: a request over MAX_REQUEST_BYTES. Its content is never logged.
            log.warning("refused a sibling request: %s", _why(exc))
        finally:
            writer.close()
            if task is not None:
                self._serving.discard(task)

    async def _answer(self, line: bytes) -> dict[str, Any]:
        request = json.loads(line)
        if not (
            isinstance(request, dict)
            and isinstance(service := request.get("service"), str)
            and isinstance(topic := request.get("topic"), str)
            and isinstance(fields := request.get("fields"), dict)
        ):
            raise ValueError("not a sibling request (service, topic, fields)")
        sender = request.get("worker")
        assert self._dispatch is not None
        answer = await self._dispatch(
            service, topic, fields, sender if isinstance(sender, int) else None
        )
        return answer or {}


def _why(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return f"no answer within {SIBLING_TIMEOUT}s"
    if isinstance(exc, json.JSONDecodeError):
        return "not JSON"
    return str(exc) if isinstance(exc, ValueError) else type(exc).__name__
