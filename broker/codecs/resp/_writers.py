"""Bytes from values: commands for the server, and the broker's own replies to the client."""

from __future__ import annotations

from ._messages import ErrorReply, SimpleString


def encode_command(*args: bytes | str) -> bytes:
    """A command as a RESP array of bulk strings (what every client sends)."""
    out = bytearray(b"*%d\r\n" % len(args))
    for arg in args:
        data = arg.encode() if isinstance(arg, str) else arg
        out += b"$%d\r\n" % len(data)
        out += data
        out += b"\r\n"
    return bytes(out)


def encode(reply: ErrorReply | SimpleString) -> bytes:
    """One of the broker's own replies. A simple string or error cannot hold CR or LF; they
    become spaces, so no text can end the reply early and inject another."""
    text = reply.message if isinstance(reply, ErrorReply) else reply.value
    line = text.replace("\r", " ").replace("\n", " ").encode("utf-8", "replace")
    return (b"-" if isinstance(reply, ErrorReply) else b"+") + line + b"\r\n"
