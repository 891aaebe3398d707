"""Primitive readers and writers: little-endian integers, length-encoded integers and
strings, NUL-terminated strings, and packet framing."""

from __future__ import annotations

import struct

from ._errors import Malformed
from .constants import HEADER_LENGTH, MAX_PAYLOAD


class Cursor:
    """Reads the fields of one payload front to back; Malformed when it runs out."""

    __slots__ = ("data", "pos", "what")

    def __init__(self, data: bytes, what: str) -> None:
        self.data = data
        self.pos = 0
        self.what = what

    @property
    def left(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise Malformed(f"{self.what} is truncated")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def uint(self, n: int) -> int:
        return int.from_bytes(self.take(n), "little")

    def lenenc_int(self) -> int:
        first = self.uint(1)
        if first < 0xFB:
            return first
        if first == 0xFC:
            return self.uint(2)
        if first == 0xFD:
            return self.uint(3)
        if first == 0xFE:
            return self.uint(8)
        raise Malformed(f"{self.what} has an invalid length-encoded integer")

    def lenenc_bytes(self, limit: int) -> bytes:
        n = self.lenenc_int()
        if n > limit:
            raise Malformed(f"{self.what} has a field of {n} bytes (limit {limit})")
        return self.take(n)

    def nul_bytes(self, limit: int) -> bytes:
        end = self.data.find(b"\0", self.pos, self.pos + limit + 1)
        if end < 0:
            raise Malformed(f"{self.what} has an unterminated or oversized string")
        chunk = self.data[self.pos : end]
        self.pos = end + 1
        return chunk

    def rest(self) -> bytes:
        return self.take(self.left)


def text(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise Malformed(f"{what} is not valid UTF-8") from None


def lenenc_int(value: int) -> bytes:
    if value < 0xFB:
        return bytes([value])
    if value < 1 << 16:
        return b"\xfc" + value.to_bytes(2, "little")
    if value < 1 << 24:
        return b"\xfd" + value.to_bytes(3, "little")
    return b"\xfe" + value.to_bytes(8, "little")


def lenenc_bytes(data: bytes) -> bytes:
    return lenenc_int(len(data)) + data


_HEADER = struct.Struct("<HBB")


def frame(payload: bytes, seq: int) -> bytes:
    """One packet (payloads over MAX_PAYLOAD are split, as the protocol says)."""
    out = bytearray()
    while True:
        chunk, payload = payload[:MAX_PAYLOAD], payload[MAX_PAYLOAD:]
        n = len(chunk)
        out += _HEADER.pack(n & 0xFFFF, n >> 16, seq & 0xFF) + chunk
        seq += 1
        if n < MAX_PAYLOAD:
            return bytes(out)


def header(data: bytes | bytearray | memoryview, pos: int = 0) -> tuple[int, int]:
    """(payload length, sequence number) of the packet header at `pos`."""
    low, high, seq = _HEADER.unpack_from(data, pos)
    return low | high << 16, seq


assert _HEADER.size == HEADER_LENGTH
