"""Tests for broker.codecs.postgres: the PostgreSQL startup/authentication-phase codec.

Byte vectors are laid out by hand from the protocol's "Message Formats" (struct.pack), never
with the encoder under test. Each is fed whole, one byte at a time, and with trailing data.
Hypothesis feeds the parsers garbage; real clients (asyncpg) and a real server cross-check
the framing and the md5/SCRAM exchanges.
"""

import asyncio
import contextlib
import dataclasses
import hashlib
import socket
import ssl
import struct
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass

import asyncpg  # type: ignore[import-untyped]
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.codecs import postgres as pg
from broker.errors import ClientError, UpstreamError
from tests.servers import Postgres

# --- Hand-made framing (independent of the encoder) ------------------------------------------

V3_0 = 3 << 16  # 196608, the spec's protocol version number for 3.0
V3_2 = (3 << 16) | 2
CANCEL_CODE = 80877102  # 1234 << 16 | 5678, as the spec spells it
SSL_CODE = 80877103
GSSENC_CODE = 80877104


def untyped(code: int, body: bytes = b"") -> bytes:
    """Int32 length (self included) + Int32 code + body."""
    return struct.pack("!II", 8 + len(body), code) + body


def typed(type_byte: bytes, body: bytes) -> bytes:
    """Byte1 type + Int32 length (self included, type byte not) + body."""
    return type_byte + struct.pack("!I", 4 + len(body)) + body


def auth(code: int, body: bytes = b"") -> bytes:
    return typed(b"R", struct.pack("!I", code) + body)


# --- Parsers in the state a vector needs ------------------------------------------------------

STARTUP_BYTES = untyped(V3_0, b"user\0alice\0\0")


def frontend() -> pg.FrontendParser:
    return pg.FrontendParser()


def authenticating(kind: pg.PasswordKind = pg.PasswordMessage) -> pg.FrontendParser:
    parser = pg.FrontendParser()
    parser.feed(STARTUP_BYTES)
    assert isinstance(parser.next_message(), pg.StartupMessage)
    parser.expect_password(kind)
    return parser


def sasl_initial() -> pg.FrontendParser:
    return authenticating(pg.SASLInitialResponse)


def sasl_continue() -> pg.FrontendParser:
    return authenticating(pg.SASLResponse)


def backend() -> pg.BackendParser:
    return pg.BackendParser()


def ssl_answer() -> pg.BackendParser:
    parser = pg.BackendParser()
    parser.expect_ssl_answer()
    return parser


def gssenc_answer() -> pg.BackendParser:
    parser = pg.BackendParser()
    parser.expect_gssenc_answer()
    return parser


Parser = pg.FrontendParser | pg.BackendParser


@dataclass(frozen=True)
class Vector:
    id: str
    parser: Callable[[], Parser]
    message: pg.Message
    wire: bytes
    # An accepted SSL/GSS answer must be the last plaintext byte (CVE-2021-23222).
    trailing_allowed: bool = True


KEY4 = b"\x8a\x12\x00\xff"
KEY32 = bytes(range(32))
KEY256 = bytes(range(256))

