"""Messages from framed payloads.

Each reader takes the body of one packet (framing already checked by the parser) and returns a
message or raises Malformed; the parser turns that into ProtocolError or UpstreamProtocolError,
depending on who sent the bytes. Readers check everything a message's constructor checks, so a
peer can never trigger the ValueError meant for our own mistakes.
"""

import struct

from ._constants import (
    AUTH_CLEARTEXT_PASSWORD,
    AUTH_MD5_PASSWORD,
    AUTH_OK,
    AUTH_SASL,
    AUTH_SASL_CONTINUE,
    AUTH_SASL_FINAL,
    MAX_CANCEL_KEY_LENGTH,
    MD5_SALT_LENGTH,
    MIN_CANCEL_KEY_LENGTH,
)
from ._errors import Malformed
from ._messages import (
    AuthenticationCleartextPassword,
    AuthenticationMD5Password,
    AuthenticationOk,
    AuthenticationOther,
    AuthenticationSASL,
    AuthenticationSASLContinue,
    AuthenticationSASLFinal,
    BackendKeyData,
    BackendMessage,
    CancelRequest,
    ErrorResponse,
    NegotiateProtocolVersion,
    NoticeResponse,
    ParameterStatus,
    PasswordMessage,
    ReadyForQuery,
    SASLInitialResponse,
    SASLResponse,
    StartupMessage,
    Unknown,
)

_UINT32 = struct.Struct("!I")
_INT32 = struct.Struct("!i")
_NO_SASL_DATA = -1


class _Cursor:
    """Reads the fields of one payload front to back."""

    __slots__ = ("_data", "_pos", "_what")

    def __init__(self, data: bytes, what: str) -> None:
        self._data = data
        self._pos = 0
        self._what = what

    @property
    def at_end(self) -> bool:
        return self._pos == len(self._data)

    def byte(self) -> int:
        if self.at_end:
            raise Malformed(f"{self._what} is truncated")
        value = self._data[self._pos]
        self._pos += 1
        return value

    def uint32(self) -> int:
        return self._int(_UINT32)

    def int32(self) -> int:
        return self._int(_INT32)

    def _int(self, fmt: struct.Struct) -> int:
        end = self._pos + fmt.size
        if end > len(self._data):
            raise Malformed(f"{self._what} is truncated")
        (value,) = fmt.unpack_from(self._data, self._pos)
        self._pos = end
        return int(value)

    def raw_cstring(self) -> bytes:
        end = self._data.find(b"\0", self._pos)
        if end < 0:
            raise Malformed(f"{self._what} has a string without its terminating NUL")
        value = self._data[self._pos : end]
        self._pos = end + 1
        return value

    def cstring(self, *, strict: bool) -> str:
        """A NUL-terminated string: strict UTF-8 from clients; servers' bytes kept as is."""
        raw = self.raw_cstring()
        if not strict:
            return raw.decode("utf-8", "surrogateescape")
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise Malformed(f"{self._what} has a string that is not valid UTF-8") from None

    def rest(self) -> bytes:
        value = self._data[self._pos :]
        self._pos = len(self._data)
        return value

    def end(self) -> None:
        if not self.at_end:
            raise Malformed(f"{self._what} has {len(self._data) - self._pos} unexpected bytes")


def _cancel_key(key: bytes, what: str) -> bytes:
    if not MIN_CANCEL_KEY_LENGTH <= len(key) <= MAX_CANCEL_KEY_LENGTH:
        raise Malformed(
            f"{what} has a {len(key)}-byte secret key; the protocol allows "
            f"{MIN_CANCEL_KEY_LENGTH} to {MAX_CANCEL_KEY_LENGTH}"
        )
    return key


# --- Untyped (body after the length word and the code) ---------------------------------------


def read_cancel_request(payload: bytes) -> CancelRequest:
    cursor = _Cursor(payload, "CancelRequest")
    process_id = cursor.uint32()
    return CancelRequest(process_id, _cancel_key(cursor.rest(), "CancelRequest"))


def read_startup_message(protocol_version: int, payload: bytes) -> StartupMessage:
    cursor = _Cursor(payload, "startup packet")
    parameters: list[tuple[str, str]] = []
    seen: set[str] = set()
    while True:
        if cursor.at_end:
            raise Malformed("startup packet is missing its terminating NUL")
        name = cursor.cstring(strict=True)
        if not name:
            break
        if cursor.at_end:
            raise Malformed(f"startup packet has no value for parameter {name!r}")
        value = cursor.cstring(strict=True)
        if name in seen:
            # Refused rather than guessed: if we and the server read a packet differently,
            # a client could smuggle a parameter past our checks.
            raise Malformed(f"startup packet repeats parameter {name!r}")
        seen.add(name)
        parameters.append((name, value))
    if not cursor.at_end:
        raise Malformed("invalid startup packet layout: expected terminator as last byte")
    if not any(name == "user" and value for name, value in parameters):
        raise Malformed("startup packet has no user")
    return StartupMessage(protocol_version, tuple(parameters))


