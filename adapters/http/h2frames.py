"""GOAWAY taken out of an HTTP/2 byte stream before the `h2` state machine sees it.

h2 moves its connection to CLOSED when it receives GOAWAY, and from then on refuses every
frame, the DATA and trailers of the streams the peer promised to finish included, and every
frame we would still send on them. RFC 9113 section 6.8 wants those streams to complete (a
gRPC server with a maximum connection age sends GOAWAY, then finishes its calls; a client
closing its channel sends one with calls in flight). So both sides split what they read into
frames (a 9-byte header each, section 4.1), hand h2 the complete frames other than GOAWAY,
and handle GOAWAY themselves; an incomplete last frame waits for the next read.

Also the one other piece both sides share below h2: `WindowWaiters`, the writers waiting for
flow-control window.
"""

from __future__ import annotations

import asyncio

# The frame type (RFC 9113 section 6.8) and the size of every frame's header (section 4.1).
GOAWAY = 0x7
FRAME_HEADER_BYTES = 9


def split_goaway(buf: bytes) -> tuple[bytes, list[int], bytes]:
    """(the complete frames of `buf` without GOAWAY, the last stream id of each GOAWAY, the
    bytes of an incomplete last frame). `buf` must start at a frame boundary."""
    pos, size, cut = 0, len(buf), 0
    kept: list[bytes] | None = None
    goaways: list[int] = []
    while pos + FRAME_HEADER_BYTES <= size:
        end = pos + FRAME_HEADER_BYTES + int.from_bytes(buf[pos : pos + 3], "big")
        if end > size:
            break
        if buf[pos + 3] == GOAWAY:
            kept = kept if kept is not None else []
            kept.append(buf[cut:pos])
            payload = buf[pos + FRAME_HEADER_BYTES : end]
            last = int.from_bytes(payload[:4], "big") & 0x7FFF_FFFF if len(payload) >= 8 else 0
            goaways.append(last)
            cut = end
        pos = end
    partial = buf[pos:]
    if kept is None:
        # The common case: no GOAWAY, and usually no incomplete frame either (no copy).
        return (buf[:pos] if partial else buf), goaways, partial
    kept.append(buf[cut:pos])
    return b"".join(kept), goaways, partial


class WindowWaiters:
    """Writers waiting for the peer to open a stream's flow-control window (or the
    connection's), one future per stream; both HTTP/2 sides (h2server, h2upstream) keep one."""

    __slots__ = ("_loop", "_waiters")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._waiters: dict[int, asyncio.Future[None]] = {}

    async def wait(self, stream_id: int) -> None:
        waiter = self._loop.create_future()
        self._waiters[stream_id] = waiter
        await waiter

    def wake(self, stream_id: int | None = None) -> None:
        """Wake the writer of `stream_id`, or every writer (a connection window update)."""
        if stream_id is not None:
            found = self._waiters.pop(stream_id, None)
            if found is not None and not found.done():
                found.set_result(None)
            return
        waiters, self._waiters = self._waiters, {}
        for waiter in waiters.values():
            if not waiter.done():
                waiter.set_result(None)

    def forget(self, stream_id: int) -> asyncio.Future[None] | None:
        """The stream is done: its waiter, if any, is no longer woken (returned to fail it)."""
        return self._waiters.pop(stream_id, None)
