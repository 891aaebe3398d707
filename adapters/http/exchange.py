"""What the adapter's per-request plan needs from the wire, whichever HTTP version carries it.

`adapter.py` walks one plan for every request (identify, authorize, credential, inject,
forward, audit). It reads the client's request and answers it through `ClientRequest`, and
forwards through an `UpstreamClient` whose answer is an `UpstreamReply`. The HTTP/1.1 sides
(`server.py`, `upstream.py`) and the HTTP/2 sides (`h2server.py`, `h2upstream.py`) implement
these, so a request on an HTTP/2 stream takes exactly the steps an HTTP/1.1 request takes, and
any client version meets any upstream version.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from typing import Protocol, TypeVar

from multidict import MultiMapping

T_co = TypeVar("T_co", covariant=True)

# Header fields as (name, value) pairs, in order.
Fields = list[tuple[str, str]]


class Body(Protocol):
    """A request body as it arrives; reading it is what lets the client send more."""

    def iter_chunked(self, n: int) -> AsyncIterator[bytes]: ...

    def is_eof(self) -> bool: ...


class ClientRequest(Protocol[T_co]):
    """One client request and the one response owed to it.

    Answer exactly once: `respond()` for a whole response, or `start()`, `write()`… `end()`.
    `abort()` ends it so that the client sees it did not complete (the HTTP/1.1 connection is
    cut; an HTTP/2 stream is reset).
    """

    # Read-only properties, so that each side may keep its own concrete types.
    @property
    def method(self) -> str: ...

    @property
    def target(self) -> str:
        """The target as sent: "/path?query" (origin-form) for a normal request; what a
        forward proxy would take otherwise (the adapter checks)."""

    @property
    def headers(self) -> MultiMapping[str]: ...

    @property
    def body_exists(self) -> bool: ...

    @property
    def content_length(self) -> int | None: ...

    @property
    def payload(self) -> Body: ...

    @property
    def info(self) -> T_co:
        """What the server worked out about the request's connection."""

    @property
    def transport(self) -> asyncio.Transport | None:
        """The client connection's transport (shared by every stream of an HTTP/2 one)."""

    def abort(self) -> None: ...

    def send_continue(self) -> None: ...

    def start(
        self, status: int, reason: str, headers: Iterable[tuple[str, str]], *, close: bool = False
    ) -> None: ...

    async def write(self, chunk: bytes) -> None: ...

    async def end(self, body: bytes = b"", trailers: Fields | None = None) -> None:
        """Finish the response with `body` as its last bytes and `trailers` after them (sent
        where the client's protocol carries trailers: HTTP/2; dropped on HTTP/1.1)."""

    async def respond(
        self,
        status: int,
        reason: str,
        headers: Iterable[tuple[str, str]],
        body: bytes,
        *,
        close: bool = False,
    ) -> None: ...


class UpstreamReply(Protocol):
    """The upstream's response: status and headers, then its body chunk by chunk.

    `release()` exactly once when done (also on errors); releasing one that was not read to
    its end tells the upstream it was abandoned (the HTTP/1.1 connection is dropped; an
    HTTP/2 stream is reset)."""

    @property
    def status(self) -> int: ...

    @property
    def reason(self) -> str: ...

    @property
    def headers(self) -> MultiMapping[str]: ...

    @property
    def trailers(self) -> Fields | None:
        """The trailer fields after the body (HTTP/2, gRPC's status); None before the end
        or when there were none."""

    async def read_chunk(self) -> bytes: ...

    def read_buffered(self) -> bytes | None: ...

    def release(self) -> None: ...


class UpstreamClient(Protocol):
    """Forwards requests to the service's one upstream."""

    async def request(
        self,
        method: str,
        target: str,
        headers: Iterable[tuple[str, str]],
        body: AsyncIterable[bytes] | None,
        content_length: int | None,
    ) -> UpstreamReply: ...

    async def close(self) -> None: ...
