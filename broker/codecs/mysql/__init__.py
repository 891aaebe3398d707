"""MySQL/MariaDB connection-phase codec: sans-IO, bytes in, packets out.

The broker is a server to the client (`ClientParser` reads it; `encode` builds the greeting,
OK and ERR) and a client to the upstream (`ServerParser` reads it; `encode` builds the
SSLRequest, the HandshakeResponse41 and auth data). After login the adapter splices raw
bytes and watches only command packets (`adapters/mysql/_filter.py`). Protocol numbers
(capability flags, commands) and the limits are in `broker.codecs.mysql.constants`.
"""

from ._codec import (
    decode_auth_reply,
    decode_client_hello,
    decode_eof,
    decode_err,
    decode_greeting,
    decode_ok,
    encode,
    payload,
)
from ._errors import ProtocolError, UpstreamProtocolError
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
from ._parsers import ClientParser, ServerParser
from ._wire import frame, header

__all__ = [
    "AuthData",
    "AuthMoreData",
    "AuthSwitchRequest",
    "ClientMessage",
    "ClientParser",
    "EofPacket",
    "ErrPacket",
    "HandshakeResponse41",
    "HandshakeV10",
    "OkPacket",
    "ProtocolError",
    "SSLRequest",
    "ServerMessage",
    "ServerParser",
    "UpstreamProtocolError",
    "decode_auth_reply",
    "decode_client_hello",
    "decode_eof",
    "decode_err",
    "decode_greeting",
    "decode_ok",
    "encode",
    "frame",
    "header",
    "payload",
]