VECTORS = [
    # Frontend, untyped
    Vector("SSLRequest", frontend, pg.SSLRequest(), struct.pack("!II", 8, 80877103)),
    Vector("GSSENCRequest", frontend, pg.GSSENCRequest(), struct.pack("!II", 8, 80877104)),
    Vector(
        "CancelRequest-3.0",
        frontend,
        pg.CancelRequest(4242, KEY4),
        struct.pack("!III", 16, CANCEL_CODE, 4242) + KEY4,
    ),
    Vector(
        "CancelRequest-3.2-32",
        frontend,
        pg.CancelRequest(0xFFFFFFFF, KEY32),
        struct.pack("!III", 44, CANCEL_CODE, 0xFFFFFFFF) + KEY32,
    ),
    Vector(
        "CancelRequest-3.2-256",
        frontend,
        pg.CancelRequest(1, KEY256),
        struct.pack("!III", 268, CANCEL_CODE, 1) + KEY256,
    ),
    Vector(
        # The spec's layout: Int32 length, Int32 196608, name/value strings, a final zero byte.
        "StartupMessage-3.0",
        frontend,
        pg.StartupMessage(V3_0, (("user", "alice"), ("database", "orders"))),
        struct.pack("!II", 36, 196608) + b"user\0alice\0database\0orders\0\0",
    ),
    Vector(
        "StartupMessage-3.2-utf8",
        frontend,
        pg.StartupMessage(
            V3_2,
            (("user", "ålice"), ("application_name", "psql ✓"), ("_pq_.option", "1")),
        ),
        untyped(V3_2, "user\0ålice\0application_name\0psql ✓\0_pq_.option\x001\0\0".encode()),
    ),
    # Frontend, typed
    Vector(
        "PasswordMessage",
        authenticating,
        pg.PasswordMessage(b"s3cret"),
        b"p\x00\x00\x00\x0bs3cret\0",
    ),
    Vector(
        "PasswordMessage-md5",
        authenticating,
        pg.PasswordMessage(b"md5" + b"0" * 32),
        typed(b"p", b"md5" + b"0" * 32 + b"\0"),
    ),
    Vector(
        "SASLInitialResponse",
        sasl_initial,
        pg.SASLInitialResponse("SCRAM-SHA-256", b"n,,n=,r=rOprNGfwEbeRWgbNEkqO"),
        typed(
            b"p",
            b"SCRAM-SHA-256\0" + struct.pack("!i", 28) + b"n,,n=,r=rOprNGfwEbeRWgbNEkqO",
        ),
    ),
    Vector(
        "SASLInitialResponse-no-data",
        sasl_initial,
        pg.SASLInitialResponse("X-NO-INITIAL", None),
        typed(b"p", b"X-NO-INITIAL\0" + struct.pack("!i", -1)),
    ),
    Vector(
        "SASLInitialResponse-empty-data",
        sasl_initial,
        pg.SASLInitialResponse("SCRAM-SHA-256", b""),
        typed(b"p", b"SCRAM-SHA-256\0" + struct.pack("!i", 0)),
    ),
    Vector(
        "SASLResponse",
        sasl_continue,
        pg.SASLResponse(b"c=biws,r=abc,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="),
        typed(b"p", b"c=biws,r=abc,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="),
    ),
    Vector("Terminate", authenticating, pg.Terminate(), b"X\x00\x00\x00\x04"),
    Vector(
        "Unknown-frontend-Query",
        authenticating,
        pg.Unknown(b"Q", b"select 1\0"),
        b"Q\x00\x00\x00\x0dselect 1\0",
    ),
    # Backend, single-byte answers
    Vector("SSLAnswer-yes", ssl_answer, pg.SSLAnswer(True), b"S", trailing_allowed=False),
    Vector("SSLAnswer-no", ssl_answer, pg.SSLAnswer(False), b"N"),
    Vector("GSSENCAnswer-yes", gssenc_answer, pg.GSSENCAnswer(True), b"G", trailing_allowed=False),
    Vector("GSSENCAnswer-no", gssenc_answer, pg.GSSENCAnswer(False), b"N"),
    # Backend, authentication requests
    Vector("AuthenticationOk", backend, pg.AuthenticationOk(), b"R\0\0\0\x08\0\0\0\0"),
    Vector(
        "AuthenticationCleartextPassword",
        backend,
        pg.AuthenticationCleartextPassword(),
        b"R\0\0\0\x08\0\0\0\x03",
    ),
    Vector(
        "AuthenticationMD5Password",
        backend,
        pg.AuthenticationMD5Password(b"\x01\x02\x03\x04"),
        b"R\0\0\0\x0c\0\0\0\x05\x01\x02\x03\x04",
    ),
    Vector(
        "AuthenticationSASL",
        backend,
        pg.AuthenticationSASL(("SCRAM-SHA-256-PLUS", "SCRAM-SHA-256")),
        auth(10, b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0"),
    ),
    Vector(
        "AuthenticationSASLContinue",
        backend,
        pg.AuthenticationSASLContinue(b"r=abc,s=QSXCR+Q6sek8bf92,i=4096"),
        auth(11, b"r=abc,s=QSXCR+Q6sek8bf92,i=4096"),
    ),
    Vector(
        "AuthenticationSASLFinal",
        backend,
        pg.AuthenticationSASLFinal(b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="),
        auth(12, b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="),
    ),
    Vector(
        "AuthenticationKerberosV5",
        backend,
        pg.AuthenticationOther(2, b""),
        b"R\0\0\0\x08\0\0\0\x02",
    ),
    Vector("AuthenticationGSS", backend, pg.AuthenticationOther(7, b""), auth(7)),
    Vector(
        "AuthenticationGSSContinue",
        backend,
        pg.AuthenticationOther(8, b"\x60\x82token"),
        auth(8, b"\x60\x82token"),
    ),
    Vector("AuthenticationSSPI", backend, pg.AuthenticationOther(9, b""), auth(9)),
    # Backend, the rest of the startup phase
    Vector(
        "ParameterStatus",
        backend,
        pg.ParameterStatus("server_version", "18.1"),
        typed(b"S", b"server_version\x0018.1\0"),
    ),
    Vector(
        "BackendKeyData-3.0",
        backend,
        pg.BackendKeyData(31337, KEY4),
        b"K\0\0\0\x0c" + struct.pack("!I", 31337) + KEY4,
    ),
    Vector(
        "BackendKeyData-3.2",
        backend,
        pg.BackendKeyData(31337, KEY32),
        typed(b"K", struct.pack("!I", 31337) + KEY32),
    ),
    Vector("ReadyForQuery", backend, pg.ReadyForQuery("I"), b"Z\0\0\0\x05I"),
    Vector(
        "ErrorResponse",
        backend,
        pg.ErrorResponse(
            (
                ("S", "FATAL"),
                ("V", "FATAL"),
                ("C", "28P01"),
                ("M", 'password authentication failed for user "alice"'),
                ("R", "auth_failed"),
            )
        ),
        typed(
            b"E",
            b"SFATAL\0VFATAL\0C28P01\0"
            b'Mpassword authentication failed for user "alice"\0Rauth_failed\0\0',
        ),
    ),
    Vector(
        "NoticeResponse",
        backend,
        pg.NoticeResponse((("S", "WARNING"), ("C", "01000"), ("M", "careful"))),
        typed(b"N", b"SWARNING\0C01000\0Mcareful\0\0"),
    ),
    Vector("ErrorResponse-empty", backend, pg.ErrorResponse(()), b"E\0\0\0\x05\0"),
    Vector(
        "NegotiateProtocolVersion",
        backend,
        pg.NegotiateProtocolVersion(V3_2, ("_pq_.compression", "_pq_.other")),
        typed(b"v", struct.pack("!II", V3_2, 2) + b"_pq_.compression\0_pq_.other\0"),
    ),
    Vector(
        "Unknown-backend-RowDescription",
        backend,
        pg.Unknown(b"T", b"\0\0"),
        b"T\0\0\0\x06\0\0",
    ),
    Vector("Unknown-backend-empty", backend, pg.Unknown(b"\xff", b""), b"\xff\0\0\0\x04"),
]
TRAILING = b"Z\0\0\0\x05I and more"


def vector_id(vector: Vector) -> str:
    return vector.id


@pytest.mark.parametrize("vector", VECTORS, ids=vector_id)
def test_encode_matches_hand_made_bytes(vector: Vector) -> None:
    assert pg.encode(vector.message) == vector.wire


@pytest.mark.parametrize("vector", VECTORS, ids=vector_id)
def test_decode_whole(vector: Vector) -> None:
    parser = vector.parser()
    parser.feed(vector.wire)
    assert parser.next_message() == vector.message
    assert parser.leftover() == b""


@pytest.mark.parametrize("vector", VECTORS, ids=vector_id)
def test_decode_byte_by_byte(vector: Vector) -> None:
    parser = vector.parser()
    for byte in vector.wire[:-1]:
        parser.feed(bytes([byte]))
        assert parser.next_message() is None
    parser.feed(vector.wire[-1:])
    assert parser.next_message() == vector.message
    assert parser.leftover() == b""


@pytest.mark.parametrize("vector", [v for v in VECTORS if v.trailing_allowed], ids=vector_id)
def test_decode_with_trailing_data(vector: Vector) -> None:
    parser = vector.parser()
    parser.feed(vector.wire + TRAILING)
    assert parser.next_message() == vector.message
    assert parser.leftover() == TRAILING


@pytest.mark.parametrize("vector", [v for v in VECTORS if not v.trailing_allowed], ids=vector_id)
def test_plaintext_after_accepted_answer_is_refused(vector: Vector) -> None:
    # CVE-2021-23222: bytes that came with the 'S' were not encrypted; a MITM may own them.
    parser = vector.parser()
    parser.feed(vector.wire + TRAILING)
    with pytest.raises(pg.UpstreamProtocolError, match="unencrypted data"):
        parser.next_message()


def test_trailing_data_is_the_next_message() -> None:
    parser = authenticating()
    parser.feed(typed(b"p", b"a\0") + typed(b"p", b"b\0") + b"X\0\0")
    assert parser.next_message() == pg.PasswordMessage(b"a")
    assert parser.next_message() == pg.PasswordMessage(b"b")
    assert parser.next_message() is None
    assert parser.leftover() == b"X\0\0"
    parser.feed(b"\0\x04")
    assert parser.next_message() == pg.Terminate()
    assert parser.finished


def test_backend_stops_at_ready_for_query_and_keeps_the_rest() -> None:
    parser = pg.BackendParser()
    pipelined = typed(b"T", b"\0\0") + typed(b"C", b"SELECT 1\0")
    parser.feed(
        auth(0)
        + typed(b"S", b"client_encoding\0UTF8\0")
        + typed(b"K", struct.pack("!I", 7) + KEY4)
        + typed(b"Z", b"I")
        + pipelined
    )
    messages = []
    while (message := parser.next_message()) is not None:
        messages.append(message)
    assert messages == [
        pg.AuthenticationOk(),
        pg.ParameterStatus("client_encoding", "UTF8"),
        pg.BackendKeyData(7, KEY4),
        pg.ReadyForQuery("I"),
    ]
    assert parser.finished
    assert parser.leftover() == pipelined


def test_frontend_client_ssl_then_startup() -> None:
    # Client SSLRequest -> 'S' -> TLS -> StartupMessage over the same parser.
    parser = pg.FrontendParser()
    parser.feed(untyped(SSL_CODE))
    assert parser.next_message() == pg.SSLRequest()
    with pytest.raises(RuntimeError, match="answer"):
        parser.next_message()
    assert parser.answer_encryption_request(True) == b"S"
    parser.feed(STARTUP_BYTES)  # decrypted by the TLS layer
    message = parser.next_message()
    assert isinstance(message, pg.StartupMessage)
    assert message.user == "alice"
    assert message.database == "alice"
    # A second SSLRequest is refused, like the server does.
    parser = pg.FrontendParser()
    parser.feed(untyped(SSL_CODE))
    parser.next_message()
    parser.answer_encryption_request(True)
    parser.feed(untyped(SSL_CODE))
    with pytest.raises(pg.ProtocolError, match="already negotiated"):
        parser.next_message()


def test_frontend_direct_tls_then_startup() -> None:
    # libpq 17's sslnegotiation=direct: the ClientHello went to TLS, the parser never saw it.
    parser = pg.FrontendParser()
    parser.start_direct_tls()
    parser.feed(STARTUP_BYTES)  # decrypted by the TLS layer
    assert isinstance(parser.next_message(), pg.StartupMessage)
    # An SSLRequest inside direct TLS is a second one.
    parser = pg.FrontendParser()
    parser.start_direct_tls()
    parser.feed(untyped(SSL_CODE))
    with pytest.raises(pg.ProtocolError, match="already negotiated"):
        parser.next_message()
    # Only at the very start, with nothing fed to the parser.
    parser = pg.FrontendParser()
    parser.feed(b"\x16")
    with pytest.raises(RuntimeError, match="TLS layer"):
        parser.start_direct_tls()
    parser = pg.FrontendParser()
    parser.feed(untyped(SSL_CODE))
    parser.next_message()
    parser.answer_encryption_request(True)
    with pytest.raises(RuntimeError, match="first bytes"):
        parser.start_direct_tls()


def test_frontend_declined_ssl_then_gssenc_then_plaintext_startup() -> None:
    parser = pg.FrontendParser()
    parser.feed(untyped(SSL_CODE) + untyped(GSSENC_CODE) + STARTUP_BYTES)
    assert parser.next_message() == pg.SSLRequest()
    assert parser.answer_encryption_request(False) == b"N"
    assert parser.next_message() == pg.GSSENCRequest()
    assert parser.answer_encryption_request(False) == b"N"
    assert isinstance(parser.next_message(), pg.StartupMessage)


def test_frontend_refuses_plaintext_pipelined_after_accepted_ssl() -> None:
    # CVE-2021-23214: what came before the handshake was not encrypted.
    parser = pg.FrontendParser()
    parser.feed(untyped(SSL_CODE) + STARTUP_BYTES)
    assert parser.next_message() == pg.SSLRequest()
    with pytest.raises(pg.ProtocolError, match="unencrypted data after SSL request"):
        parser.answer_encryption_request(True)
    with pytest.raises(pg.ProtocolError):
        parser.next_message()  # failure is sticky


def test_upstream_ssl_answers() -> None:
    parser = pg.BackendParser()
    parser.expect_ssl_answer()
    parser.feed(b"N" + auth(3))
    assert parser.next_message() == pg.SSLAnswer(False)
    assert parser.next_message() == pg.AuthenticationCleartextPassword()
    parser = pg.BackendParser()
    parser.expect_ssl_answer()
    parser.feed(b"E" + typed(b"E", b"SFATAL\0\0"))
    with pytest.raises(pg.UpstreamProtocolError, match="with an error"):
        parser.next_message()
    parser = pg.BackendParser()
    parser.expect_ssl_answer()
    parser.feed(b"x")
    with pytest.raises(pg.UpstreamProtocolError, match="invalid answer"):
        parser.next_message()


def test_finished_frontend_returns_none() -> None:
    parser = pg.FrontendParser()
    parser.feed(untyped(CANCEL_CODE, struct.pack("!I", 1) + KEY4) + b"junk")
    assert isinstance(parser.next_message(), pg.CancelRequest)
    assert parser.finished
    assert parser.next_message() is None
    assert parser.leftover() == b"junk"


# --- Malformed input: a clean ProtocolError with a clear reason --------------------------------

MALFORMED_FRONTEND = [
    ("short-length", frontend, struct.pack("!II", 7, V3_0), "invalid length of startup packet"),
    ("zero-length", frontend, b"\0\0\0\0", "invalid length of startup packet"),
    (
        "startup-too-long",
        frontend,
        struct.pack("!I", 10005),
        "invalid length of startup packet: 10005",
    ),
    (
        "tls-without-sslrequest",
        frontend,
        bytes.fromhex("160301020001"),
        "TLS without sending an SSLRequest",
    ),
    ("protocol-2", frontend, untyped(2 << 16, b"\0" * 288), "unsupported frontend protocol 2.0"),
    ("protocol-4", frontend, untyped(4 << 16, b"user\0a\0\0"), "unsupported frontend protocol 4"),
    ("unknown-request", frontend, untyped((1234 << 16) | 5681), "unsupported request code"),
    ("ssl-with-body", frontend, untyped(SSL_CODE, b"\0\0\0\0"), "SSLRequest has 4 unexpected"),
    ("no-user", frontend, untyped(V3_0, b"database\0d\0\0"), "startup packet has no user"),
    ("empty-user", frontend, untyped(V3_0, b"user\0\0\0"), "startup packet has no user"),
    ("no-parameters", frontend, untyped(V3_0, b"\0"), "startup packet has no user"),
    ("no-terminator", frontend, untyped(V3_0, b"user\0a\0"), "missing its terminating NUL"),
    ("empty-body", frontend, untyped(V3_0), "missing its terminating NUL"),
    ("value-missing", frontend, untyped(V3_0, b"user\0"), "no value for parameter 'user'"),
    ("value-unterminated", frontend, untyped(V3_0, b"user\0abc"), "terminating NUL"),
    ("name-unterminated", frontend, untyped(V3_0, b"user"), "terminating NUL"),
    ("after-terminator", frontend, untyped(V3_0, b"user\0a\0\0x"), "terminator as last byte"),
    ("not-utf8", frontend, untyped(V3_0, b"user\0\xff\xfe\0\0"), "not valid UTF-8"),
    ("duplicate", frontend, untyped(V3_0, b"user\0a\0user\0b\0\0"), "repeats parameter"),
    ("cancel-short-key", frontend, untyped(CANCEL_CODE, b"\0\0\0\1abc"), "3-byte secret key"),
    ("cancel-no-pid", frontend, untyped(CANCEL_CODE, b"\0\0"), "CancelRequest is truncated"),
    (
        "cancel-long-key",
        frontend,
        untyped(CANCEL_CODE, b"\0\0\0\1" + bytes(257)),
        "257-byte secret key",
    ),
    ("typed-length-3", authenticating, b"p\0\0\0\x03", "invalid message length 3"),
    ("typed-length-0", authenticating, b"p\0\0\0\0", "invalid message length 0"),
    ("typed-too-long", authenticating, b"p\x00\x10\x00\x05", "exceeds the startup-phase limit"),
    ("typed-huge", authenticating, b"Q\xff\xff\xff\xff", "exceeds the startup-phase limit"),
    ("password-unterminated", authenticating, typed(b"p", b"abc"), "terminating NUL"),
    ("password-extra", authenticating, typed(b"p", b"abc\0d"), "1 unexpected bytes"),
    ("sasl-no-mechanism", sasl_initial, typed(b"p", b"\0\0\0\0\0"), "names no mechanism"),
    (
        "sasl-length-mismatch",
        sasl_initial,
        typed(b"p", b"SCRAM-SHA-256\0\0\0\0\x05abc"),
        "declares 5 bytes of data but carries 3",
    ),
    (
        "sasl-negative-length",
        sasl_initial,
        typed(b"p", b"SCRAM-SHA-256\0\xff\xff\xff\xfe"),
        "declares -2 bytes",
    ),
    ("sasl-truncated-length", sasl_initial, typed(b"p", b"M\0\0\0"), "truncated"),
    ("terminate-with-body", authenticating, typed(b"X", b"x"), "Terminate has 1 unexpected"),
]


@pytest.mark.parametrize(
    ("make_parser", "wire", "reason"),
    [pytest.param(p, w, r, id=i) for i, p, w, r in MALFORMED_FRONTEND],
)
def test_malformed_frontend(make_parser: Callable[[], Parser], wire: bytes, reason: str) -> None:
    parser = make_parser()
    parser.feed(wire)
    with pytest.raises(pg.ProtocolError, match=reason) as info:
        parser.next_message()
    assert isinstance(info.value, ClientError)


MALFORMED_BACKEND = [
    ("length-2", b"R\0\0\0\x02", "invalid message length 2"),
    ("too-long", b"E\x7f\xff\xff\xff", "exceeds the startup-phase limit"),
    ("auth-truncated", typed(b"R", b"\0\0"), "truncated"),
    ("auth-ok-extra", auth(0, b"\0"), "1 unexpected bytes"),
    ("auth-cleartext-extra", auth(3, b"xy"), "2 unexpected bytes"),
    ("md5-short-salt", auth(5, b"abc"), "3-byte salt"),
    ("md5-long-salt", auth(5, b"abcde"), "5-byte salt"),
    ("sasl-empty-list", auth(10, b"\0"), "no mechanism"),
    ("sasl-unterminated-list", auth(10, b"SCRAM-SHA-256\0"), "truncated|terminating NUL"),
    ("sasl-after-list", auth(10, b"SCRAM-SHA-256\0\0x"), "unexpected bytes"),
    ("parameter-status-one-string", typed(b"S", b"name\0"), "terminating NUL"),
    ("parameter-status-extra", typed(b"S", b"a\0b\0c"), "unexpected bytes"),
    ("key-data-short", typed(b"K", b"\0\0\0\1abc"), "3-byte secret key"),
    ("key-data-long", typed(b"K", b"\0\0\0\1" + bytes(257)), "257-byte secret key"),
    ("ready-bad-status", typed(b"Z", b"X"), "invalid transaction status"),
    ("ready-empty", typed(b"Z", b""), "invalid transaction status"),
    ("error-unterminated", typed(b"E", b"SFATAL\0"), "truncated"),
    ("error-value-unterminated", typed(b"E", b"SFATAL"), "terminating NUL"),
    ("error-after-terminator", typed(b"E", b"\0\0"), "unexpected bytes"),
    ("negotiate-count", typed(b"v", struct.pack("!II", 0, 99) + b"a\0"), "more options"),
    ("negotiate-extra", typed(b"v", struct.pack("!II", 0, 0) + b"a\0"), "unexpected bytes"),
]


@pytest.mark.parametrize(
    ("wire", "reason"), [pytest.param(w, r, id=i) for i, w, r in MALFORMED_BACKEND]
)
def test_malformed_backend(wire: bytes, reason: str) -> None:
    parser = pg.BackendParser()
    parser.feed(wire)
    with pytest.raises(pg.UpstreamProtocolError, match=reason) as info:
        parser.next_message()
    assert isinstance(info.value, UpstreamError)
    assert not isinstance(info.value, ClientError)


def test_oversized_length_is_refused_from_the_header_alone() -> None:
    # Only the 5 header bytes are buffered: the parser never waits for a 2 GiB body.
    parser = authenticating()
    parser.feed(b"p" + struct.pack("!I", pg.MAX_AUTH_MESSAGE_LENGTH + 5))
    with pytest.raises(pg.ProtocolError):
        parser.next_message()
    parser = pg.FrontendParser()
    parser.feed(struct.pack("!I", pg.MAX_STARTUP_PACKET_LENGTH + 5))
    with pytest.raises(pg.ProtocolError):
        parser.next_message()


def test_limits_are_inclusive() -> None:
    # The largest frames allowed parse; one byte more is refused.
    parser = authenticating()
    parser.feed(typed(b"Q", bytes(pg.MAX_AUTH_MESSAGE_LENGTH)))
    assert parser.next_message() == pg.Unknown(b"Q", bytes(pg.MAX_AUTH_MESSAGE_LENGTH))
    prefix = b"user\0a\0x\0"
    # The server's limit counts the version word and the body, not the length word.
    padding = pg.MAX_STARTUP_PACKET_LENGTH - 4 - len(prefix) - 2
    body = prefix + b"y" * padding + b"\0\0"
    wire = struct.pack("!II", 4 + 4 + len(body), V3_0) + body
    parser = pg.FrontendParser()
    parser.feed(wire)
    message = parser.next_message()
    assert isinstance(message, pg.StartupMessage)
    assert pg.encode(message) == wire
    with pytest.raises(ValueError, match="exceeds the server's limit"):
        pg.encode(pg.StartupMessage(V3_0, (*message.parameters, ("z", ""))))


# --- Misuse by our own code: ValueError / TypeError / RuntimeError ---------------------------


@pytest.mark.parametrize(
    "build",
    [
        lambda: pg.StartupMessage(V3_0, (("database", "d"),)),
        lambda: pg.StartupMessage(V3_0, (("user", ""),)),
        lambda: pg.StartupMessage(2 << 16, (("user", "a"),)),
        lambda: pg.StartupMessage(SSL_CODE, (("user", "a"),)),
        lambda: pg.StartupMessage(V3_0, (("user", "a\0b"),)),
        lambda: pg.StartupMessage(V3_0, (("user", "a"), ("", "x"))),
        lambda: pg.StartupMessage(V3_0, (("user", "a"), ("user", "b"))),
        lambda: pg.CancelRequest(1, b"abc"),
        lambda: pg.CancelRequest(1, bytes(257)),
        lambda: pg.CancelRequest(-1, KEY4),
        lambda: pg.CancelRequest(2**32, KEY4),
        lambda: pg.BackendKeyData(1, b""),
        lambda: pg.PasswordMessage(b"a\0b"),
        lambda: pg.SASLInitialResponse("", b""),
        lambda: pg.AuthenticationMD5Password(b"abc"),
        lambda: pg.AuthenticationSASL(()),
        lambda: pg.AuthenticationSASL(("",)),
        lambda: pg.AuthenticationOther(0, b""),
        lambda: pg.AuthenticationOther(10, b""),
        lambda: pg.ReadyForQuery("X"),
        lambda: pg.ErrorResponse((("", "x"),)),
        lambda: pg.ErrorResponse((("\0", "x"),)),
        lambda: pg.ErrorResponse((("M", "a\0"),)),
        lambda: pg.ParameterStatus("a\0", "b"),
        lambda: pg.Unknown(b"QQ", b""),
        lambda: pg.ErrorResponse.make("FATAL", "2800", "bad"),
        lambda: pg.ErrorResponse.make("FATAL", "28p01", "bad"),
        lambda: pg.md5_password("u", "p", b"abc"),
    ],
)
def test_invalid_messages_raise_value_error(build: Callable[[], object]) -> None:
    with pytest.raises(ValueError):
        build()


def test_wrong_types_raise_type_error() -> None:
    with pytest.raises(TypeError):
        pg.encode(object())  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        pg.StartupMessage(V3_0, [("user", "a")])  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        pg.PasswordMessage("secret")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        authenticating().expect_password(pg.Terminate)  # type: ignore[arg-type]


def test_state_misuse_raises_runtime_error() -> None:
    with pytest.raises(RuntimeError):
        pg.FrontendParser().answer_encryption_request(True)
    parser = pg.BackendParser()
    parser.expect_ssl_answer()
    with pytest.raises(RuntimeError):
        parser.expect_gssenc_answer()


# --- Helpers ----------------------------------------------------------------------------------


def test_startup_message_helpers() -> None:
    message = pg.StartupMessage(V3_2, (("user", "alice"), ("database", "orders")))
    assert message.get("user") == "alice"
    assert message.get("options") is None
    assert message.get("options", "") == ""
    assert message.user == "alice"
    assert message.database == "orders"
    assert (message.protocol_major, message.protocol_minor) == (3, 2)
    assert pg.make_protocol_version(3, 2) == pg.PROTOCOL_VERSION_3_2 == V3_2


def test_error_response_make_and_helpers() -> None:
    error = pg.ErrorResponse.make(
        "FATAL", "28000", "no identity", detail="no client certificate", hint="use mTLS"
    )
    assert error.fields == (
        ("S", "FATAL"),
        ("V", "FATAL"),
        ("C", "28000"),
        ("M", "no identity"),
        ("D", "no client certificate"),
        ("H", "use mTLS"),
    )
    assert (error.severity, error.sqlstate, error.message) == ("FATAL", "28000", "no identity")
    assert error.get("D") == "no client certificate"
    assert pg.encode(error) == typed(
        b"E",
        b"SFATAL\0VFATAL\0C28000\0Mno identity\0Dno client certificate\0Huse mTLS\0\0",
    )
    notice = pg.NoticeResponse.make("WARNING", "01000", "hm")
    assert isinstance(notice, pg.NoticeResponse)
    assert notice.fields == (("S", "WARNING"), ("V", "WARNING"), ("C", "01000"), ("M", "hm"))
    # Servers before 9.6 send only the localized S; a localized S wins over nothing.
    old = pg.ErrorResponse((("S", "FATAL"), ("M", "x")))
    assert old.severity == "FATAL"
    assert old.sqlstate is None
    localized = pg.ErrorResponse((("S", "FATAL_de"), ("V", "FATAL")))
    assert localized.severity == "FATAL"


def test_secrets_stay_out_of_repr() -> None:
    for message in (
        pg.PasswordMessage(b"hunter2"),
        pg.SASLInitialResponse("SCRAM-SHA-256", b"hunter2"),
        pg.SASLResponse(b"hunter2"),
        pg.CancelRequest(1, b"hunter2"),
        pg.BackendKeyData(1, b"hunter2"),
    ):
        assert "hunter2" not in repr(message)


def test_messages_are_frozen_and_slotted() -> None:
    for vector in VECTORS:
        message = vector.message
        assert dataclasses.is_dataclass(message)
        assert "__slots__" in type(message).__dict__, vector.id
        assert not hasattr(message, "__dict__"), vector.id
        for field in dataclasses.fields(message):
            with pytest.raises(dataclasses.FrozenInstanceError):
                setattr(message, field.name, None)


def test_md5_password() -> None:
    # The protocol's formula, spelled out with hashlib.
    inner = hashlib.md5(b"secretalice").hexdigest().encode()
    expected = b"md5" + hashlib.md5(inner + b"\x01\x02\x03\x04").hexdigest().encode()
    assert pg.md5_password("alice", "secret", b"\x01\x02\x03\x04") == expected
    assert len(expected) == 35


def test_backend_text_in_other_encodings_passes_through() -> None:
    # A LATIN1 server's message is not UTF-8; it is carried, not refused.
    wire = typed(b"E", b"SFATAL\0M\xe9chec\0\0")
    parser = pg.BackendParser()
    parser.feed(wire)
    message = parser.next_message()
    assert isinstance(message, pg.ErrorResponse)
    assert pg.encode(message) == wire


# --- Property-based: round trips ----------------------------------------------------------------

text = st.text(st.characters(codec="utf-8", exclude_characters="\0"), max_size=12)
name = text.filter(bool)
uint32 = st.integers(0, 2**32 - 1)
cancel_key = st.binary(min_size=4, max_size=256)
some_bytes = st.binary(max_size=64)


@st.composite
def startup_messages(draw: st.DrawFn) -> pg.StartupMessage:
    others = draw(st.dictionaries(name.filter(lambda n: n != "user"), text, max_size=5))
    user = draw(name)
    pairs = [("user", user), *others.items()]
    order = draw(st.permutations(pairs))
    version = draw(st.sampled_from([V3_0, V3_2, pg.make_protocol_version(3, 0xFFFF)]))
    return pg.StartupMessage(version, tuple(order))


fields = st.lists(
    st.tuples(st.characters(min_codepoint=1, max_codepoint=255), text), max_size=6
).map(tuple)

MESSAGES: st.SearchStrategy[pg.Message] = st.one_of(
    st.just(pg.SSLRequest()),
    st.just(pg.GSSENCRequest()),
    st.builds(pg.CancelRequest, uint32, cancel_key),
    startup_messages(),
    st.builds(pg.PasswordMessage, some_bytes.filter(lambda b: b"\0" not in b)),
    st.builds(pg.SASLInitialResponse, name, st.none() | some_bytes),
    st.builds(pg.SASLResponse, some_bytes),
    st.just(pg.Terminate()),
    st.builds(pg.SSLAnswer, st.booleans()),
    st.builds(pg.GSSENCAnswer, st.booleans()),
    st.just(pg.AuthenticationOk()),
    st.just(pg.AuthenticationCleartextPassword()),
    st.builds(pg.AuthenticationMD5Password, st.binary(min_size=4, max_size=4)),
    st.builds(pg.AuthenticationSASL, st.lists(name, min_size=1, max_size=4).map(tuple)),
    st.builds(pg.AuthenticationSASLContinue, some_bytes),
    st.builds(pg.AuthenticationSASLFinal, some_bytes),
    st.builds(
        pg.AuthenticationOther, uint32.filter(lambda c: c not in {0, 3, 5, 10, 11, 12}), some_bytes
    ),
    st.builds(pg.ParameterStatus, text, text),
    st.builds(pg.BackendKeyData, uint32, cancel_key),
    st.builds(pg.ReadyForQuery, st.sampled_from("ITE")),
    st.builds(pg.ErrorResponse, fields),
    st.builds(pg.NoticeResponse, fields),
    st.builds(pg.NegotiateProtocolVersion, uint32, st.lists(text, max_size=4).map(tuple)),
    st.builds(pg.Unknown, st.sampled_from([b"Q", b"T", b"D", b"C", b"\0", b"\xff"]), some_bytes),
)


def parser_for(message: pg.Message) -> Parser:
    match message:
        case pg.SSLRequest() | pg.GSSENCRequest() | pg.CancelRequest() | pg.StartupMessage():
            return frontend()
        case pg.PasswordMessage() | pg.SASLInitialResponse() | pg.SASLResponse():
            return authenticating(type(message))
        case pg.Terminate():
            return authenticating()
        case pg.SSLAnswer():
            return ssl_answer()
        case pg.GSSENCAnswer():
            return gssenc_answer()
        case _:
            return backend()


@given(MESSAGES)
def test_round_trip(message: pg.Message) -> None:
    wire = pg.encode(message)
    parser = parser_for(message)
    parser.feed(wire)
    assert parser.next_message() == message
    assert parser.leftover() == b""
    if isinstance(message, pg.Unknown):
        # Unknown frames the same way for the client side.
        client = authenticating()
        client.feed(wire)
        assert client.next_message() == message


# --- Property-based: garbage, truncation, oversized lengths ----------------------------------

FRONTEND_BOUND = max(4 + pg.MAX_STARTUP_PACKET_LENGTH, 5 + pg.MAX_AUTH_MESSAGE_LENGTH)
BACKEND_BOUND = 5 + pg.MAX_AUTH_MESSAGE_LENGTH


@st.composite
def frames(draw: st.DrawFn) -> bytes:
    """Mostly well-framed packets with arbitrary bodies, so payload decoders see garbage too."""
    kind = draw(st.sampled_from(["raw", "typed", "untyped", "auth"]))
    body = draw(st.binary(max_size=48))
    if kind == "raw":
        return body
    if kind == "typed":
        type_byte = draw(st.sampled_from([b"p", b"X", b"R", b"S", b"K", b"Z", b"E", b"N", b"v"]))
        return typed(type_byte, body)
    if kind == "auth":
        return auth(draw(st.sampled_from([0, 2, 3, 5, 7, 8, 9, 10, 11, 12, 99])), body)
    code = draw(st.sampled_from([V3_0, V3_2, CANCEL_CODE, SSL_CODE, GSSENC_CODE, 2 << 16]))
    return untyped(code, body)


def chunked(data: bytes, sizes: list[int]) -> Iterator[bytes]:
    pos = 0
    for size in sizes:
        yield data[pos : pos + size]
        pos += size
    yield data[pos:]


def drain_frontend(parser: pg.FrontendParser, accept: bool) -> None:
    while True:
        try:
            message = parser.next_message()
        except RuntimeError:
            parser.answer_encryption_request(accept)
            continue
        if message is None:
            return
        if isinstance(message, pg.StartupMessage | pg.SASLInitialResponse):
            parser.expect_password(pg.SASLResponse)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(
    packets=st.lists(frames(), max_size=8),
    sizes=st.lists(st.integers(1, 64), max_size=20),
    start_authenticated=st.booleans(),
    accept=st.booleans(),
)
def test_frontend_garbage(
    packets: list[bytes], sizes: list[int], start_authenticated: bool, accept: bool
) -> None:
    parser = authenticating(pg.SASLInitialResponse) if start_authenticated else frontend()
    try:
        for chunk in chunked(b"".join(packets), sizes):
            parser.feed(chunk)
            drain_frontend(parser, accept)
            if not parser.finished:
                assert len(parser.leftover()) < FRONTEND_BOUND
    except pg.ProtocolError:
        pass


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(
    packets=st.lists(frames(), max_size=8),
    sizes=st.lists(st.integers(1, 64), max_size=20),
    answer=st.sampled_from(["none", "ssl", "gssenc"]),
)
def test_backend_garbage(packets: list[bytes], sizes: list[int], answer: str) -> None:
    parser = {"none": backend, "ssl": ssl_answer, "gssenc": gssenc_answer}[answer]()
    try:
        for chunk in chunked(b"".join(packets), sizes):
            parser.feed(chunk)
            while parser.next_message() is not None:
                pass
            if not parser.finished:
                assert len(parser.leftover()) < BACKEND_BOUND
    except pg.UpstreamProtocolError:
        pass


@given(st.binary(max_size=200), st.booleans())
def test_pure_random_bytes(data: bytes, front: bool) -> None:
    parser: Parser = frontend() if front else backend()
    error = pg.ProtocolError if front else pg.UpstreamProtocolError
    parser.feed(data)
    try:
        while parser.next_message() is not None:
            pass
    except error:
        pass
    except RuntimeError:
        assert front  # an SSL/GSSENC request is waiting for our answer: fine


@given(st.sampled_from(VECTORS), st.data())
def test_truncated_vectors_need_more_data(vector: Vector, data: st.DataObject) -> None:
    cut = data.draw(st.integers(0, len(vector.wire) - 1))
    parser = vector.parser()
    parser.feed(vector.wire[:cut])
    assert parser.next_message() is None
    assert parser.leftover() == vector.wire[:cut]


TYPED_VECTORS = [v for v in VECTORS if len(v.wire) >= 5 and v.wire[:1] in b"pXQRSKZENvT\xff"]


@given(st.sampled_from(TYPED_VECTORS), st.data())
def test_truncated_payloads_reframed(vector: Vector, data: st.DataObject) -> None:
    # The body cut short but the length word made to match: a message or a clean error.
    body = vector.wire[5:]
    cut = data.draw(st.integers(0, len(body)))
    parser = vector.parser()
    error = pg.ProtocolError if isinstance(parser, pg.FrontendParser) else pg.UpstreamProtocolError
    parser.feed(typed(vector.wire[:1], body[:cut]))
    try:
        message = parser.next_message()
    except error:
        return
    assert message is not None
    assert pg.encode(message) == typed(vector.wire[:1], body[:cut])


@given(st.sampled_from(VECTORS), st.data())
def test_mutated_vectors(vector: Vector, data: st.DataObject) -> None:
    wire = bytearray(vector.wire)
    for _ in range(data.draw(st.integers(1, 3))):
        wire[data.draw(st.integers(0, len(wire) - 1))] = data.draw(st.integers(0, 255))
    parser = vector.parser()
    error = pg.ProtocolError if isinstance(parser, pg.FrontendParser) else pg.UpstreamProtocolError
    parser.feed(bytes(wire))
    with contextlib.suppress(error, RuntimeError):
        parser.next_message()


@given(
    st.integers(0, 3) | st.integers(pg.MAX_AUTH_MESSAGE_LENGTH + 5, 2**32 - 1),
    st.binary(min_size=1, max_size=1),
    st.booleans(),
)
def test_bad_typed_lengths_fail_on_the_header(length: int, type_byte: bytes, front: bool) -> None:
    parser: Parser = authenticating() if front else backend()
    error = pg.ProtocolError if front else pg.UpstreamProtocolError
    parser.feed(type_byte + struct.pack("!I", length))
    with pytest.raises(error):
        parser.next_message()


@given(st.integers(0, 7) | st.integers(pg.MAX_STARTUP_PACKET_LENGTH + 5, 2**32 - 1))
def test_bad_startup_lengths_fail_on_the_header(length: int) -> None:
    parser = frontend()
    parser.feed(struct.pack("!I", length))
    with pytest.raises(pg.ProtocolError, match="invalid length of startup packet"):
        parser.next_message()


# --- Cross-check: a real client (asyncpg) against FrontendParser ------------------------------

SERVER_HELLO = (
    pg.ParameterStatus("server_version", "15.0"),
    pg.ParameterStatus("server_encoding", "UTF8"),
    pg.ParameterStatus("client_encoding", "UTF8"),
    pg.ParameterStatus("DateStyle", "ISO, MDY"),
    pg.ParameterStatus("integer_datetimes", "on"),
    pg.ParameterStatus("standard_conforming_strings", "on"),
    pg.ParameterStatus("TimeZone", "UTC"),
    pg.BackendKeyData(4242, KEY4),
    pg.ReadyForQuery("I"),
)


async def serve_one(
    auth_exchange: Callable[
        [pg.FrontendParser, asyncio.StreamReader, asyncio.StreamWriter, pg.StartupMessage],
        Awaitable[None],
    ],
    seen: list[pg.FrontendMessage],
) -> tuple[asyncio.Server, int]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        parser = pg.FrontendParser()
        try:
            startup = await read_message(parser, reader, seen)
            if isinstance(startup, pg.SSLRequest):
                writer.write(parser.answer_encryption_request(False))
                startup = await read_message(parser, reader, seen)
            assert isinstance(startup, pg.StartupMessage)
            await auth_exchange(parser, reader, writer, startup)
            writer.write(b"".join(pg.encode(m) for m in SERVER_HELLO))
            await writer.drain()
            await read_message(parser, reader, seen)  # Terminate
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def read_message(
    parser: pg.FrontendParser, reader: asyncio.StreamReader, seen: list[pg.FrontendMessage]
) -> pg.FrontendMessage:
    while (message := parser.next_message()) is None:
        data = await reader.read(4096)
        assert data, "client closed early"
        parser.feed(data)
    seen.append(message)
    return message


async def test_asyncpg_md5_against_frontend_parser() -> None:
    salt = b"\x9a\x01\x00\x7f"

    async def md5_exchange(
        parser: pg.FrontendParser,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        startup: pg.StartupMessage,
    ) -> None:
        writer.write(pg.encode(pg.AuthenticationMD5Password(salt)))
        answer = await read_message(parser, reader, seen)
        assert answer == pg.PasswordMessage(pg.md5_password(startup.user, "pw-ü", salt))
        writer.write(pg.encode(pg.AuthenticationOk()))

    seen: list[pg.FrontendMessage] = []
    server, port = await serve_one(md5_exchange, seen)
    async with server:
        conn = await asyncpg.connect(
            host="127.0.0.1", port=port, user="ålice", password="pw-ü", database="orders"
        )
        await conn.close()
    assert seen[0] == pg.SSLRequest()  # asyncpg's default sslmode is "prefer"
    startup = seen[1]
    assert isinstance(startup, pg.StartupMessage)
    assert (startup.user, startup.database) == ("ålice", "orders")
    assert startup.protocol_version == pg.PROTOCOL_VERSION_3_0
    assert seen[-1] == pg.Terminate()


async def test_asyncpg_scram_against_frontend_parser() -> None:
    from scramp import ScramMechanism

    mechanism = ScramMechanism("SCRAM-SHA-256")
    auth_info = mechanism.make_auth_info("pw-ü", iteration_count=4096)

    async def scram_exchange(
        parser: pg.FrontendParser,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        startup: pg.StartupMessage,
    ) -> None:
        scram = mechanism.make_server(lambda _user: auth_info)
        writer.write(pg.encode(pg.AuthenticationSASL(("SCRAM-SHA-256",))))
        parser.expect_password(pg.SASLInitialResponse)
        first = await read_message(parser, reader, seen)
        assert isinstance(first, pg.SASLInitialResponse)
        assert first.mechanism == "SCRAM-SHA-256"
        assert first.data is not None
        scram.set_client_first(first.data.decode())
        writer.write(pg.encode(pg.AuthenticationSASLContinue(scram.get_server_first().encode())))
        parser.expect_password(pg.SASLResponse)
        final = await read_message(parser, reader, seen)
        assert isinstance(final, pg.SASLResponse)
        scram.set_client_final(final.data.decode())  # verifies the client's proof
        writer.write(pg.encode(pg.AuthenticationSASLFinal(scram.get_server_final().encode())))
        writer.write(pg.encode(pg.AuthenticationOk()))

    seen: list[pg.FrontendMessage] = []
    server, port = await serve_one(scram_exchange, seen)
    async with server:
        conn = await asyncpg.connect(
            host="127.0.0.1", port=port, user="alice", password="pw-ü", ssl=False
        )
        await conn.close()
    assert isinstance(seen[0], pg.StartupMessage)
    assert [type(m) for m in seen[1:]] == [pg.SASLInitialResponse, pg.SASLResponse, pg.Terminate]


# --- Cross-check: BackendParser against a real PostgreSQL server -----------------------------


class Upstream:
    """A blocking client socket that reads the server through BackendParser."""

    def __init__(self, host: str, port: int) -> None:
        self.sock: socket.socket = socket.create_connection((host, port), timeout=10)
        self.parser = pg.BackendParser()

    def send(self, message: pg.Message) -> None:
        self.sock.sendall(pg.encode(message))

    def receive(self) -> pg.BackendMessage:
        while (message := self.parser.next_message()) is None:
            data = self.sock.recv(4096)
            assert data, "server closed early"
            self.parser.feed(data)
        return message

    def until_ready(self) -> list[pg.BackendMessage]:
        messages = []
        while not self.parser.finished:
            messages.append(self.receive())
        return messages

    def close(self) -> None:
        self.sock.close()


def test_real_server_md5(postgres: Postgres) -> None:
    upstream = Upstream(postgres.host, postgres.port)
    try:
        upstream.parser.expect_ssl_answer()
        upstream.send(pg.SSLRequest())
        assert upstream.receive() == pg.SSLAnswer(True)  # the cluster has ssl = on
    finally:
        upstream.close()

    upstream = Upstream(postgres.host, postgres.port)
    try:
        user = "md5_user"
        upstream.send(pg.StartupMessage(V3_0, (("user", user), ("database", postgres.database))))
        request = upstream.receive()
        assert isinstance(request, pg.AuthenticationMD5Password)
        password = postgres.passwords[user]
        upstream.send(pg.PasswordMessage(pg.md5_password(user, password, request.salt)))
        assert upstream.receive() == pg.AuthenticationOk()
        rest = upstream.until_ready()
        assert pg.ParameterStatus("server_encoding", "UTF8") in rest
        assert any(isinstance(m, pg.BackendKeyData) for m in rest)
        assert rest[-1] == pg.ReadyForQuery("I")
        assert upstream.parser.leftover() == b""
        upstream.send(pg.Terminate())
    finally:
        upstream.close()


def test_real_server_scram_over_tls(postgres: Postgres) -> None:
    from scramp import ScramClient

    user = "app_user"
    upstream = Upstream(postgres.host, postgres.port)
    try:
        upstream.parser.expect_ssl_answer()
        upstream.send(pg.SSLRequest())
        assert upstream.receive() == pg.SSLAnswer(True)
        context = ssl.create_default_context(cafile=str(postgres.ca_path))
        upstream.sock = context.wrap_socket(upstream.sock, server_hostname=postgres.host)
        upstream.send(pg.StartupMessage(V3_0, (("user", user), ("database", postgres.database))))
        request = upstream.receive()
        assert isinstance(request, pg.AuthenticationSASL)
        assert "SCRAM-SHA-256" in request.mechanisms
        client = ScramClient(["SCRAM-SHA-256"], user, postgres.passwords[user])
        upstream.send(pg.SASLInitialResponse("SCRAM-SHA-256", client.get_client_first().encode()))
        server_first = upstream.receive()
        assert isinstance(server_first, pg.AuthenticationSASLContinue)
        client.set_server_first(server_first.data.decode())
        upstream.send(pg.SASLResponse(client.get_client_final().encode()))
        server_final = upstream.receive()
        assert isinstance(server_final, pg.AuthenticationSASLFinal)
        client.set_server_final(server_final.data.decode())  # verifies the server
        assert upstream.receive() == pg.AuthenticationOk()
        assert upstream.until_ready()[-1] == pg.ReadyForQuery("I")
    finally:
        upstream.close()


def test_real_server_errors(postgres: Postgres) -> None:
    upstream = Upstream(postgres.host, postgres.port)
    try:
        upstream.send(pg.StartupMessage(V3_0, (("user", "md5_user"), ("database", "appdb"))))
        assert isinstance(upstream.receive(), pg.AuthenticationMD5Password)
        upstream.send(pg.PasswordMessage(b"md5" + b"0" * 32))
        error = upstream.receive()
        assert isinstance(error, pg.ErrorResponse)
        assert (error.severity, error.sqlstate) == ("FATAL", "28P01")
    finally:
        upstream.close()
    # A StartupMessage with a minor version the server does not know: it negotiates down.
    upstream = Upstream(postgres.host, postgres.port)
    try:
        upstream.send(
            pg.StartupMessage(
                pg.make_protocol_version(3, 9),
                (("user", "md5_user"), ("database", "appdb"), ("_pq_.nonsense", "1")),
            )
        )
        negotiate = upstream.receive()
        # The server sends its newest full version number (3.0 for PostgreSQL 15), though
        # the protocol documentation calls the field the "newest minor protocol version".
        assert negotiate == pg.NegotiateProtocolVersion(V3_0, ("_pq_.nonsense",))
        assert isinstance(negotiate, pg.NegotiateProtocolVersion)
        assert negotiate.newest_minor == 0
    finally:
        upstream.close()
