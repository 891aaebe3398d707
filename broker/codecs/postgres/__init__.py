"""PostgreSQL startup/authentication-phase codec: sans-IO, bytes in, messages out.

The broker is a server to the client (FrontendParser reads the client; ``encode`` builds the
server's messages) and a client to the upstream (BackendParser reads the server; ``encode``
builds the client's messages). After authentication the adapter splices raw bytes, so only the
startup-phase messages are interpreted; any other typed message is framed as Unknown.

Driving the parsers (after every ``feed()``, call ``next_message()`` until it returns None):

- Client side: ``SSLRequest`` -> send ``answer_encryption_request(True)`` (b"S"), start TLS,
  feed the decrypted bytes to the same parser -> ``StartupMessage``. A ``GSSENCRequest`` gets
  ``answer_encryption_request(False)`` (b"N"). Before asking for a password, set the kind of
  'p' to expect: ``expect_password(PasswordMessage | SASLInitialResponse | SASLResponse)``.
- Upstream side: ``expect_ssl_answer()``, send ``encode(SSLRequest())`` -> ``SSLAnswer``;
  if accepted, start TLS and keep feeding the same parser. Then read until ``finished``
  (ReadyForQuery).
- Then splice: ``leftover()`` holds the bytes received but not parsed; forward them first.
"""

from ._auth import md5_password
from ._constants import (
    CANCEL_REQUEST_CODE,
    GSSENC_REQUEST_CODE,
    MAX_AUTH_MESSAGE_LENGTH,
    MAX_CANCEL_KEY_LENGTH,
    MAX_STARTUP_PACKET_LENGTH,
    MIN_CANCEL_KEY_LENGTH,
    MIN_STARTUP_PACKET_LENGTH,
    PROTOCOL_VERSION_3_0,
    PROTOCOL_VERSION_3_2,
    SSL_REQUEST_CODE,
    make_protocol_version,
)
from ._errors import ProtocolError, UpstreamProtocolError
from ._guard import MAX_INSPECTED_MESSAGE, PasswordChangeGuard, changes_password
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
    FrontendMessage,
    GSSENCAnswer,
    GSSENCRequest,
    Message,
    NegotiateProtocolVersion,
    NoticeResponse,
    ParameterStatus,
    PasswordKind,
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
from ._parsers import BackendParser, FrontendParser
from ._session import RESET_QUERY, ResetReader, SessionTracker
from ._writers import encode

__all__ = [
    "CANCEL_REQUEST_CODE",
    "GSSENC_REQUEST_CODE",
    "MAX_AUTH_MESSAGE_LENGTH",
    "MAX_CANCEL_KEY_LENGTH",
    "MAX_INSPECTED_MESSAGE",
    "MAX_STARTUP_PACKET_LENGTH",
    "MIN_CANCEL_KEY_LENGTH",
    "MIN_STARTUP_PACKET_LENGTH",
    "PROTOCOL_VERSION_3_0",
    "PROTOCOL_VERSION_3_2",
    "RESET_QUERY",
    "SSL_REQUEST_CODE",
    "AuthenticationCleartextPassword",
    "AuthenticationMD5Password",
    "AuthenticationOk",
    "AuthenticationOther",
    "AuthenticationSASL",
    "AuthenticationSASLContinue",
    "AuthenticationSASLFinal",
    "BackendKeyData",
    "BackendMessage",
    "BackendParser",
    "CancelRequest",
    "ErrorResponse",
    "FrontendMessage",
    "FrontendParser",
    "GSSENCAnswer",
    "GSSENCRequest",
    "Message",
    "NegotiateProtocolVersion",
    "NoticeResponse",
    "ParameterStatus",
    "PasswordChangeGuard",
    "PasswordKind",
    "PasswordMessage",
    "ProtocolError",
    "ReadyForQuery",
    "ResetReader",
    "SASLInitialResponse",
    "SASLResponse",
    "SSLAnswer",
    "SSLRequest",
    "SessionTracker",
    "StartupMessage",
    "Terminate",
    "Unknown",
    "UpstreamProtocolError",
    "changes_password",
    "encode",
    "make_protocol_version",
    "md5_password",
]
