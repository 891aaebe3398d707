"""MySQL client/server protocol numbers and the codec's limits.

Names follow the MySQL source (include/mysql_com.h) and MariaDB's; every limit says why.
"""

# Capability flags (HandshakeV10 and HandshakeResponse41).
CLIENT_LONG_PASSWORD = 1 << 0  # MariaDB reads this bit as CLIENT_MYSQL
CLIENT_FOUND_ROWS = 1 << 1
CLIENT_LONG_FLAG = 1 << 2
CLIENT_CONNECT_WITH_DB = 1 << 3
CLIENT_NO_SCHEMA = 1 << 4
CLIENT_COMPRESS = 1 << 5
CLIENT_ODBC = 1 << 6
CLIENT_LOCAL_FILES = 1 << 7
CLIENT_IGNORE_SPACE = 1 << 8
CLIENT_PROTOCOL_41 = 1 << 9
CLIENT_INTERACTIVE = 1 << 10
CLIENT_SSL = 1 << 11
CLIENT_IGNORE_SIGPIPE = 1 << 12
CLIENT_TRANSACTIONS = 1 << 13
CLIENT_RESERVED = 1 << 14
CLIENT_SECURE_CONNECTION = 1 << 15
CLIENT_MULTI_STATEMENTS = 1 << 16
CLIENT_MULTI_RESULTS = 1 << 17
CLIENT_PS_MULTI_RESULTS = 1 << 18
CLIENT_PLUGIN_AUTH = 1 << 19
CLIENT_CONNECT_ATTRS = 1 << 20
CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA = 1 << 21
CLIENT_CAN_HANDLE_EXPIRED_PASSWORDS = 1 << 22
CLIENT_SESSION_TRACK = 1 << 23
CLIENT_DEPRECATE_EOF = 1 << 24
CLIENT_OPTIONAL_RESULTSET_METADATA = 1 << 25
CLIENT_ZSTD_COMPRESSION_ALGORITHM = 1 << 26
CLIENT_QUERY_ATTRIBUTES = 1 << 27
CLIENT_SSL_VERIFY_SERVER_CERT = 1 << 30
CLIENT_REMEMBER_OPTIONS = 1 << 31

# Server status flags.
SERVER_STATUS_AUTOCOMMIT = 0x0002

# Packet headers in the connection phase.
OK_HEADER = 0x00
AUTH_MORE_DATA_HEADER = 0x01
EOF_HEADER = 0xFE  # also AuthSwitchRequest during authentication
ERR_HEADER = 0xFF
PROTOCOL_VERSION_10 = 10

# Commands (the first payload byte of a command packet).
COM_QUIT = 0x01
COM_INIT_DB = 0x02
COM_QUERY = 0x03
COM_CHANGE_USER = 0x11
COM_STMT_PREPARE = 0x16
COM_RESET_CONNECTION = 0x1F

# caching_sha2_password's AuthMoreData codes.
CACHING_SHA2_REQUEST_PUBLIC_KEY = 0x02
CACHING_SHA2_FAST_AUTH_SUCCESS = 0x03
CACHING_SHA2_PERFORM_FULL_AUTH = 0x04

# Character sets: utf8mb4_general_ci, which MariaDB and MySQL both have.
UTF8MB4_GENERAL_CI = 45

HEADER_LENGTH = 4
# A payload of this length (2^24 - 1) continues in the next packet.
MAX_PAYLOAD = 0xFFFFFF
# Length of an SSLRequest payload (flags, max packet, charset, 23 filler bytes).
SSL_REQUEST_LENGTH = 32
# The connection phase carries small packets: a greeting is ~100 bytes, a response with
# connection attributes a few hundred, an RSA public key ~450. MySQL caps connect
# attributes at 64 KiB; past that the peer is not a MySQL client or server.
MAX_HANDSHAKE_PACKET = 64 * 1024 + 1024
# MySQL and MariaDB scrambles are 20 bytes; ed25519's is 32.
MAX_SCRAMBLE = 64
# A user, database or plugin name is at most a few hundred bytes (identifiers are 64
# characters, 4 bytes each at most).
MAX_NAME = 1024