# --- Typed, from the client ('p') ------------------------------------------------------------


def read_password_message(payload: bytes) -> PasswordMessage:
    cursor = _Cursor(payload, "PasswordMessage")
    password = cursor.raw_cstring()
    cursor.end()
    return PasswordMessage(password)


def read_sasl_initial_response(payload: bytes) -> SASLInitialResponse:
    cursor = _Cursor(payload, "SASLInitialResponse")
    mechanism = cursor.cstring(strict=True)
    if not mechanism:
        raise Malformed("SASLInitialResponse names no mechanism")
    length = cursor.int32()
    if length == _NO_SASL_DATA:
        cursor.end()
        return SASLInitialResponse(mechanism, None)
    data = cursor.rest()
    if length != len(data):
        raise Malformed(
            f"SASLInitialResponse declares {length} bytes of data but carries {len(data)}"
        )
    return SASLInitialResponse(mechanism, data)


def read_sasl_response(payload: bytes) -> SASLResponse:
    return SASLResponse(payload)


# --- Typed, from the server ------------------------------------------------------------------


def _read_authentication(payload: bytes) -> BackendMessage:
    cursor = _Cursor(payload, "Authentication message")
    code = cursor.uint32()
    if code == AUTH_OK:
        cursor.end()
        return AuthenticationOk()
    if code == AUTH_CLEARTEXT_PASSWORD:
        cursor.end()
        return AuthenticationCleartextPassword()
    if code == AUTH_MD5_PASSWORD:
        salt = cursor.rest()
        if len(salt) != MD5_SALT_LENGTH:
            raise Malformed(f"AuthenticationMD5Password has a {len(salt)}-byte salt, not 4")
        return AuthenticationMD5Password(salt)
    if code == AUTH_SASL:
        mechanisms: list[str] = []
        while mechanism := cursor.cstring(strict=True):
            mechanisms.append(mechanism)
        cursor.end()
        if not mechanisms:
            raise Malformed("AuthenticationSASL lists no mechanism")
        return AuthenticationSASL(tuple(mechanisms))
    if code == AUTH_SASL_CONTINUE:
        return AuthenticationSASLContinue(cursor.rest())
    if code == AUTH_SASL_FINAL:
        return AuthenticationSASLFinal(cursor.rest())
    return AuthenticationOther(code, cursor.rest())


def _read_parameter_status(payload: bytes) -> ParameterStatus:
    cursor = _Cursor(payload, "ParameterStatus")
    name = cursor.cstring(strict=False)
    value = cursor.cstring(strict=False)
    cursor.end()
    return ParameterStatus(name, value)


def _read_backend_key_data(payload: bytes) -> BackendKeyData:
    cursor = _Cursor(payload, "BackendKeyData")
    process_id = cursor.uint32()
    return BackendKeyData(process_id, _cancel_key(cursor.rest(), "BackendKeyData"))


def _read_ready_for_query(payload: bytes) -> ReadyForQuery:
    if payload not in (b"I", b"T", b"E"):
        raise Malformed("ReadyForQuery has an invalid transaction status")
    return ReadyForQuery(payload.decode("ascii"))


def _read_fields(payload: bytes, what: str) -> tuple[tuple[str, str], ...]:
    # Byte1 code + String value, repeated; a zero code byte ends the list.
    cursor = _Cursor(payload, what)
    fields: list[tuple[str, str]] = []
    while code := cursor.byte():
        fields.append((chr(code), cursor.cstring(strict=False)))
    cursor.end()
    return tuple(fields)


def _read_negotiate_protocol_version(payload: bytes) -> NegotiateProtocolVersion:
    cursor = _Cursor(payload, "NegotiateProtocolVersion")
    newest_version = cursor.uint32()
    count = cursor.uint32()
    # Each option takes at least its NUL, so a larger count cannot be honest; checking first
    # keeps a forged count from costing a long loop.
    if count > len(payload):
        raise Malformed("NegotiateProtocolVersion counts more options than it carries")
    options = tuple(cursor.cstring(strict=False) for _ in range(count))
    cursor.end()
    return NegotiateProtocolVersion(newest_version, options)


def read_backend_message(type_byte: bytes, payload: bytes) -> BackendMessage:
    """A typed server message; types this codec does not interpret come back as Unknown."""
    if type_byte == b"R":
        return _read_authentication(payload)
    if type_byte == b"S":
        return _read_parameter_status(payload)
    if type_byte == b"K":
        return _read_backend_key_data(payload)
    if type_byte == b"Z":
        return _read_ready_for_query(payload)
    if type_byte == b"E":
        return ErrorResponse(_read_fields(payload, "ErrorResponse"))
    if type_byte == b"N":
        return NoticeResponse(_read_fields(payload, "NoticeResponse"))
    if type_byte == b"v":
        return _read_negotiate_protocol_version(payload)
    return Unknown(type_byte, payload)
