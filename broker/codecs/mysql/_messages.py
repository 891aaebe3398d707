"""The connection-phase packets, as frozen, slotted dataclasses.

A packet on the wire is a 3-byte length, a 1-byte sequence number and the payload; the
sequence number is not part of a message: `encode(message, seq)` adds it, and the parsers
check it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .constants import CLIENT_SSL, UTF8MB4_GENERAL_CI


@dataclass(frozen=True, slots=True)
class HandshakeV10:
    """The server's greeting."""

    server_version: str
    connection_id: int
    scramble: bytes  # auth-plugin-data, both parts, without the trailing NUL
    capabilities: int
    charset: int = UTF8MB4_GENERAL_CI
    status: int = 0
    auth_plugin: str = ""


@dataclass(frozen=True, slots=True)
class SSLRequest:
    """The first 32 bytes of a HandshakeResponse41 with CLIENT_SSL: "switch to TLS now"."""

    capabilities: int
    max_packet: int
    charset: int

    def __post_init__(self) -> None:
        if not self.capabilities & CLIENT_SSL:
            raise ValueError("an SSLRequest has CLIENT_SSL set")


@dataclass(frozen=True, slots=True)
class HandshakeResponse41:
    """The client's answer to the greeting (after TLS, when it asked for it)."""

    capabilities: int
    max_packet: int
    charset: int
    user: str
    auth_response: bytes = field(repr=False)
    database: str | None = None
    auth_plugin: str | None = None
    # Connection attributes (program name, client version...), in order.
    attributes: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class AuthSwitchRequest:
    """The server asks for another authentication method, with its own scramble."""

    plugin: str
    data: bytes


@dataclass(frozen=True, slots=True)
class AuthMoreData:
    """Extra data of the current authentication method (caching_sha2_password's fast-auth
    result, or an RSA public key)."""

    data: bytes


@dataclass(frozen=True, slots=True)
class AuthData:
    """What the client sends back to an AuthSwitchRequest or AuthMoreData: raw bytes."""

    data: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class OkPacket:
    affected_rows: int = 0
    last_insert_id: int = 0
    status: int = 0
    warnings: int = 0
    # Info and session-state bytes as the server sent them (their layout depends on the
    # capabilities); kept so the packet can be relayed as it was.
    rest: bytes = b""


@dataclass(frozen=True, slots=True)
class ErrPacket:
    code: int
    message: str
    sqlstate: str = "HY000"


@dataclass(frozen=True, slots=True)
class EofPacket:
    warnings: int = 0
    status: int = 0


ServerMessage = HandshakeV10 | AuthSwitchRequest | AuthMoreData | OkPacket | ErrPacket | EofPacket
ClientMessage = SSLRequest | HandshakeResponse41 | AuthData
