"""Where a TCP adapter's upstream is and how to reach it: address, TLS mode, timeout.

Every TCP adapter reads these keys of its ``upstream`` section with `parse_target`:

```yaml
upstream:
  address: db.internal:3306          # host:port (port defaults to the protocol's)
  tls: {mode: verify-full, ca: certs/db-ca.pem, server_name: db.internal}
  connect_timeout: 5                 # seconds, TCP connect plus TLS handshake
```

The TLS modes are libpq's: ``disable``, ``require`` (encrypted, not verified),
``verify-ca`` (the chain), ``verify-full`` (the chain and the name; the default).
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, Protocol, TypeVar

from broker.config import Section
from broker.errors import ConfigError, UpstreamError, UpstreamTimeout
from broker.identity.tls import client_context
from broker.session.net import Conduit

TLS_MODES = ("disable", "require", "verify-ca", "verify-full")
# Secure unless told otherwise: a weaker default would let an active attacker strip or fake
# TLS and read the credential the broker sends.
DEFAULT_TLS_MODE = "verify-full"
# A reachable server accepts a TCP connection in milliseconds; a few seconds covers a loaded
# or distant one, and the client hears of it before its own driver's timeout.
DEFAULT_CONNECT_TIMEOUT = 5.0
MAX_CONNECT_TIMEOUT = 120.0


@dataclass(frozen=True, slots=True)
class UpstreamTarget:
    host: str
    port: int
    tls_mode: str
    # The context for the upstream TLS handshake; None with mode disable.
    ssl_context: ssl.SSLContext | None = field(repr=False)
    # Sent as SNI and, with verify-full, checked against the server certificate.
    server_name: str
    connect_timeout: float

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_target(section: Section, base: Path, default_port: int) -> UpstreamTarget:
    """Read `address`, `tls` and `connect_timeout` of `section` (the caller finishes it)."""
    host, port = parse_address(section.text("address"), section.at("address"), default_port)
    connect_timeout = section.number(
        "connect_timeout", 0.1, MAX_CONNECT_TIMEOUT, DEFAULT_CONNECT_TIMEOUT
    )
    tls = section.section("tls", {})
    mode = tls.choice("mode", TLS_MODES, DEFAULT_TLS_MODE)
    ca: Path | None = tls.path("ca", base, None)
    server_name: str | None = tls.text("server_name", None)
    if ca is not None and mode in ("disable", "require"):
        raise ConfigError(
            f"{tls.at('ca')}: only used with mode verify-ca or verify-full (mode is {mode})"
        )
    if server_name is not None and mode == "disable":
        raise ConfigError(f"{tls.at('server_name')}: not used with mode disable")
    tls.finish()
    ssl_context: ssl.SSLContext | None = None
    if mode != "disable":
        ssl_context = client_context(verify=mode != "require", ca=ca, where=tls.where)
        if mode == "verify-ca":
            ssl_context.check_hostname = False
    return UpstreamTarget(
        host=host,
        port=port,
        tls_mode=mode,
        ssl_context=ssl_context,
        server_name=server_name or host,
        connect_timeout=connect_timeout,
    )


def parse_address(value: str, where: str, default_port: int) -> tuple[str, int]:
    """``host:port``, ``[v6]:port``, or a host (or bare IPv6 address) with the default port."""
    if value.count(":") > 1 and not value.startswith("["):
        host, port_text = value, str(default_port)
    else:
        host, sep, port_text = value.rpartition(":")
        if not sep:
            host, port_text = value, str(default_port)
    host = host.strip("[]")
    if not host or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ConfigError(f"{where}: must be HOST:PORT (port 1-65535), got {value!r}")
    return host, int(port_text)


Message = TypeVar("Message")
Message_co = TypeVar("Message_co", covariant=True)


class MessageParser(Protocol[Message_co]):
    """What a protocol's sans-IO parser of the server's side offers the login stream."""

    def feed(self, data: bytes) -> None: ...
    def next_message(self) -> Message_co | None: ...
    def leftover(self) -> bytes: ...


class LoginStream(Generic[Message]):
    """An upstream conduit plus the parser reading it during the adapter's login, every
    read bounded by one deadline (`phase` names the step in the timeout's message)."""

    def __init__(
        self,
        conduit: Conduit,
        parser: MessageParser[Message],
        deadline: float,
        where: str,
        phase: str,
    ) -> None:
        self.conduit = conduit
        self.parser = parser
        self.deadline = deadline
        self.where = where
        self.phase = phase

    def remaining(self) -> float:
        left = self.deadline - asyncio.get_running_loop().time()
        if left <= 0:
            raise UpstreamTimeout(f"upstream {self.where}: {self.phase} did not finish in time")
        return left

    async def next(self) -> Message:
        while (message := self.parser.next_message()) is None:
            data = await self.conduit.receive(self.remaining())
            if not data:
                why = f": {self.conduit.error}" if self.conduit.error else ""
                raise UpstreamError(f"upstream {self.where} closed the connection{why}")
            self.parser.feed(data)
        return message
