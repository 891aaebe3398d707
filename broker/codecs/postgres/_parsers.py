"""The two sans-IO parsers: bytes in with ``feed()``, messages out with ``next_message()``.

FrontendParser reads a client (the broker is its server); BackendParser reads a server (the
broker is its client). Both only know the startup/authentication phase: once it is over, the
adapter takes ``leftover()`` and splices raw bytes.

Buffering is bounded by the length checks as long as the caller drains the parser: after each
``feed()``, call ``next_message()`` until it returns None. A frame header that declares more than
the limit is refused the moment its length word is buffered, so at most one incomplete frame
(under the limit) is ever held.
"""

import enum
import struct
from typing import NoReturn

from ._constants import (
    CANCEL_REQUEST_CODE,
    GSSENC_REQUEST_CODE,
    MAX_AUTH_MESSAGE_LENGTH,
    MAX_STARTUP_PACKET_LENGTH,
    MIN_STARTUP_PACKET_LENGTH,
    MIN_TYPED_LENGTH,
    REQUEST_CODE_MAJOR,
    SSL_REQUEST_CODE,
    STARTUP_HEADER_LENGTH,
    SUPPORTED_PROTOCOL_MAJOR,
    TYPED_HEADER_LENGTH,
)
from ._errors import Malformed, ProtocolError, UpstreamProtocolError
from ._messages import (
    BackendMessage,
    FrontendMessage,
    GSSENCAnswer,
    GSSENCRequest,
    PasswordKind,
    PasswordMessage,
    ReadyForQuery,
    SASLInitialResponse,
    SASLResponse,
    SSLAnswer,
    SSLRequest,
    Terminate,
    Unknown,
)
from ._readers import (
    read_backend_message,
    read_cancel_request,
    read_password_message,
    read_sasl_initial_response,
    read_sasl_response,
    read_startup_message,
)
from ._writers import encode

_UINT32 = struct.Struct("!I")
# First byte of a TLS record carrying a handshake: a client that starts TLS without an
# SSLRequest (libpq's sslnegotiation=direct) shows up as an absurd startup packet length.
_TLS_HANDSHAKE_RECORD = 0x16


class _Framer:
    """The byte buffer and typed framing both parsers share; failure is sticky."""

    __slots__ = ("_buffer", "_failure")

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._failure: str | None = None

    def feed(self, data: bytes) -> None:
        """Append bytes received from the peer."""
        self._buffer += data

    def leftover(self) -> bytes:
        """Bytes received but not parsed (yet): what to hand to TLS or the splice."""
        return bytes(self._buffer)

    def _fail(self, reason: str) -> NoReturn:
        self._failure = reason
        raise self._error(reason)

    def _error(self, reason: str) -> Exception:
        raise NotImplementedError

    def _check_failed(self) -> None:
        if self._failure is not None:
            raise self._error(f"the peer already broke the protocol: {self._failure}")

    def _next_frame(self) -> tuple[bytes, bytes] | None:
        """The next complete typed frame as (type byte, payload), or None for more data."""
        buffer = self._buffer
        if len(buffer) < TYPED_HEADER_LENGTH:
            return None
        (length,) = _UINT32.unpack_from(buffer, 1)
        if length < MIN_TYPED_LENGTH:
            self._fail(f"invalid message length {length}")
        if length - MIN_TYPED_LENGTH > MAX_AUTH_MESSAGE_LENGTH:
            self._fail(
                f"message of {length} bytes exceeds the startup-phase limit of "
                f"{MAX_AUTH_MESSAGE_LENGTH}"
            )
        end = 1 + length
        if len(buffer) < end:
            return None
        type_byte = bytes(buffer[:1])
        payload = bytes(buffer[TYPED_HEADER_LENGTH:end])
        del buffer[:end]
        return type_byte, payload


class _Frontend(enum.Enum):
    STARTUP = enum.auto()  # an untyped packet comes next
    ENCRYPTION_PENDING = enum.auto()  # we owe the client an answer to SSL/GSSENCRequest
    AUTHENTICATING = enum.auto()  # typed messages, after the StartupMessage
    FINISHED = enum.auto()  # after CancelRequest or Terminate: nothing more to read


