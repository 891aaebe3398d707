"""adapters/http/h2frames.py: GOAWAY split out of an HTTP/2 byte stream, fed whole, byte by
byte and with an incomplete frame behind (byte vectors from hyperframe's own serializer)."""

from __future__ import annotations

from hyperframe.frame import DataFrame, GoAwayFrame, PingFrame, SettingsFrame

from adapters.http.h2frames import split_goaway


def _goaway(last: int) -> bytes:
    frame = GoAwayFrame(0)
    frame.last_stream_id = last
    frame.error_code = 0
    return frame.serialize()


def _data(stream_id: int, body: bytes) -> bytes:
    frame = DataFrame(stream_id)
    frame.data = body
    return frame.serialize()


SETTINGS = SettingsFrame(0).serialize()
PING = PingFrame(0).serialize()
OTHERS = [SETTINGS, _data(1, b"x" * 300), PING, _data(3, b"")]
STREAM = OTHERS[0] + OTHERS[1] + _goaway(5) + OTHERS[2] + _goaway(3) + OTHERS[3]


def _feed(chunks: list[bytes]) -> tuple[bytes, list[int], bytes]:
    out, lasts, partial = b"", [], b""
    for chunk in chunks:
        frames, goaways, partial = split_goaway(partial + chunk)
        out += frames
        lasts += goaways
    return out, lasts, partial


def test_whole() -> None:
    assert split_goaway(STREAM) == (b"".join(OTHERS), [5, 3], b"")


def test_byte_by_byte() -> None:
    assert _feed([bytes([b]) for b in STREAM]) == (b"".join(OTHERS), [5, 3], b"")


def test_an_incomplete_frame_waits_for_the_rest() -> None:
    tail = _data(7, b"y" * 100)
    frames, lasts, partial = split_goaway(STREAM + tail[:50])
    assert (frames, lasts, partial) == (b"".join(OTHERS), [5, 3], tail[:50])
    assert split_goaway(partial + tail[50:]) == (tail, [], b"")


def test_no_goaway_passes_the_same_bytes() -> None:
    data = b"".join(OTHERS)
    frames, lasts, partial = split_goaway(data)
    assert frames is data and lasts == [] and partial == b""
