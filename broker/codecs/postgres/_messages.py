"""Wire messages of the PostgreSQL startup/authentication phase.

Every message is a frozen, slotted dataclass. Construction validates what the protocol
requires, so a message that exists can always be encoded: building an invalid one is a bug in
our own code and raises ValueError or TypeError. Fields that carry secrets (passwords, SASL
proofs, cancel keys) are left out of ``repr`` so that a logged message never leaks one.
"""

from dataclasses import dataclass, field
from typing import Self

from ._constants import (
    AUTH_CLEARTEXT_PASSWORD,
    AUTH_MD5_PASSWORD,
    AUTH_OK,
    AUTH_SASL,
    AUTH_SASL_CONTINUE,
    AUTH_SASL_FINAL,
    INT32_MAX,
    MAX_CANCEL_KEY_LENGTH,
    MD5_SALT_LENGTH,
    MIN_CANCEL_KEY_LENGTH,
    SQLSTATE_LENGTH,
    SUPPORTED_PROTOCOL_MAJOR,
    UINT32_MAX,
)

# Auth codes that have a message class of their own; AuthenticationOther must not use them,
# so that every message has exactly one encoding and every encoding one message.
_DEDICATED_AUTH_CODES = frozenset(
    {
        AUTH_OK,
        AUTH_CLEARTEXT_PASSWORD,
        AUTH_MD5_PASSWORD,
        AUTH_SASL,
        AUTH_SASL_CONTINUE,
        AUTH_SASL_FINAL,
    }
)
_READY_STATUSES = frozenset("ITE")
_SQLSTATE_CHARS = frozenset("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ")


def _check_cstring(value: str, what: str) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{what} must be str, got {type(value).__name__}")
    if "\0" in value:
        raise ValueError(f"{what} must not contain NUL")


def _check_bytes(value: bytes, what: str) -> None:
    if not isinstance(value, bytes):
        raise TypeError(f"{what} must be bytes, got {type(value).__name__}")


def _check_uint32(value: int, what: str) -> None:
    if not 0 <= value <= UINT32_MAX:
        raise ValueError(f"{what} must fit an unsigned 32-bit integer, got {value}")


def _check_cancel_key(key: bytes) -> None:
    _check_bytes(key, "secret_key")
    if not MIN_CANCEL_KEY_LENGTH <= len(key) <= MAX_CANCEL_KEY_LENGTH:
        raise ValueError(
            f"secret_key must be {MIN_CANCEL_KEY_LENGTH}..{MAX_CANCEL_KEY_LENGTH} bytes, "
            f"got {len(key)}"
        )


# --- Frontend (client -> server) -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SSLRequest:
    """Untyped request to switch the connection to TLS; answered by SSLAnswer."""


@dataclass(frozen=True, slots=True)
class GSSENCRequest:
    """Untyped request for GSSAPI encryption; answered by GSSENCAnswer (the broker says no)."""


@dataclass(frozen=True, slots=True)
class CancelRequest:
    """Untyped request, on a fresh connection, to cancel the query of another backend.

    ``secret_key`` is 4 bytes in protocol 3.0 and 4..256 bytes from protocol 3.2.
    """

    process_id: int
    secret_key: bytes = field(repr=False)

    def __post_init__(self) -> None:
        _check_uint32(self.process_id, "process_id")
        _check_cancel_key(self.secret_key)


@dataclass(frozen=True, slots=True)
class StartupMessage:
    """The untyped first packet of a session: protocol version and parameters, in order.

    A parameter name appears at most once and ``user`` is required and non-empty (the server
    refuses a startup packet without it).
    """

    protocol_version: int
    parameters: tuple[tuple[str, str], ...]

    def __post_init__(self) -> None:
        _check_uint32(self.protocol_version, "protocol_version")
        if self.protocol_version >> 16 != SUPPORTED_PROTOCOL_MAJOR:
            raise ValueError(
                f"protocol_version must be 3.x, got {self.protocol_major}.{self.protocol_minor}"
            )
        if not isinstance(self.parameters, tuple):
            raise TypeError("parameters must be a tuple of (name, value) tuples")
        seen: set[str] = set()
        for pair in self.parameters:
            if not isinstance(pair, tuple) or len(pair) != 2:
                raise TypeError("parameters must be a tuple of (name, value) tuples")
            name, value = pair
            _check_cstring(name, "parameter name")
            _check_cstring(value, f"value of parameter {name!r}")
            if not name:
                # An empty name is the packet's terminator on the wire.
                raise ValueError("parameter names must not be empty")
            if name in seen:
                raise ValueError(f"parameter {name!r} is given twice")
            seen.add(name)
        if not self.get("user"):
            raise ValueError("a StartupMessage needs a non-empty 'user' parameter")

    @property
    def protocol_major(self) -> int:
        return self.protocol_version >> 16

    @property
    def protocol_minor(self) -> int:
        return self.protocol_version & 0xFFFF

    def get(self, name: str, default: str | None = None) -> str | None:
        """The value of parameter ``name``, or ``default`` when the client did not send it."""
        for key, value in self.parameters:
            if key == name:
                return value
        return default

    @property
    def user(self) -> str:
        return self.get("user") or ""  # never empty: __post_init__ requires it

    @property
    def database(self) -> str:
        """The database asked for; like the server, it defaults to the user name."""
        return self.get("database") or self.user


