"""Protocol errors, split by who sent the malformed bytes."""

from broker.errors import ProtocolViolation, UpstreamError


class ProtocolError(ProtocolViolation):
    """The PostgreSQL client sent bytes that break the protocol (raised by FrontendParser)."""


class UpstreamProtocolError(UpstreamError):
    """The PostgreSQL server sent bytes that break the protocol (raised by BackendParser)."""


class Malformed(Exception):
    """Internal: a payload decoder found malformed bytes; the parser re-raises it with blame."""
