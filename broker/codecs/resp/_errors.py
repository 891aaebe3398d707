"""Protocol errors, split by who sent the malformed bytes."""

from broker.errors import ProtocolViolation, UpstreamError


class ProtocolError(ProtocolViolation):
    """The Redis client sent bytes that break RESP (raised by CommandScanner)."""


class UpstreamProtocolError(UpstreamError):
    """The Redis server sent bytes that break RESP (raised by ReplyParser)."""
