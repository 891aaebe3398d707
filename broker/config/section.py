"""The located config reader every section is parsed with, and listen addresses.

`Section` reads one mapping of the YAML file, records which keys were consumed, and names
every error by its path (``services[1].upstream.url: ...``). Adapters parse their own
sections (`upstream`, `inject`) with it too.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from broker.errors import ConfigError

_MISSING: Any = object()


class Section:
    """A located, read-once view of one mapping in the config.

    Every accessor records the key it consumed; `finish()` rejects the keys nobody asked
    for, so a typo is an error rather than a silently ignored setting.
    """

    def __init__(self, raw: object, where: str) -> None:
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{where}: must be a mapping, got {_kind(raw)}")
        self._raw: Mapping[Any, Any] = raw
        self.where = where
        self._seen: set[str] = set()

    def at(self, key: str) -> str:
        """The located name of `key`, for error messages."""
        return f"{self.where}.{key}" if self.where else key

    def has(self, key: str) -> bool:
        return key in self._raw

    def raw(self, key: str, default: Any = _MISSING) -> Any:
        self._seen.add(key)
        if key in self._raw:
            return self._raw[key]
        if default is _MISSING:
            raise ConfigError(f"{self.at(key)}: required")
        return default

    def text(self, key: str, default: Any = _MISSING) -> Any:
        value = self.raw(key, default)
        if value is default and default is not _MISSING:
            return value
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{self.at(key)}: must be a non-empty string, got {_kind(value)}")
        return value

    def choice(self, key: str, options: tuple[str, ...], default: Any = _MISSING) -> Any:
        value = self.text(key, default)
        if value not in options and not (value is default and default is not _MISSING):
            raise ConfigError(f"{self.at(key)}: must be one of {', '.join(options)}, got {value!r}")
        return value

    def integer(self, key: str, low: int, high: int, default: Any = _MISSING) -> Any:
        value = self.raw(key, default)
        if value is default and default is not _MISSING:
            return value
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ConfigError(f"{self.at(key)}: must be an integer {low}-{high}, got {value!r}")
        return value

    def number(self, key: str, low: float, high: float, default: Any = _MISSING) -> Any:
        value = self.raw(key, default)
        if value is default and default is not _MISSING:
            return value
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not low <= value <= high
        ):
            raise ConfigError(f"{self.at(key)}: must be a number {low}-{high}, got {value!r}")
        return float(value)

    def boolean(self, key: str, default: Any = _MISSING) -> Any:
        value = self.raw(key, default)
        if not isinstance(value, bool):
            raise ConfigError(f"{self.at(key)}: must be true or false, got {value!r}")
        return value

    def strings(self, key: str, default: Any = _MISSING) -> Any:
        """A list of non-empty strings; a single string is accepted as a list of one."""
        value = self.raw(key, default)
        if value is default and default is not _MISSING:
            return value
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise ConfigError(f"{self.at(key)}: must be a list of strings, got {_kind(value)}")
        return tuple(value)

    def string_map(self, key: str, default: Any = _MISSING) -> Any:
        """A mapping of string to string (header templates, field-to-variable maps)."""
        value = self.raw(key, default)
        if value is default and default is not _MISSING:
            return value
        if not isinstance(value, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            raise ConfigError(f"{self.at(key)}: must be a mapping of strings to strings")
        return MappingProxyType(dict(value))

    def path(self, key: str, base: Path, default: Any = _MISSING, must_exist: bool = True) -> Any:
        """A file path, relative to the config file's directory; must exist unless told."""
        value = self.text(key, default)
        if value is default and default is not _MISSING:
            return value
        resolved = (base / value).resolve()
        if must_exist and not resolved.is_file():
            raise ConfigError(f"{self.at(key)}: file not found: {resolved}")
        return resolved

    def section(self, key: str, default: Any = _MISSING) -> Section:
        value = self.raw(key, default)
        return Section({} if value is None else value, self.at(key))

    def sections(self, key: str) -> Iterator[Section]:
        value = self.raw(key)
        if not isinstance(value, list) or not value:
            raise ConfigError(f"{self.at(key)}: must be a non-empty list")
        for i, item in enumerate(value):
            yield Section(item, f"{self.at(key)}[{i}]" if self.where else f"{key}[{i}]")

    def frozen(self, key: str) -> Mapping[str, Any]:
        """The raw mapping under `key`, read-only, for an adapter to parse with `Section`."""
        value = self.raw(key, {})
        if value is None:
            value = {}
        if not isinstance(value, Mapping):
            raise ConfigError(f"{self.at(key)}: must be a mapping, got {_kind(value)}")
        return MappingProxyType(dict(value))

    def finish(self) -> None:
        unknown = sorted(str(k) for k in self._raw if k not in self._seen)
        if unknown:
            raise ConfigError(f"{self.at(unknown[0])}: unknown key")


def _kind(value: object) -> str:
    return "nothing" if value is None else type(value).__name__


@dataclass(frozen=True, slots=True)
class ListenAddress:
    """Where a listener binds: a TCP host and port, or a unix socket path."""

    host: str | None = None
    port: int | None = None
    path: Path | None = None

    def __str__(self) -> str:
        return f"unix:{self.path}" if self.path else f"{self.host}:{self.port}"


def parse_listen(value: str, where: str, base: Path) -> ListenAddress:
    if value.startswith("unix:"):
        return ListenAddress(path=(base / value[5:]).resolve())
    host, sep, port_text = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"{where}: must be HOST:PORT (port 0-65535) or unix:PATH, got {value!r}")
    if host != "localhost":
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ConfigError(f"{where}: host must be an IP address or localhost") from None
    return ListenAddress(host=host, port=int(port_text))
