"""Wire constants and limits of the PostgreSQL startup/authentication phase.

Numbers are from the PostgreSQL frontend/backend protocol ("Message Formats") and from the
server and libpq sources, named the same way where they have a name there.
"""

from typing import Final


def make_protocol_version(major: int, minor: int) -> int:
    """The Int32 a StartupMessage carries: major in the high 16 bits, minor in the low 16."""
    return (major << 16) | minor


PROTOCOL_VERSION_3_0: Final = make_protocol_version(3, 0)
# Protocol 3.2 (PostgreSQL 18) brought variable-length cancel keys. 3.1 was never used.
PROTOCOL_VERSION_3_2: Final = make_protocol_version(3, 2)
# The only major version still spoken: servers refuse 2.0 since PostgreSQL 14.
SUPPORTED_PROTOCOL_MAJOR: Final = 3

# Special "protocol versions" that mark the untyped request packets (pqcomm.h).
CANCEL_REQUEST_CODE: Final = make_protocol_version(1234, 5678)
SSL_REQUEST_CODE: Final = make_protocol_version(1234, 5679)
GSSENC_REQUEST_CODE: Final = make_protocol_version(1234, 5680)
# Every code with this major is a request, not a protocol version.
REQUEST_CODE_MAJOR: Final = 1234

# Untyped packets: Int32 length (counting itself) + Int32 code.
STARTUP_HEADER_LENGTH: Final = 4
# Smallest untyped packet: the length word plus the code (the server's own check).
MIN_STARTUP_PACKET_LENGTH: Final = 8
# The server's limit on an untyped startup packet, not counting the length word
# (MAX_STARTUP_PACKET_LENGTH in pqcomm.h, checked in ProcessStartupPacket).
MAX_STARTUP_PACKET_LENGTH: Final = 10000

# Typed messages: Byte1 type + Int32 length (counting itself, not the type byte).
TYPED_HEADER_LENGTH: Final = 5
# The length word counts itself, so anything below 4 is impossible.
MIN_TYPED_LENGTH: Final = 4
# Cap on a typed message body in the startup/auth phase. Nothing legitimate there is large:
# SCRAM messages are a few hundred bytes, the server itself refuses password/SASL packets
# over 65535 bytes (PG_MAX_AUTH_TOKEN_LENGTH), and libpq treats any non-data message over
# 30000 bytes as lost sync (a JWT-SVID sent as a password fits easily). 1 MiB leaves room for
# a long ErrorResponse while bounding what one connection can make us buffer.
MAX_AUTH_MESSAGE_LENGTH: Final = 1024 * 1024

# Cancel keys: exactly 4 bytes in protocol 3.0; 4..256 bytes from 3.2 (PostgreSQL 18 sends
# 32; the protocol documentation fixes the minimum and maximum).
MIN_CANCEL_KEY_LENGTH: Final = 4
MAX_CANCEL_KEY_LENGTH: Final = 256

# AuthenticationMD5Password carries a 4-byte salt.
MD5_SALT_LENGTH: Final = 4

# A SQLSTATE is five characters of [0-9A-Z] (errcodes.txt).
SQLSTATE_LENGTH: Final = 5

# Largest values of the protocol's unsigned/signed 32-bit integers.
UINT32_MAX: Final = 0xFFFF_FFFF
INT32_MAX: Final = 0x7FFF_FFFF

# Authentication request codes (the Int32 after 'R').
AUTH_OK: Final = 0
AUTH_KERBEROS_V5: Final = 2
AUTH_CLEARTEXT_PASSWORD: Final = 3
AUTH_MD5_PASSWORD: Final = 5
AUTH_GSS: Final = 7
AUTH_GSS_CONTINUE: Final = 8
AUTH_SSPI: Final = 9
AUTH_SASL: Final = 10
AUTH_SASL_CONTINUE: Final = 11
AUTH_SASL_FINAL: Final = 12