@dataclass(frozen=True, slots=True)
class PasswordMessage:
    """'p' carrying a password: cleartext, or the md5 hash from md5_password()."""

    password: bytes = field(repr=False)

    def __post_init__(self) -> None:
        _check_bytes(self.password, "password")
        if b"\0" in self.password:
            raise ValueError("password must not contain NUL")


@dataclass(frozen=True, slots=True)
class SASLInitialResponse:
    """'p' answering AuthenticationSASL: the chosen mechanism and its first message.

    ``data`` is None when the mechanism has no initial response (sent as length -1).
    """

    mechanism: str
    data: bytes | None = field(repr=False)

    def __post_init__(self) -> None:
        _check_cstring(self.mechanism, "mechanism")
        if not self.mechanism:
            raise ValueError("mechanism must not be empty")
        if self.data is not None:
            _check_bytes(self.data, "data")
            if len(self.data) > INT32_MAX:
                raise ValueError("data is too long for an Int32 length")


@dataclass(frozen=True, slots=True)
class SASLResponse:
    """'p' answering AuthenticationSASLContinue: the next mechanism message, as is."""

    data: bytes = field(repr=False)

    def __post_init__(self) -> None:
        _check_bytes(self.data, "data")


@dataclass(frozen=True, slots=True)
class Terminate:
    """'X': the client closes the session."""


# --- Backend (server -> client) --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SSLAnswer:
    """The single byte answering an SSLRequest: 'S' (go ahead with TLS) or 'N'."""

    accepted: bool


@dataclass(frozen=True, slots=True)
class GSSENCAnswer:
    """The single byte answering a GSSENCRequest: 'G' (go ahead) or 'N'."""

    accepted: bool


@dataclass(frozen=True, slots=True)
class AuthenticationOk:
    """'R' code 0: authentication succeeded."""


@dataclass(frozen=True, slots=True)
class AuthenticationCleartextPassword:
    """'R' code 3: send the password in clear (only ever over TLS)."""


@dataclass(frozen=True, slots=True)
class AuthenticationMD5Password:
    """'R' code 5: send md5_password(user, password, salt)."""

    salt: bytes

    def __post_init__(self) -> None:
        _check_bytes(self.salt, "salt")
        if len(self.salt) != MD5_SALT_LENGTH:
            raise ValueError(f"salt must be {MD5_SALT_LENGTH} bytes, got {len(self.salt)}")


@dataclass(frozen=True, slots=True)
class AuthenticationSASL:
    """'R' code 10: start SASL with one of ``mechanisms``, in the server's order of preference."""

    mechanisms: tuple[str, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.mechanisms, tuple):
            raise TypeError("mechanisms must be a tuple of str")
        if not self.mechanisms:
            raise ValueError("AuthenticationSASL needs at least one mechanism")
        for mechanism in self.mechanisms:
            _check_cstring(mechanism, "mechanism")
            if not mechanism:
                # An empty name is the list's terminator on the wire.
                raise ValueError("mechanism names must not be empty")


@dataclass(frozen=True, slots=True)
class AuthenticationSASLContinue:
    """'R' code 11: the next server message of the SASL exchange."""

    data: bytes

    def __post_init__(self) -> None:
        _check_bytes(self.data, "data")


@dataclass(frozen=True, slots=True)
class AuthenticationSASLFinal:
    """'R' code 12: the server's last SASL message (SCRAM: its signature)."""

    data: bytes

    def __post_init__(self) -> None:
        _check_bytes(self.data, "data")


@dataclass(frozen=True, slots=True)
class AuthenticationOther:
    """'R' with any other code (Kerberos 2, GSS 7/8, SSPI 9, ...): the broker refuses these."""

    code: int
    data: bytes

    def __post_init__(self) -> None:
        _check_uint32(self.code, "code")
        if self.code in _DEDICATED_AUTH_CODES:
            raise ValueError(f"auth code {self.code} has its own message class")
        _check_bytes(self.data, "data")


@dataclass(frozen=True, slots=True)
class ParameterStatus:
    """'S': the server reports the value of a run-time parameter."""

    name: str
    value: str

    def __post_init__(self) -> None:
        _check_cstring(self.name, "name")
        _check_cstring(self.value, "value")


@dataclass(frozen=True, slots=True)
class BackendKeyData:
    """'K': the key the client needs to cancel queries on this session."""

    process_id: int
    secret_key: bytes = field(repr=False)

    def __post_init__(self) -> None:
        _check_uint32(self.process_id, "process_id")
        _check_cancel_key(self.secret_key)


@dataclass(frozen=True, slots=True)
class ReadyForQuery:
    """'Z': the session is ready; ``status`` is 'I' (idle), 'T' (in transaction) or 'E'."""

    status: str

    def __post_init__(self) -> None:
        if self.status not in _READY_STATUSES:
            raise ValueError(f"status must be one of 'I', 'T', 'E', got {self.status!r}")