class FrontendParser(_Framer):
    """Reads what a PostgreSQL client sends; used on the broker's server side.

    The first packet is untyped: StartupMessage, SSLRequest, GSSENCRequest or CancelRequest.
    An SSLRequest/GSSENCRequest must be answered with ``answer_encryption_request()`` before
    parsing goes on with the next untyped packet (over TLS if accepted). After the
    StartupMessage come typed messages; a 'p' is read as the kind set by ``expect_password()``.
    Malformed input raises ProtocolError (the client's fault), and then every later call does.
    """

    __slots__ = ("_gss_done", "_password_kind", "_pending", "_ssl_done", "_state")

    def __init__(self) -> None:
        super().__init__()
        self._state = _Frontend.STARTUP
        self._pending: SSLRequest | GSSENCRequest | None = None
        self._ssl_done = False
        self._gss_done = False
        self._password_kind: PasswordKind = PasswordMessage

    def _error(self, reason: str) -> Exception:
        return ProtocolError(reason)

    @property
    def finished(self) -> bool:
        """True after a CancelRequest or Terminate: ``next_message()`` returns None from now."""
        return self._state is _Frontend.FINISHED

    def expect_password(self, kind: PasswordKind) -> None:
        """How to read the next 'p' messages: PasswordMessage (the default) after asking for a
        cleartext or md5 password, SASLInitialResponse after AuthenticationSASL,
        SASLResponse after AuthenticationSASLContinue."""
        if kind not in (PasswordMessage, SASLInitialResponse, SASLResponse):
            raise TypeError(f"not a password message class: {kind!r}")
        self._password_kind = kind

    def answer_encryption_request(self, accept: bool) -> bytes:
        """Answer the pending SSLRequest/GSSENCRequest; returns the byte to send.

        If ``accept``, send it, start TLS, and feed the decrypted bytes to this same parser.
        Plaintext the client sent before our answer is refused (CVE-2021-23214): it may have
        been injected by a man in the middle. RuntimeError if no request is pending.
        """
        if self._state is not _Frontend.ENCRYPTION_PENDING:
            raise RuntimeError("no SSLRequest or GSSENCRequest is waiting for an answer")
        if accept and self._buffer:
            self._fail("received unencrypted data after SSL request")
        # Like the server: SSL or GSS encryption, never both, and each asked for at most once.
        answer: SSLAnswer | GSSENCAnswer
        if isinstance(self._pending, SSLRequest):
            self._ssl_done, self._gss_done = True, self._gss_done or accept
            answer = SSLAnswer(accept)
        else:
            self._gss_done, self._ssl_done = True, self._ssl_done or accept
            answer = GSSENCAnswer(accept)
        self._pending = None
        self._state = _Frontend.STARTUP
        return encode(answer)

    def start_direct_tls(self) -> None:
        """The client opened with a TLS ClientHello instead of an SSLRequest (PostgreSQL 17's
        ``sslnegotiation=direct``): start TLS with what is buffered as its first bytes, and
        feed the decrypted bytes here; a later SSLRequest is refused like a second one.
        RuntimeError unless this is the very start of the connection."""
        if self._state is not _Frontend.STARTUP or self._ssl_done or self._gss_done:
            raise RuntimeError("direct TLS is only possible as a connection's first bytes")
        if self._buffer:
            raise RuntimeError("the ClientHello must go to the TLS layer, not to this parser")
        self._ssl_done = True

    def next_message(self) -> FrontendMessage | None:
        """The next complete message, or None when more bytes are needed (or finished)."""
        self._check_failed()
        if self._state is _Frontend.ENCRYPTION_PENDING:
            raise RuntimeError("answer the encryption request first (answer_encryption_request)")
        try:
            if self._state is _Frontend.STARTUP:
                return self._next_untyped()
            if self._state is _Frontend.AUTHENTICATING:
                return self._next_typed()
        except Malformed as exc:
            self._fail(str(exc))
        return None

    def _next_untyped(self) -> FrontendMessage | None:
        buffer = self._buffer
        if len(buffer) < STARTUP_HEADER_LENGTH:
            return None
        (length,) = _UINT32.unpack_from(buffer)
        if (
            not MIN_STARTUP_PACKET_LENGTH
            <= length
            <= (MAX_STARTUP_PACKET_LENGTH + STARTUP_HEADER_LENGTH)
        ):
            hint = ""
            if buffer[0] == _TLS_HANDSHAKE_RECORD:
                hint = " (the client seems to start TLS without sending an SSLRequest first)"
            self._fail(f"invalid length of startup packet: {length}{hint}")
        if len(buffer) < length:
            return None
        (code,) = _UINT32.unpack_from(buffer, STARTUP_HEADER_LENGTH)
        payload = bytes(buffer[MIN_STARTUP_PACKET_LENGTH:length])
        del buffer[:length]
        major, minor = code >> 16, code & 0xFFFF

        if code == CANCEL_REQUEST_CODE:
            self._state = _Frontend.FINISHED
            return read_cancel_request(payload)
        if code in (SSL_REQUEST_CODE, GSSENC_REQUEST_CODE):
            request = SSLRequest() if code == SSL_REQUEST_CODE else GSSENCRequest()
            name = type(request).__name__
            if payload:
                raise Malformed(f"{name} has {len(payload)} unexpected bytes")
            if self._ssl_done if code == SSL_REQUEST_CODE else self._gss_done:
                raise Malformed(f"{name} after encryption was already negotiated")
            self._pending = request
            self._state = _Frontend.ENCRYPTION_PENDING
            return request
        if major == REQUEST_CODE_MAJOR:
            raise Malformed(f"unsupported request code {major}.{minor}")
        if major != SUPPORTED_PROTOCOL_MAJOR:
            raise Malformed(
                f"unsupported frontend protocol {major}.{minor}: only protocol 3.x is supported"
            )
        message = read_startup_message(code, payload)
        self._state = _Frontend.AUTHENTICATING
        return message

    def _next_typed(self) -> FrontendMessage | None:
        frame = self._next_frame()
        if frame is None:
            return None
        type_byte, payload = frame
        if type_byte == b"p":
            if self._password_kind is SASLInitialResponse:
                return read_sasl_initial_response(payload)
            if self._password_kind is SASLResponse:
                return read_sasl_response(payload)
            return read_password_message(payload)
        if type_byte == b"X":
            if payload:
                raise Malformed(f"Terminate has {len(payload)} unexpected bytes")
            self._state = _Frontend.FINISHED
            return Terminate()
        return Unknown(type_byte, payload)


