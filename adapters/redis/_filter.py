"""What the broker does with the client's AUTH, HELLO and RESET once the session is spliced.

Each one is replaced, in place, by a command the server answers the way the client expects,
so replies stay in order however deep the client pipelines:

- ``AUTH [user] password`` becomes ``AUTH <credential user> <credential password>``: the
  server says +OK and the session keeps the broker's user. The client's own user and
  password are never sent anywhere.
- ``HELLO <proto> AUTH user pass [SETNAME name]`` gets the credential in place of the
  client's user and password; the server answers with its usual HELLO reply. ``HELLO``
  without AUTH passes unchanged.
- ``RESET`` would log the connection out to the ``default`` user: it becomes an unknown
  command whose error says why (the only reply that keeps the order without reading the
  server's replies).
"""

from __future__ import annotations

from broker.codecs.resp import Command, CommandScanner, encode_command

WATCHED = frozenset({b"auth", b"hello", b"reset"})
# The name of the stand-in command for a refused one: unknown to Redis, so its error reply
# ("unknown command 'sidekey-refused', with args beginning with: '<why>'") comes in order.
REFUSED_COMMAND = b"sidekey-refused"
RESET_REFUSED = (
    "RESET is refused by the Sidekey broker: it would log the session out of the broker's user"
)


class SessionFilter:
    """The `StreamFilter` of one spliced Redis session."""

    __slots__ = ("_auth", "_password", "_scanner", "_user", "rewritten")

    def __init__(self, user: str, password: str) -> None:
        self._scanner = CommandScanner(WATCHED)
        self._user = user.encode()
        self._password = password.encode()
        self._auth = encode_command(b"AUTH", self._user, self._password)
        # How many of the client's commands were replaced, for the audit trail.
        self.rewritten = 0

    def feed(self, data: bytes) -> tuple[bytes, bytes]:
        segments = self._scanner.feed(data)
        if len(segments) == 1 and segments[0] is data:
            return data, b""  # the common case: nothing watched, nothing held
        out = bytearray()
        for segment in segments:
            if isinstance(segment, bytes):
                out += segment
            else:
                out += self._replace(segment)
        return bytes(out), b""

    def _replace(self, command: Command) -> bytes:
        name, args = command.name, command.args
        if name == b"auth":
            if len(args) not in (2, 3):
                return command.raw  # the server answers the wrong arity itself
            self.rewritten += 1
            return self._auth
        if name == b"hello":
            replaced = hello_with_credential(args, self._user, self._password)
            if replaced is None:
                return command.raw
            self.rewritten += 1
            return encode_command(*replaced)
        self.rewritten += 1
        return encode_command(REFUSED_COMMAND, RESET_REFUSED)


def hello_auth_pairs(args: tuple[bytes, ...]) -> list[int]:
    """Where HELLO's AUTH user/password pairs are (the user's index), read the way Redis's
    helloCommand reads them (it keeps the last)."""
    found = []
    j = 2
    while j < len(args):
        option = args[j].lower()
        more = len(args) - j - 1
        if option == b"auth" and more >= 2:
            found.append(j + 1)
            j += 3
        elif option == b"setname" and more >= 1:
            j += 2
        else:
            break  # Redis answers a syntax error and authenticates no one
    return found


def hello_with_credential(
    args: tuple[bytes, ...], user: bytes, password: bytes
) -> list[bytes] | None:
    """HELLO's arguments with every AUTH pair replaced; None if there is no AUTH."""
    pairs = hello_auth_pairs(args)
    if not pairs:
        return None
    out = list(args)
    for i in pairs:
        out[i], out[i + 1] = user, password
    return out
