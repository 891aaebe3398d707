"""Providers: one fetch of one credential, with all its fields, from where the config says.

A fetcher is an async callable returning a fresh `Credential`; caching, single flight and
failing closed are `CachedSource`'s job. Every failure is a `CredentialUnavailable` whose
message names what to fix (a variable, a file, a vault path) and never a value.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from broker.config import CredentialsConfig
from broker.credentials import Credential, CredentialRef
from broker.credentials.vault import VaultClient
from broker.errors import ConfigError, CredentialUnavailable

Fetcher = Callable[[], Awaitable[Credential]]

# A credentials file is a handful of fields; anything bigger is a wrong path.
MAX_CREDENTIAL_FILE_BYTES = 64 * 1024


class VaultKvFetcher:
    """All fields of the latest version of a KV v2 secret, in one read."""

    def __init__(self, vault: VaultClient, mount: str, path: str) -> None:
        self.vault, self.mount, self.path = vault, mount, path

    async def __call__(self) -> Credential:
        fields, version = await self.vault.read_kv(self.mount, self.path)
        return Credential(
            fields=MappingProxyType(fields),
            ref=CredentialRef("vault-kv", f"{self.mount}/{self.path}", version=version),
        )

    def __repr__(self) -> str:
        return f"VaultKvFetcher({self.mount}/{self.path})"


class EnvFetcher:
    """Fields from environment variables (`fields`: field name -> variable name)."""

    def __init__(self, fields: Mapping[str, str], environ: Mapping[str, str] | None = None) -> None:
        self.fields = dict(fields)
        self.environ = os.environ if environ is None else environ

    async def __call__(self) -> Credential:
        values: dict[str, str] = {}
        for name, variable in self.fields.items():
            value = self.environ.get(variable)
            if value is None or value == "":
                raise CredentialUnavailable(
                    f"env: variable {variable} (field {name!r}) is not set or is empty"
                )
            values[name] = value
        return Credential(
            fields=MappingProxyType(values),
            ref=CredentialRef("env", ",".join(sorted(self.fields.values()))),
        )

    def __repr__(self) -> str:
        return f"EnvFetcher({', '.join(sorted(self.fields.values()))})"


class FileFetcher:
    """A YAML or JSON mapping of string fields, re-read on every fetch so rotation works."""

    def __init__(self, path: Path) -> None:
        self.path = path

    async def __call__(self) -> Credential:
        # A small local read, but a slow or network filesystem must not stall the loop.
        fields = await asyncio.to_thread(self._load)
        return Credential(
            fields=MappingProxyType(fields), ref=CredentialRef("file", str(self.path))
        )

    def _load(self) -> dict[str, str]:
        where = f"file: {self.path}"
        try:
            with self.path.open("rb") as f:
                raw = f.read(MAX_CREDENTIAL_FILE_BYTES + 1)
        except OSError as exc:
            raise CredentialUnavailable(f"{where}: cannot read: {exc.strerror}") from None
        if len(raw) > MAX_CREDENTIAL_FILE_BYTES:
            raise CredentialUnavailable(f"{where}: larger than {MAX_CREDENTIAL_FILE_BYTES} bytes")
        data = _parse(raw, where, json_only=self.path.suffix.lower() == ".json")
        if not isinstance(data, Mapping) or not data:
            raise CredentialUnavailable(f"{where}: must hold a non-empty mapping of fields")
        fields: dict[str, str] = {}
        for key, value in data.items():
            if not isinstance(key, str) or not isinstance(value, str | int | float):
                # Name the field, not the value.
                raise CredentialUnavailable(f"{where}: field {key!r} must be a string")
            fields[key] = str(value)
        return fields

    def __repr__(self) -> str:
        return f"FileFetcher({self.path})"


def _parse(raw: bytes, where: str, json_only: bool) -> Any:
    # Parser error messages can quote the offending line, i.e. a secret: report position only.
    if json_only:
        try:
            return json.loads(raw)
        except json.JSONDecodeError as exc:
            raise CredentialUnavailable(
                f"{where}: not valid JSON (line {exc.lineno}, column {exc.colno})"
            ) from None
        except ValueError:  # not UTF-8
            raise CredentialUnavailable(f"{where}: not valid JSON") from None
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise CredentialUnavailable(f"{where}: not valid YAML{at}") from None


def make_fetcher(creds: CredentialsConfig, vault: VaultClient | None, where: str) -> Fetcher:
    """The fetcher for a vault-kv, env or file credentials section (`where`: its config path)."""
    if creds.provider == "vault-kv":
        if vault is None:
            raise ConfigError(f"{where}.from: vault-kv needs a top-level vault section")
        if not creds.path:
            raise ConfigError(f"{where}.path: required for vault-kv")
        return VaultKvFetcher(vault, creds.mount, creds.path)
    if creds.provider == "env":
        if not creds.fields:
            raise ConfigError(f"{where}.fields: required for env")
        return EnvFetcher(creds.fields)
    if creds.provider == "file":
        if creds.file is None:
            raise ConfigError(f"{where}.path: required for file")
        return FileFetcher(creds.file)
    raise ConfigError(f"{where}.from: {creds.provider} is not a cached provider")