class _Backend(enum.Enum):
    TYPED = enum.auto()  # typed messages
    SSL_ANSWER = enum.auto()  # one byte answering our SSLRequest comes next
    GSSENC_ANSWER = enum.auto()  # one byte answering our GSSENCRequest comes next
    FINISHED = enum.auto()  # after ReadyForQuery: the rest belongs to the splice


class BackendParser(_Framer):
    """Reads what a PostgreSQL server sends; used on the broker's client side.

    Reads typed messages; after the broker sends an SSLRequest (GSSENCRequest), call
    ``expect_ssl_answer()`` (``expect_gssenc_answer()``) so the next message is the one-byte
    answer. After ReadyForQuery the parser is finished: ``next_message()`` returns None and
    anything that followed stays in ``leftover()``. Malformed input raises
    UpstreamProtocolError (the server's fault), and then every later call does.
    """

    __slots__ = ("_state",)

    def __init__(self) -> None:
        super().__init__()
        self._state = _Backend.TYPED

    def _error(self, reason: str) -> Exception:
        return UpstreamProtocolError(reason)

    @property
    def finished(self) -> bool:
        """True once ReadyForQuery was read: authentication is over."""
        return self._state is _Backend.FINISHED

    def expect_ssl_answer(self) -> None:
        """The next message is the server's 'S'/'N' answer to our SSLRequest."""
        self._expect_answer(_Backend.SSL_ANSWER)

    def expect_gssenc_answer(self) -> None:
        """The next message is the server's 'G'/'N' answer to our GSSENCRequest."""
        self._expect_answer(_Backend.GSSENC_ANSWER)

    def _expect_answer(self, state: _Backend) -> None:
        if self._state is not _Backend.TYPED:
            raise RuntimeError(f"cannot expect an encryption answer in state {self._state.name}")
        self._state = state

    def next_message(self) -> BackendMessage | None:
        """The next complete message, or None when more bytes are needed (or finished)."""
        self._check_failed()
        try:
            if self._state is _Backend.TYPED:
                return self._next_typed()
            if self._state is _Backend.SSL_ANSWER:
                return self._next_answer(b"S", "SSLRequest")
            if self._state is _Backend.GSSENC_ANSWER:
                return self._next_answer(b"G", "GSSENCRequest")
        except Malformed as exc:
            self._fail(str(exc))
        return None

    def _next_answer(self, yes: bytes, request: str) -> BackendMessage | None:
        if not self._buffer:
            return None
        answer = bytes(self._buffer[:1])
        del self._buffer[:1]
        if answer == yes:
            if self._buffer:
                # Whatever came with the 'S' was not encrypted and may come from a man in the
                # middle (CVE-2021-23222); the TLS handshake must be the next thing we read.
                raise Malformed(f"received unencrypted data after the answer to {request}")
            self._state = _Backend.TYPED
            return SSLAnswer(True) if yes == b"S" else GSSENCAnswer(True)
        if answer == b"N":
            self._state = _Backend.TYPED
            return SSLAnswer(False) if yes == b"S" else GSSENCAnswer(False)
        if answer == b"E":
            # A server that predates the request, or failed before answering. Its message is
            # not read: nothing from an unauthenticated server should reach the logs as fact.
            raise Malformed(f"server answered the {request} with an error")
        raise Malformed(f"invalid answer to {request}: {answer!r}")

    def _next_typed(self) -> BackendMessage | None:
        frame = self._next_frame()
        if frame is None:
            return None
        message = read_backend_message(*frame)
        if isinstance(message, ReadyForQuery):
            self._state = _Backend.FINISHED
        return message
