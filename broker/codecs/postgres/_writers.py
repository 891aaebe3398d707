"""Bytes from messages: ``encode(message)``.

Messages validate themselves when built, so encoding only lays out bytes. Strings are written
as UTF-8 with ``surrogateescape``, so that text a BackendParser read from a server in another
encoding is passed on byte for byte.
"""

import struct

from ._constants import (
    AUTH_CLEARTEXT_PASSWORD,
    AUTH_MD5_PASSWORD,
    AUTH_OK,
    AUTH_SASL,
    AUTH_SASL_CONTINUE,
    AUTH_SASL_FINAL,
    CANCEL_REQUEST_CODE,
    GSSENC_REQUEST_CODE,
    MAX_STARTUP_PACKET_LENGTH,
    SSL_REQUEST_CODE,
    STARTUP_HEADER_LENGTH,
)
from ._messages import (
    AuthenticationCleartextPassword,
    AuthenticationMD5Password,
    AuthenticationOk,
    AuthenticationOther,
    AuthenticationSASL,
    AuthenticationSASLContinue,
    AuthenticationSASLFinal,
    BackendKeyData,
    CancelRequest,
    ErrorResponse,
    GSSENCAnswer,
    GSSENCRequest,
    Message,
    NegotiateProtocolVersion,
    NoticeResponse,
    ParameterStatus,
    PasswordMessage,
    ReadyForQuery,
    SASLInitialResponse,
    SASLResponse,
    SSLAnswer,
    SSLRequest,
    StartupMessage,
    Terminate,
    Unknown,
)

_UINT32 = struct.Struct("!I")
_INT32 = struct.Struct("!i")
_NO_SASL_DATA = -1


def _cstring(value: str) -> bytes:
    return value.encode("utf-8", "surrogateescape") + b"\0"


def _typed(type_byte: bytes, payload: bytes) -> bytes:
    return type_byte + _UINT32.pack(len(payload) + 4) + payload


def _untyped(code: int, payload: bytes = b"") -> bytes:
    body = _UINT32.pack(code) + payload
    if len(body) > MAX_STARTUP_PACKET_LENGTH:
        raise ValueError(
            f"startup packet of {len(body)} bytes exceeds the server's limit of "
            f"{MAX_STARTUP_PACKET_LENGTH}"
        )
    return _UINT32.pack(len(body) + STARTUP_HEADER_LENGTH) + body


def _auth(code: int, data: bytes = b"") -> bytes:
    return _typed(b"R", _UINT32.pack(code) + data)


def _fields(fields: tuple[tuple[str, str], ...]) -> bytes:
    return b"".join(code.encode("latin-1") + _cstring(value) for code, value in fields) + b"\0"


def encode(message: Message) -> bytes:
    """The wire bytes of ``message``; TypeError for anything that is not a message."""
    match message:
        # Frontend
        case SSLRequest():
            return _untyped(SSL_REQUEST_CODE)
        case GSSENCRequest():
            return _untyped(GSSENC_REQUEST_CODE)
        case CancelRequest(process_id=pid, secret_key=key):
            return _untyped(CANCEL_REQUEST_CODE, _UINT32.pack(pid) + key)
        case StartupMessage(protocol_version=version, parameters=parameters):
            body = b"".join(_cstring(name) + _cstring(value) for name, value in parameters)
            return _untyped(version, body + b"\0")
        case PasswordMessage(password=password):
            return _typed(b"p", password + b"\0")
        case SASLInitialResponse(mechanism=mechanism, data=data):
            if data is None:
                return _typed(b"p", _cstring(mechanism) + _INT32.pack(_NO_SASL_DATA))
            return _typed(b"p", _cstring(mechanism) + _INT32.pack(len(data)) + data)
        case SASLResponse(data=data):
            return _typed(b"p", data)
        case Terminate():
            return _typed(b"X", b"")
        # Backend
        case SSLAnswer(accepted=accepted):
            return b"S" if accepted else b"N"
        case GSSENCAnswer(accepted=accepted):
            return b"G" if accepted else b"N"
        case AuthenticationOk():
            return _auth(AUTH_OK)
        case AuthenticationCleartextPassword():
            return _auth(AUTH_CLEARTEXT_PASSWORD)
        case AuthenticationMD5Password(salt=salt):
            return _auth(AUTH_MD5_PASSWORD, salt)
        case AuthenticationSASL(mechanisms=mechanisms):
            return _auth(AUTH_SASL, b"".join(_cstring(m) for m in mechanisms) + b"\0")
        case AuthenticationSASLContinue(data=data):
            return _auth(AUTH_SASL_CONTINUE, data)
        case AuthenticationSASLFinal(data=data):
            return _auth(AUTH_SASL_FINAL, data)
        case AuthenticationOther(code=code, data=data):
            return _auth(code, data)
        case ParameterStatus(name=name, value=value):
            return _typed(b"S", _cstring(name) + _cstring(value))
        case BackendKeyData(process_id=pid, secret_key=key):
            return _typed(b"K", _UINT32.pack(pid) + key)
        case ReadyForQuery(status=status):
            return _typed(b"Z", status.encode("ascii"))
        case ErrorResponse(fields=fields):
            return _typed(b"E", _fields(fields))
        case NoticeResponse(fields=fields):
            return _typed(b"N", _fields(fields))
        case NegotiateProtocolVersion(newest_version=version, unrecognized_options=options):
            payload = _UINT32.pack(version) + _UINT32.pack(len(options))
            return _typed(b"v", payload + b"".join(_cstring(o) for o in options))
        case Unknown(type=type_byte, payload=payload):
            return _typed(type_byte, payload)
        case _:
            raise TypeError(f"not a PostgreSQL message: {type(message).__name__}")
