"""RESP2/RESP3 codec (Redis, Valkey): sans-IO, bytes in, values out.

Only what the broker needs: `CommandScanner` finds every command boundary in what a client
sends, exactly as Redis's own request parser does, and yields the watched ones (AUTH, HELLO,
RESET) whole so the adapter can rewrite them; everything else streams through. `ReplyParser`
reads the server's replies during login. `encode_command` and `encode` build the broker's
commands and replies.
"""

from ._commands import CommandScanner, Segment, split_args, strict_int
from ._constants import (
    MAX_BULK_LENGTH,
    MAX_COMMAND_ARGS,
    MAX_HEADER_LINE,
    MAX_INLINE_BYTES,
    MAX_REPLY_BULK,
    MAX_REPLY_DEPTH,
    MAX_REPLY_ITEMS,
    MAX_WATCHED_COMMAND_BYTES,
    MAX_WATCHED_NAME,
)
from ._errors import ProtocolError, UpstreamProtocolError
from ._messages import (
    Array,
    BigNumber,
    Boolean,
    BulkString,
    Command,
    Double,
    ErrorReply,
    Integer,
    Map,
    Null,
    Reply,
    SimpleString,
    VerbatimString,
)
from ._replies import ReplyParser
from ._writers import encode, encode_command

__all__ = [
    "MAX_BULK_LENGTH",
    "MAX_COMMAND_ARGS",
    "MAX_HEADER_LINE",
    "MAX_INLINE_BYTES",
    "MAX_REPLY_BULK",
    "MAX_REPLY_DEPTH",
    "MAX_REPLY_ITEMS",
    "MAX_WATCHED_COMMAND_BYTES",
    "MAX_WATCHED_NAME",
    "Array",
    "BigNumber",
    "Boolean",
    "BulkString",
    "Command",
    "CommandScanner",
    "Double",
    "ErrorReply",
    "Integer",
    "Map",
    "Null",
    "ProtocolError",
    "Reply",
    "ReplyParser",
    "Segment",
    "SimpleString",
    "UpstreamProtocolError",
    "VerbatimString",
    "encode",
    "encode_command",
    "split_args",
    "strict_int",
]
