"""GOAWAY taken out of an HTTP/2 byte stream before the `h2` state machine sees it.

h2 moves its connection to CLOSED when it receives GOAWAY, and from then on refuses every
frame, the DATA and trailers of the streams the peer promised to finish included, and every
frame we would still send on them. RFC 9113 section 6.8 wants those streams to complete (a
gRPC server with a maximum connection age sends GOAWAY, then finishes its calls; a client
closing its channel sends one with calls in flight). So both sides split what they read into
frames (a 9-byte header each, section 4.1), hand h2 the complete frames other than GOAWAY,
and handle GOAWAY themselves; an incomplete last frame waits for the next read.
"""

from __future__ import annotations

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
