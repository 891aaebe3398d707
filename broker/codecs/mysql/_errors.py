"""Protocol errors, split by who sent the malformed bytes."""

from broker.errors import ProtocolViolation, UpstreamError


class ProtocolError(ProtocolViolation):
    """The MySQL client sent bytes that break the protocol (raised by ClientParser)."""


class UpstreamProtocolError(UpstreamError):
    """The MySQL server sent bytes that break the protocol (raised by ServerParser)."""


class Malformed(Exception):
    """Internal: a payload decoder found malformed bytes; the parser re-raises it with blame."""