class _Fields:
    """Helpers shared by ErrorResponse and NoticeResponse."""

    __slots__ = ()
    fields: tuple[tuple[str, str], ...]

    def _validate_fields(self) -> None:
        if not isinstance(self.fields, tuple):
            raise TypeError("fields must be a tuple of (code, value) tuples")
        for pair in self.fields:
            if not isinstance(pair, tuple) or len(pair) != 2:
                raise TypeError("fields must be a tuple of (code, value) tuples")
            code, value = pair
            if not isinstance(code, str) or len(code) != 1 or not 0 < ord(code) < 256:
                raise ValueError(f"a field code must be one non-NUL Latin-1 char, got {code!r}")
            _check_cstring(value, f"field {code!r}")

    def get(self, code: str, default: str | None = None) -> str | None:
        """The value of the first field with ``code`` (e.g. 'D' detail, 'H' hint)."""
        for key, value in self.fields:
            if key == code:
                return value
        return default

    @property
    def severity(self) -> str | None:
        """The non-localized severity (V, PostgreSQL 9.6+), else the localized one (S)."""
        return self.get("V") or self.get("S")

    @property
    def sqlstate(self) -> str | None:
        return self.get("C")

    @property
    def message(self) -> str | None:
        return self.get("M")

    @classmethod
    def make(
        cls,
        severity: str,
        sqlstate: str,
        message: str,
        detail: str | None = None,
        hint: str | None = None,
    ) -> Self:
        """Build the fields a server sends: S and V (severity), C, M, then D and H if given."""
        if (
            not isinstance(sqlstate, str)
            or len(sqlstate) != SQLSTATE_LENGTH
            or not set(sqlstate) <= _SQLSTATE_CHARS
        ):
            raise ValueError(f"sqlstate must be five characters of [0-9A-Z], got {sqlstate!r}")
        # The texts are the broker's own words, but they may quote what a peer sent (a
        # certificate's URI, a database name): a NUL would end the field early on the wire,
        # so it is written as \x00 rather than refused while replying.
        fields = [
            ("S", severity),
            ("V", severity),
            ("C", sqlstate),
            ("M", message.replace("\0", "\\x00")),
        ]
        if detail is not None:
            fields.append(("D", detail.replace("\0", "\\x00")))
        if hint is not None:
            fields.append(("H", hint.replace("\0", "\\x00")))
        return cls(tuple(fields))  # type: ignore[call-arg]


@dataclass(frozen=True, slots=True)
class ErrorResponse(_Fields):
    """'E': an error, as (field code, value) pairs in wire order."""

    fields: tuple[tuple[str, str], ...]

    def __post_init__(self) -> None:
        self._validate_fields()


@dataclass(frozen=True, slots=True)
class NoticeResponse(_Fields):
    """'N': a notice, as (field code, value) pairs in wire order."""

    fields: tuple[tuple[str, str], ...]

    def __post_init__(self) -> None:
        self._validate_fields()


@dataclass(frozen=True, slots=True)
class NegotiateProtocolVersion:
    """'v': the server speaks an older minor version and/or ignored some ``_pq_.`` options.

    The documentation calls the Int32 the "newest minor protocol version", but servers (and
    libpq, which compares it with a full version) put the whole version number there: 196608
    for 3.0. ``newest_version`` is that Int32 as sent; ``newest_minor`` is its minor part.
    """

    newest_version: int
    unrecognized_options: tuple[str, ...]

    def __post_init__(self) -> None:
        _check_uint32(self.newest_version, "newest_version")
        if not isinstance(self.unrecognized_options, tuple):
            raise TypeError("unrecognized_options must be a tuple of str")
        for option in self.unrecognized_options:
            _check_cstring(option, "option")

    @property
    def newest_minor(self) -> int:
        return self.newest_version & 0xFFFF


# --- Either direction ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Unknown:
    """Any typed message this codec does not interpret, framed and passed on as is."""

    type: bytes
    payload: bytes

    def __post_init__(self) -> None:
        _check_bytes(self.type, "type")
        _check_bytes(self.payload, "payload")
        if len(self.type) != 1:
            raise ValueError(f"type must be a single byte, got {self.type!r}")


FrontendMessage = (
    SSLRequest
    | GSSENCRequest
    | CancelRequest
    | StartupMessage
    | PasswordMessage
    | SASLInitialResponse
    | SASLResponse
    | Terminate
    | Unknown
)
BackendMessage = (
    SSLAnswer
    | GSSENCAnswer
    | AuthenticationOk
    | AuthenticationCleartextPassword
    | AuthenticationMD5Password
    | AuthenticationSASL
    | AuthenticationSASLContinue
    | AuthenticationSASLFinal
    | AuthenticationOther
    | ParameterStatus
    | BackendKeyData
    | ReadyForQuery
    | ErrorResponse
    | NoticeResponse
    | NegotiateProtocolVersion
    | Unknown
)
Message = FrontendMessage | BackendMessage
# The message classes a 'p' from the client may be read as (FrontendParser.expect_password).
PasswordKind = type[PasswordMessage] | type[SASLInitialResponse] | type[SASLResponse]
