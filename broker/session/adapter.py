"""The adapter interface and the adapter registry.

An adapter knows one upstream protocol. The runtime gives it a `ServiceContext`
(`broker.session.context`) holding everything the core provides for its service. A TCP
protocol subclasses `broker.session.lifecycle.TcpAdapter`, which walks the session life cycle
and asks the adapter only for its protocol's steps; HTTP subclasses `Adapter` directly and
uses the context's shared steps per request. Adapters are found by name through the
``sidekey.adapters`` entry point group, so the core never imports one.
"""

from __future__ import annotations

import abc
from importlib.metadata import entry_points
from typing import Any

from broker.errors import ConfigError

from .context import ServiceContext

ENTRY_POINT_GROUP = "sidekey.adapters"


class Adapter(abc.ABC):
    """One service's listener and protocol logic.

    `__init__` parses the adapter's own config (`service.upstream`, `service.inject`) with
    `broker.config.Section` and raises located ConfigErrors; it does no IO, so
    `sidekey check` can construct adapters to validate a config. `start()` binds.
    """

    # ALPN protocol names the service's TLS serving context offers (PostgreSQL's direct TLS
    # requires "postgresql"); none by default.
    tls_alpn: tuple[str, ...] = ()

    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx

    @abc.abstractmethod
    async def start(self) -> None:
        """Bind the listener and begin serving."""

    @property
    @abc.abstractmethod
    def address(self) -> str:
        """The address actually bound (``host:port`` or ``unix:path``), after start()."""

    @abc.abstractmethod
    async def stop(self, drain_timeout: float) -> None:
        """Stop accepting, let in-flight work finish for up to `drain_timeout`, then cancel."""

    def describe_pool(self) -> dict[str, Any] | None:
        """The upstream session pool (`pool:`) as /inventory shows it; None without one."""
        return None

    def take_over(self, previous: Adapter) -> None:
        """A reload rebuilt this adapter's service: `previous` stops accepting, and its open
        sessions drain on it while this one serves the listener. Take over what the listener
        must go on answering for those sessions (PostgreSQL: their cancel requests). Most
        protocols have nothing of the kind."""
        return None

    async def sibling_request(
        self, topic: str, fields: dict[str, Any], sender: int | None
    ) -> dict[str, Any] | None:
        """Answer a request another worker of `workers: N` sent for this service
        (`broker.session.siblings`, `ctx.siblings.ask`), from `sender` (its number); None:
        this adapter has no such topic. Raise ValueError for malformed fields."""
        return None


def load_adapter(name: str, where: str = "adapter") -> type[Adapter]:
    """Find an adapter class by its registered name."""
    found = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
    if name not in found:
        known = ", ".join(sorted(found)) or "none installed"
        raise ConfigError(f"{where}: unknown adapter {name!r} (known: {known})")
    cls = found[name].load()
    if not (isinstance(cls, type) and issubclass(cls, Adapter)):
        raise ConfigError(f"{where}: entry point {name!r} is not a Sidekey adapter")
    return cls
