"""A shallow error tree, split by who is at fault.

Foreign exceptions (hvac, ssl, OSError, ...) are translated into these once, at the boundary
where they are caught. Messages never contain a secret value.
"""


class SidekeyError(Exception):
    """Base of every error Sidekey raises on purpose."""


class ConfigError(SidekeyError):
    """The operator's configuration is wrong; the message names the located key."""


class ClientError(SidekeyError):
    """The calling workload is at fault: no/untrusted/invalid identity, protocol violation."""


class TlsRefused(ClientError):
    """The broker refused the client's TLS handshake and told it with an alert (an untrusted,
    expired or missing certificate, a TLS version it does not accept): a caller with no
    proven identity, audited as a denial. A client that breaks off its own handshake (a port
    probe, a health check that only connects) raises plain ClientError."""


class ProtocolViolation(ClientError):
    """The client sent bytes that break its protocol (raised by a codec's parser)."""


class UpstreamError(SidekeyError):
    """The upstream (database, API) is down, slow, or refused our credential."""


class UpstreamTimeout(UpstreamError):
    """The upstream did not answer in time."""


class CredentialUnavailable(SidekeyError):
    """The vault (or other credential source) could not produce a credential; fail closed."""
