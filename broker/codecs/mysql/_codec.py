"""Payload decoders and encoders of the connection-phase packets.

Decoders take one payload (framing checked by the parser) and return a message or raise
Malformed; the parsers re-raise that with blame. They check everything a client or server
could get wrong, so no peer can trigger an IndexError.
"""

from __future__ import annotations

from ._errors import Malformed
from ._messages import (
    AuthData,
    AuthMoreData,
    AuthSwitchRequest,
    ClientMessage,
    EofPacket,
    ErrPacket,
    HandshakeResponse41,
    HandshakeV10,
    OkPacket,
    ServerMessage,
    SSLRequest,
)
from ._wire import Cursor, frame, lenenc_bytes, lenenc_int, text
from .constants import (
    AUTH_MORE_DATA_HEADER,
    CLIENT_CONNECT_ATTRS,
    CLIENT_CONNECT_WITH_DB,
    CLIENT_PLUGIN_AUTH,
    CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA,
    CLIENT_PROTOCOL_41,
    CLIENT_SECURE_CONNECTION,
    CLIENT_SSL,
    EOF_HEADER,
    ERR_HEADER,
    MAX_HANDSHAKE_PACKET,
    MAX_NAME,
    MAX_SCRAMBLE,
    OK_HEADER,
    PROTOCOL_VERSION_10,
    SSL_REQUEST_LENGTH,
)

_FILLER = bytes(23)
# EOF packets are shorter than this; a longer 0xFE packet is something else (an OK with
# CLIENT_DEPRECATE_EOF, or an AuthSwitchRequest during authentication).
_MAX_EOF_LENGTH = 9


# --------------------------------------------------------------------------- decoders


def decode_greeting(payload: bytes) -> HandshakeV10 | ErrPacket:
    """The server's first packet: a HandshakeV10, or an ERR (too many connections, host
    blocked) sent in its place."""
    if payload[:1] == bytes([ERR_HEADER]):
        return decode_err(payload)
    c = Cursor(payload, "the server greeting")
    version = c.uint(1)
    if version != PROTOCOL_VERSION_10:
        raise Malformed(f"the server speaks protocol version {version}, not 10")
    server_version = text(c.nul_bytes(MAX_NAME), "the server version")
    connection_id = c.uint(4)
    scramble = c.take(8)
    c.take(1)  # filler
    capabilities = c.uint(2)
    charset = status = 0
    plugin = ""
    if c.left:
        charset = c.uint(1)
        status = c.uint(2)
        capabilities |= c.uint(2) << 16
        data_length = c.uint(1)
        c.take(10)  # reserved (MariaDB: 6 + its extended capabilities)
        if capabilities & CLIENT_SECURE_CONNECTION:
            part2 = c.take(max(13, data_length - 8))
            if part2.endswith(b"\0"):
                part2 = part2[:-1]
            scramble += part2
        if capabilities & CLIENT_PLUGIN_AUTH and c.left:
            # MySQL 5.5.7-5.5.9 left out the terminating NUL.
            raw = c.rest()
            plugin = text(raw[:-1] if raw.endswith(b"\0") else raw, "the auth plugin name")
    if not capabilities & CLIENT_PROTOCOL_41:
        raise Malformed("the server does not speak protocol 4.1")
    if len(scramble) > MAX_SCRAMBLE:
        raise Malformed(f"a scramble of {len(scramble)} bytes")
    return HandshakeV10(
        server_version, connection_id, scramble, capabilities, charset, status, plugin
    )


def decode_client_hello(payload: bytes) -> SSLRequest | HandshakeResponse41:
    """The client's first packet: an SSLRequest, or a HandshakeResponse41."""
    c = Cursor(payload, "the handshake response")
    capabilities = c.uint(4)
    if not capabilities & CLIENT_PROTOCOL_41:
        raise Malformed("the client does not speak protocol 4.1 (HandshakeResponse320)")
    max_packet = c.uint(4)
    charset = c.uint(1)
    c.take(23)
    if not c.left:
        if len(payload) != SSL_REQUEST_LENGTH or not capabilities & CLIENT_SSL:
            raise Malformed("a handshake response without a user name")
        return SSLRequest(capabilities, max_packet, charset)
    user = text(c.nul_bytes(MAX_NAME), "the user name")
    if capabilities & CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA:
        auth = c.lenenc_bytes(MAX_HANDSHAKE_PACKET)
    elif capabilities & CLIENT_SECURE_CONNECTION:
        auth = c.take(c.uint(1))
    else:
        auth = c.nul_bytes(MAX_HANDSHAKE_PACKET)
    database = None
    if capabilities & CLIENT_CONNECT_WITH_DB and c.left:
        database = text(c.nul_bytes(MAX_NAME), "the database name") or None
    plugin = None
    if capabilities & CLIENT_PLUGIN_AUTH and c.left:
        plugin = text(c.nul_bytes(MAX_NAME), "the auth plugin name")
    attributes: list[tuple[str, str]] = []
    if capabilities & CLIENT_CONNECT_ATTRS and c.left:
        block = Cursor(c.lenenc_bytes(MAX_HANDSHAKE_PACKET), "the connection attributes")
        while block.left:
            key = text(block.lenenc_bytes(MAX_HANDSHAKE_PACKET), "an attribute name")
            value = text(block.lenenc_bytes(MAX_HANDSHAKE_PACKET), "an attribute value")
            attributes.append((key, value))
    if c.left:
        raise Malformed(f"{c.left} bytes after the handshake response")
    return HandshakeResponse41(
        capabilities, max_packet, charset, user, auth, database, plugin, tuple(attributes)
    )


