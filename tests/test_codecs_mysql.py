"""Tests for broker.codecs.mysql: the MySQL/MariaDB connection-phase codec.

Byte vectors are laid out by hand from the protocol documentation (struct.pack), never with
the encoder under test. Each is fed whole, one byte at a time, and with trailing data;
hypothesis feeds the parsers garbage. The real MariaDB and its clients cross-check the rest
(tests/test_mysql_adapter.py).
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.codecs import mysql
from broker.codecs.mysql import constants as c
from broker.errors import ClientError, UpstreamError


def packet(seq: int, body: bytes) -> bytes:
    return struct.pack("<I", len(body))[:3] + bytes([seq]) + body


SCRAMBLE = b"abcdefghijklmnopqrst"
SERVER_CAPS = (
    c.CLIENT_LONG_PASSWORD | c.CLIENT_PROTOCOL_41 | c.CLIENT_SECURE_CONNECTION | c.CLIENT_SSL
    | c.CLIENT_PLUGIN_AUTH | c.CLIENT_CONNECT_WITH_DB | c.CLIENT_DEPRECATE_EOF
)  # fmt: skip
GREETING_BODY = (
    b"\x0a" + b"10.11.6-MariaDB\0" + struct.pack("<I", 77) + SCRAMBLE[:8] + b"\0"
    + struct.pack("<H", SERVER_CAPS & 0xFFFF) + b"\x2d" + struct.pack("<H", 2)
    + struct.pack("<H", SERVER_CAPS >> 16) + bytes([21]) + bytes(10)
    + SCRAMBLE[8:] + b"\0" + b"mysql_native_password\0"
)  # fmt: skip
GREETING = mysql.HandshakeV10(
    "10.11.6-MariaDB", 77, SCRAMBLE, SERVER_CAPS, 45, 2, "mysql_native_password"
)

CLIENT_CAPS = (
    c.CLIENT_PROTOCOL_41 | c.CLIENT_SECURE_CONNECTION | c.CLIENT_PLUGIN_AUTH
    | c.CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA | c.CLIENT_CONNECT_WITH_DB | c.CLIENT_CONNECT_ATTRS
)  # fmt: skip
ATTRS = b"\x0c_client_name\x07pymysql"
RESPONSE_BODY = (
    struct.pack("<IIB", CLIENT_CAPS, 1 << 24, 45) + bytes(23) + b"alice\0" + b"\x03xyz"
    + b"appdb\0" + b"mysql_native_password\0" + bytes([len(ATTRS)]) + ATTRS
)  # fmt: skip
RESPONSE = mysql.HandshakeResponse41(
    CLIENT_CAPS, 1 << 24, 45, "alice", b"xyz", "appdb", "mysql_native_password",
    (("_client_name", "pymysql"),),
)  # fmt: skip
SSL_BODY = struct.pack("<IIB", CLIENT_CAPS | c.CLIENT_SSL, 1 << 24, 45) + bytes(23)
SSL = mysql.SSLRequest(CLIENT_CAPS | c.CLIENT_SSL, 1 << 24, 45)


def client_messages(chunks: list[bytes], parser: mysql.ClientParser) -> list[object]:
    got: list[object] = []
    for chunk in chunks:
        parser.feed(chunk)
        while (message := parser.next_message()) is not None:
            got.append(message)
            if isinstance(message, mysql.SSLRequest):
                return got
    return got


def server_messages(chunks: list[bytes], parser: mysql.ServerParser) -> list[object]:
    got: list[object] = []
    for chunk in chunks:
        parser.feed(chunk)
        while (message := parser.next_message()) is not None:
            got.append(message)
    return got


def ways(data: bytes) -> list[list[bytes]]:
    return [[data], [data[i : i + 1] for i in range(len(data))]]


def greeted_client() -> mysql.ClientParser:
    parser = mysql.ClientParser()
    assert parser.next_seq() == 0  # the greeting
    return parser


@pytest.mark.parametrize(("body", "message"), [(RESPONSE_BODY, RESPONSE), (SSL_BODY, SSL)])
def test_client_hello_vectors(body: bytes, message: object) -> None:
    for chunks in ways(packet(1, body)):
        assert client_messages(chunks, greeted_client()) == [message]
    parser = greeted_client()
    got = client_messages([packet(1, body) + b"\x16\x03\x01"], parser)
    assert got == [message]
    if isinstance(message, mysql.SSLRequest):
        # What followed the SSLRequest is TLS, handed over whole.
        assert parser.take_tls_bytes() == b"\x16\x03\x01"
        assert client_messages([packet(2, RESPONSE_BODY)], parser) == [RESPONSE]
        assert parser.next_seq() == 3
    else:
        assert parser.leftover() == b"\x16\x03\x01"


def test_client_sequence_and_length_checks() -> None:
    with pytest.raises(mysql.ProtocolError, match="out of order"):
        client_messages([packet(3, RESPONSE_BODY)], greeted_client())
    parser = greeted_client()
    with pytest.raises(mysql.ProtocolError, match="exceeds"):
        client_messages([struct.pack("<I", c.MAX_HANDSHAKE_PACKET + 1)[:3] + b"\x01"], parser)
    with pytest.raises(mysql.ProtocolError, match="already broke"):
        parser.next_message()
    with pytest.raises(mysql.ProtocolError, match=r"4\.1"):
        client_messages([packet(1, struct.pack("<H", 0) + b"\0" * 40)], greeted_client())
    ssl_twice = greeted_client()
    client_messages([packet(1, SSL_BODY)], ssl_twice)
    ssl_twice.take_tls_bytes()
    with pytest.raises(mysql.ProtocolError, match="second SSLRequest"):
        client_messages([packet(2, SSL_BODY)], ssl_twice)


AUTH_REPLIES: dict[str, tuple[bytes, object]] = {
    "ok": (b"\x00\x00\x00\x02\x00\x00\x00", mysql.OkPacket(0, 0, 2, 0)),
    "ok-session-track": (
        b"\x00\x01\x05\x02\x40\x01\x00\x03abc",
        mysql.OkPacket(1, 5, 0x4002, 1, b"\x03abc"),
    ),
    "err": (b"\xff\x15\x04#28000Access denied", mysql.ErrPacket(1045, "Access denied", "28000")),
    "switch": (
        b"\xfeclient_ed25519\0" + b"k" * 32,
        mysql.AuthSwitchRequest("client_ed25519", b"k" * 32),
    ),
    "more-data": (b"\x01\x03", mysql.AuthMoreData(b"\x03")),
}


@pytest.mark.parametrize("name", sorted(AUTH_REPLIES))
def test_server_vectors(name: str) -> None:
    body, message = AUTH_REPLIES[name]
    for greeting_chunks, reply_chunks in zip(
        ways(packet(0, GREETING_BODY)), ways(packet(2, body)), strict=True
    ):
        parser = mysql.ServerParser()
        assert server_messages(greeting_chunks, parser) == [GREETING]
        assert parser.next_seq() == 1  # our response
        assert server_messages(reply_chunks, parser) == [message]
    parser = mysql.ServerParser()
    assert server_messages([packet(0, GREETING_BODY)], parser) == [GREETING]
    parser.next_seq()
    parser.feed(packet(2, body) + b"\x05\x00")
    assert parser.next_message() == message
    assert parser.leftover() == b"\x05\x00"


def test_greeting_error_and_old_servers() -> None:
    parser = mysql.ServerParser()
    err = b"\xff\x10\x04Too many connections"
    assert server_messages([packet(0, err)], parser) == [
        mysql.ErrPacket(1040, "Too many connections")
    ]
    with pytest.raises(mysql.UpstreamProtocolError, match="protocol version 9"):
        server_messages([packet(0, b"\x09" + GREETING_BODY[1:])], mysql.ServerParser())
    old = mysql.ServerParser()
    server_messages([packet(0, GREETING_BODY)], old)
    old.next_seq()
    with pytest.raises(mysql.UpstreamProtocolError, match="mysql_old_password"):
        server_messages([packet(2, b"\xfe")], old)


@pytest.mark.parametrize(
    "message",
    [
        GREETING,
        RESPONSE,
        SSL,
        mysql.AuthSwitchRequest("x", b"yz"),
        mysql.AuthMoreData(b"\x04"),
        mysql.OkPacket(300, 70000, 2, 1, b"info"),
        mysql.ErrPacket(1044, "no", "42000"),
        mysql.EofPacket(1, 2),
    ],
)
def test_encode_round_trips(message: object) -> None:
    data = mysql.encode(message, 5)  # type: ignore[arg-type]
    length, seq = mysql.header(data)
    assert seq == 5 and length == len(data) - 4
    body = data[4:]
    decoded = {
        mysql.HandshakeV10: mysql.decode_greeting,
        mysql.HandshakeResponse41: mysql.decode_client_hello,
        mysql.SSLRequest: mysql.decode_client_hello,
        mysql.EofPacket: mysql.decode_eof,
    }.get(type(message), mysql.decode_auth_reply)(body)
    assert decoded == message


def test_greeting_and_response_bytes_match_the_hand_made_ones() -> None:
    assert mysql.encode(GREETING, 0) == packet(0, GREETING_BODY)
    assert mysql.encode(RESPONSE, 1) == packet(1, RESPONSE_BODY)
    assert mysql.encode(SSL, 1) == packet(1, SSL_BODY)


def test_frame_splits_long_payloads() -> None:
    data = mysql.frame(b"x" * (c.MAX_PAYLOAD + 3), 0)
    assert mysql.header(data) == (c.MAX_PAYLOAD, 0)
    assert mysql.header(data, 4 + c.MAX_PAYLOAD) == (3, 1)
    exact = mysql.frame(b"y" * c.MAX_PAYLOAD, 7)
    assert mysql.header(exact, 4 + c.MAX_PAYLOAD) == (0, 8)  # an empty packet ends it


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=200))
def test_client_garbage_is_a_clean_protocol_error(data: bytes) -> None:
    parser = greeted_client()
    parser.feed(packet(1, data))
    try:
        parser.next_message()
    except mysql.ProtocolError as exc:
        assert isinstance(exc, ClientError)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=200), st.binary(max_size=60))
def test_server_garbage_is_a_clean_upstream_error(greeting: bytes, reply: bytes) -> None:
    parser = mysql.ServerParser()
    parser.feed(packet(0, greeting) + packet(2, reply))
    try:
        parser.next_message()
        parser.next_seq()
        parser.next_message()
    except mysql.UpstreamProtocolError as exc:
        assert isinstance(exc, UpstreamError)
