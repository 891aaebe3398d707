"""The two sans-IO parsers of the connection phase, with length and sequence checks.

`ClientParser` reads a client (the broker is its server), `ServerParser` a server (the
broker is its client). Both count sequence numbers: every packet received must carry the
next one, and `next_seq()` gives the number for the packet the broker sends next. After
login the adapter takes `leftover()` and splices raw bytes.
"""

from __future__ import annotations

from typing import NoReturn

from ._codec import decode_auth_reply, decode_client_hello, decode_greeting
from ._errors import Malformed, ProtocolError, UpstreamProtocolError
from ._messages import (
    AuthData,
    ClientMessage,
    ServerMessage,
    SSLRequest,
)
from ._wire import header
from .constants import HEADER_LENGTH, MAX_HANDSHAKE_PACKET


class _Framer:
    """Buffer, framing and sequence numbers; failure is sticky."""

    __slots__ = ("_buffer", "_failure", "_seq")

    def __init__(self, last_seq: int) -> None:
        self._buffer = bytearray()
        self._failure: str | None = None
        self._seq = last_seq  # the last sequence number received or sent

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def leftover(self) -> bytes:
        return bytes(self._buffer)

    def next_seq(self) -> int:
        """The sequence number of the packet the broker sends next (and count it sent)."""
        self._seq = (self._seq + 1) & 0xFF
        return self._seq

    def _error(self, reason: str) -> Exception:
        raise NotImplementedError

    def _fail(self, reason: str) -> NoReturn:
        self._failure = reason
        raise self._error(reason)

    def _payload(self) -> bytes | None:
        if self._failure is not None:
            raise self._error(f"the peer already broke the protocol: {self._failure}")
        buffer = self._buffer
        if len(buffer) < HEADER_LENGTH:
            return None
        length, seq = header(buffer)
        if length > MAX_HANDSHAKE_PACKET:
            self._fail(
                f"a packet of {length} bytes exceeds the connection-phase limit of "
                f"{MAX_HANDSHAKE_PACKET}"
            )
        expected = (self._seq + 1) & 0xFF
        if seq != expected:
            self._fail(f"packet out of order: sequence number {seq}, expected {expected}")
        end = HEADER_LENGTH + length
        if len(buffer) < end:
            return None
        data = bytes(buffer[HEADER_LENGTH:end])
        del buffer[:end]
        self._seq = seq
        return data


class ClientParser(_Framer):
    """Reads what a MySQL client sends during the connection phase.

    Send the greeting with ``next_seq()`` (0) first. The first packet is an SSLRequest or a
    HandshakeResponse41. A client sends its TLS ClientHello right behind its SSLRequest,
    without waiting for an answer: take those bytes with ``take_tls_bytes()`` and hand them
    to the TLS layer (never parse them), then keep feeding this parser the decrypted bytes:
    a HandshakeResponse41 comes next. Then only AuthData.
    """

    __slots__ = ("_state",)

    def __init__(self) -> None:
        super().__init__(last_seq=-1)
        self._state = "hello"  # hello -> (tls ->) response -> auth

    def _error(self, reason: str) -> Exception:
        return ProtocolError(reason)

    def take_tls_bytes(self) -> bytes:
        """After an SSLRequest: what followed it, which belongs to the TLS layer."""
        if self._state != "tls":
            raise RuntimeError("no SSLRequest was received")
        data = bytes(self._buffer)
        self._buffer.clear()
        self._state = "response"
        return data

    def next_message(self) -> ClientMessage | None:
        if self._state == "tls":
            raise RuntimeError("hand what followed the SSLRequest to TLS first (take_tls_bytes)")
        payload = self._payload()
        if payload is None:
            return None
        if self._state == "auth":
            return AuthData(payload)
        try:
            message = decode_client_hello(payload)
        except Malformed as exc:
            self._fail(str(exc))
        if isinstance(message, SSLRequest):
            if self._state != "hello":
                self._fail("a second SSLRequest")
            self._state = "tls"
        else:
            self._state = "auth"
        return message


class ServerParser(_Framer):
    """Reads what a MySQL server sends during the connection phase: the greeting (or an ERR
    in its place), then OK, ERR, AuthSwitchRequest or AuthMoreData."""

    __slots__ = ("_greeted",)

    def __init__(self) -> None:
        super().__init__(last_seq=-1)
        self._greeted = False

    def _error(self, reason: str) -> Exception:
        return UpstreamProtocolError(f"malformed packet from the server: {reason}")

    def next_message(self) -> ServerMessage | None:
        payload = self._payload()
        if payload is None:
            return None
        try:
            if not self._greeted:
                self._greeted = True
                return decode_greeting(payload)
            return decode_auth_reply(payload)
        except Malformed as exc:
            self._fail(str(exc))