def decode_auth_reply(payload: bytes) -> ServerMessage:
    """What a server sends after the client's response: OK, ERR, AuthSwitchRequest or
    AuthMoreData."""
    if not payload:
        raise Malformed("an empty packet")
    kind = payload[0]
    if kind == OK_HEADER:
        return decode_ok(payload)
    if kind == ERR_HEADER:
        return decode_err(payload)
    if kind == AUTH_MORE_DATA_HEADER:
        return AuthMoreData(payload[1:])
    if kind == EOF_HEADER:
        if len(payload) == 1:
            raise Malformed("the server asked for the pre-4.1 password method (mysql_old_password)")
        c = Cursor(payload, "the auth switch request")
        c.take(1)
        plugin = text(c.nul_bytes(MAX_NAME), "the auth plugin name")
        return AuthSwitchRequest(plugin, c.rest())
    raise Malformed(f"unexpected packet 0x{kind:02x} during authentication")


def decode_ok(payload: bytes) -> OkPacket:
    c = Cursor(payload, "the OK packet")
    c.take(1)
    affected, last_id = c.lenenc_int(), c.lenenc_int()
    status, warnings = c.uint(2), c.uint(2)
    return OkPacket(affected, last_id, status, warnings, c.rest())


def decode_err(payload: bytes) -> ErrPacket:
    c = Cursor(payload, "the ERR packet")
    c.take(1)
    code = c.uint(2)
    sqlstate = "HY000"
    if c.left and c.data[c.pos] == ord("#"):
        c.take(1)
        sqlstate = text(c.take(5), "the SQLSTATE")
    return ErrPacket(code, c.rest().decode("utf-8", "replace"), sqlstate)


def decode_eof(payload: bytes) -> EofPacket:
    if payload[:1] != bytes([EOF_HEADER]) or len(payload) >= _MAX_EOF_LENGTH:
        raise Malformed("not an EOF packet")
    c = Cursor(payload, "the EOF packet")
    c.take(1)
    return EofPacket(c.uint(2), c.uint(2))


# --------------------------------------------------------------------------- encoders


def encode(message: ServerMessage | ClientMessage, seq: int) -> bytes:
    """One packet carrying `message` with sequence number `seq`."""
    return frame(payload(message), seq)


def payload(message: ServerMessage | ClientMessage) -> bytes:
    if isinstance(message, HandshakeV10):
        return _greeting(message)
    if isinstance(message, SSLRequest):
        return _response_head(message.capabilities, message.max_packet, message.charset)
    if isinstance(message, HandshakeResponse41):
        return _response(message)
    if isinstance(message, AuthSwitchRequest):
        return bytes([EOF_HEADER]) + message.plugin.encode() + b"\0" + message.data
    if isinstance(message, AuthMoreData):
        return bytes([AUTH_MORE_DATA_HEADER]) + message.data
    if isinstance(message, AuthData):
        return message.data
    if isinstance(message, OkPacket):
        return (
            bytes([OK_HEADER])
            + lenenc_int(message.affected_rows)
            + lenenc_int(message.last_insert_id)
            + message.status.to_bytes(2, "little")
            + message.warnings.to_bytes(2, "little")
            + message.rest
        )
    if isinstance(message, ErrPacket):
        return (
            bytes([ERR_HEADER])
            + message.code.to_bytes(2, "little")
            + b"#"
            + message.sqlstate.encode("ascii")[:5].ljust(5, b"0")
            + message.message.encode("utf-8")
        )
    return (
        bytes([EOF_HEADER])
        + message.warnings.to_bytes(2, "little")
        + message.status.to_bytes(2, "little")
    )


def _greeting(m: HandshakeV10) -> bytes:
    if len(m.scramble) < 8:
        raise ValueError("a scramble has at least 8 bytes")
    part2 = m.scramble[8:] + b"\0"
    return (
        bytes([PROTOCOL_VERSION_10])
        + m.server_version.encode() + b"\0"
        + m.connection_id.to_bytes(4, "little")
        + m.scramble[:8] + b"\0"
        + (m.capabilities & 0xFFFF).to_bytes(2, "little")
        + bytes([m.charset])
        + m.status.to_bytes(2, "little")
        + (m.capabilities >> 16 & 0xFFFF).to_bytes(2, "little")
        + bytes([len(m.scramble) + 1 if m.capabilities & CLIENT_PLUGIN_AUTH else 0])
        + bytes(10)
        + part2.ljust(13, b"\0")
        + (m.auth_plugin.encode() + b"\0" if m.capabilities & CLIENT_PLUGIN_AUTH else b"")
    )  # fmt: skip


def _response_head(capabilities: int, max_packet: int, charset: int) -> bytes:
    return (
        capabilities.to_bytes(4, "little")
        + max_packet.to_bytes(4, "little")
        + bytes([charset])
        + _FILLER
    )


def _response(m: HandshakeResponse41) -> bytes:
    caps = m.capabilities
    out = bytearray(_response_head(caps, m.max_packet, m.charset))
    out += m.user.encode() + b"\0"
    if caps & CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA:
        out += lenenc_bytes(m.auth_response)
    elif caps & CLIENT_SECURE_CONNECTION:
        if len(m.auth_response) > 255:
            raise ValueError("an auth response over 255 bytes needs the lenenc capability")
        out += bytes([len(m.auth_response)]) + m.auth_response
    else:
        out += m.auth_response + b"\0"
    if caps & CLIENT_CONNECT_WITH_DB:
        out += (m.database or "").encode() + b"\0"
    if caps & CLIENT_PLUGIN_AUTH:
        out += (m.auth_plugin or "").encode() + b"\0"
    if caps & CLIENT_CONNECT_ATTRS:
        block = b"".join(
            lenenc_bytes(k.encode()) + lenenc_bytes(v.encode()) for k, v in m.attributes
        )
        out += lenenc_bytes(block)
    return bytes(out)
