"""RESP values: the client's commands and the server's replies (RESP2 and RESP3).

Frozen, slotted dataclasses. Only what the broker reads is modelled: a command is its
arguments; a reply is one of the RESP2/RESP3 types, aggregates holding replies.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Command:
    """A complete client command the scanner was asked to watch, with its raw bytes."""

    args: tuple[bytes, ...]
    raw: bytes
    inline: bool = False

    @property
    def name(self) -> bytes:
        """The command name, lower-cased (Redis matches it case-insensitively)."""
        return self.args[0].lower() if self.args else b""


@dataclass(frozen=True, slots=True)
class SimpleString:
    value: str


@dataclass(frozen=True, slots=True)
class ErrorReply:
    """``-CODE message``; `code` is the first word (ERR, WRONGPASS, NOAUTH...)."""

    message: str

    @property
    def code(self) -> str:
        return self.message.split(" ", 1)[0]


@dataclass(frozen=True, slots=True)
class Integer:
    value: int


@dataclass(frozen=True, slots=True)
class BulkString:
    """``$``; None is RESP2's null bulk ($-1)."""

    value: bytes | None


@dataclass(frozen=True, slots=True)
class Array:
    """``*`` (and RESP3's ``~`` set and ``>`` push, told apart by `kind`); None is $-1's
    array twin (*-1)."""

    items: tuple[Reply, ...] | None
    kind: str = "*"


@dataclass(frozen=True, slots=True)
class Map:
    """RESP3 ``%``: key/value pairs in order."""

    pairs: tuple[tuple[Reply, Reply], ...]


@dataclass(frozen=True, slots=True)
class Null:
    """RESP3 ``_``."""


@dataclass(frozen=True, slots=True)
class Boolean:
    value: bool


@dataclass(frozen=True, slots=True)
class Double:
    """RESP3 ``,``, kept as its text (inf, -inf, nan included)."""

    text: str


@dataclass(frozen=True, slots=True)
class BigNumber:
    value: int


@dataclass(frozen=True, slots=True)
class VerbatimString:
    """RESP3 ``=``: a three-letter format (txt, mkd) and the text."""

    format: str
    value: bytes


Reply = (
    SimpleString
    | ErrorReply
    | Integer
    | BulkString
    | Array
    | Map
    | Null
    | Boolean
    | Double
    | BigNumber
    | VerbatimString
)
