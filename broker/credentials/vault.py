"""An asyncio face on hvac for Vault/OpenBao.

hvac is synchronous (requests underneath), so every call runs on a small dedicated thread pool
and never blocks the event loop. Each worker thread has its own `hvac.Client`: a
`requests.Session` is not documented as thread-safe.

Every hvac/requests exception is translated here, once, into `CredentialUnavailable` with a
message that says what to fix. The token never appears in a message, a log line or a repr.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

import hvac
import hvac.exceptions
import requests

from broker.config import VaultConfig
from broker.errors import ConfigError, CredentialUnavailable

log = logging.getLogger("sidekey.vault")

T = TypeVar("T")

# Vault calls in flight at once. Calls are short (ms) and the lease manager batches renewals;
# a handful of threads keeps a slow vault from queueing everything behind one call without
# letting a burst open hundreds of connections to it.
VAULT_WORKERS = 4
# requests' timeout bounds each connect and each read, not the whole call; this margin on top
# of the configured timeout caps the whole call (DNS, connect, TLS, read) from asyncio's side.
CALL_TIMEOUT_MARGIN_SECONDS = 1.0
# A token file larger than this is not a token (and must not be read into memory whole).
MAX_TOKEN_FILE_BYTES = 64 * 1024
# Vault error texts are short; anything longer is cut so a message stays one readable line.
MAX_ERROR_TEXT = 200


@dataclass(frozen=True, slots=True)
class LeaseResponse:
    """What a logical read or a renewal returned. `data` holds secret values: never logged."""

    data: Mapping[str, Any] = field(repr=False)
    lease_id: str
    lease_duration: float
    renewable: bool

    def __repr__(self) -> str:
        return (
            f"LeaseResponse(lease_id={self.lease_id!r}, lease_duration={self.lease_duration}, "
            f"renewable={self.renewable}, data=<{len(self.data)} redacted>)"
        )

    __str__ = __repr__


class VaultClient:
    """Async Vault/OpenBao client with token auth.

    All methods raise `CredentialUnavailable` (never an hvac or requests exception).
    """

    def __init__(
        self,
        address: str,
        token: str,
        *,
        ca: Path | str | None = None,
        timeout: float = 5.0,
        workers: int = VAULT_WORKERS,
    ) -> None:
        self.address = address.rstrip("/")
        self._token = token
        self._verify: bool | str = str(ca) if ca is not None else True
        self.timeout = timeout
        self._local = threading.local()
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sidekey-vault")
        self._closed = False

    @classmethod
    def from_config(cls, cfg: VaultConfig) -> VaultClient:
        """Build a client, reading the token from the configured variable or file.

        Raises `ConfigError` naming the config key when the token is missing or empty.
        """
        return cls(cfg.address, _read_token(cfg), ca=cfg.ca, timeout=cfg.timeout)

    def __repr__(self) -> str:
        return f"VaultClient(address={self.address!r})"

    __str__ = __repr__

    # ------------------------------------------------------------------ public API

    async def read_kv(self, mount: str, path: str) -> tuple[dict[str, str], int]:
        """The latest version of KV v2 secret `mount/path`: all its fields, and the version."""
        where = f"{mount}/{path}"

        def call(client: hvac.Client) -> Any:
            return client.secrets.kv.v2.read_secret_version(
                path=path, mount_point=mount, raise_on_deleted_version=True
            )

        response = await self._call(call, where, what="KV v2 secret")
        try:
            raw = response["data"]["data"]
            version = int(response["data"]["metadata"]["version"])
        except (KeyError, TypeError, ValueError):
            raise CredentialUnavailable(
                f"vault: {where} is not a KV v2 secret (is mount {mount!r} KV version 2?)"
            ) from None
        return _string_fields(raw, where), version

    async def read_kv_optional(
        self, mount: str, path: str
    ) -> tuple[dict[str, str], int, str | None] | None:
        """KV v2 `mount/path` as (fields, version, created_time), or None when it does not
        exist (never written, or its latest version deleted)."""
        where = f"{mount}/{path}"

        def call(client: hvac.Client) -> Any:
            try:
                return client.secrets.kv.v2.read_secret_version(
                    path=path, mount_point=mount, raise_on_deleted_version=True
                )
            except hvac.exceptions.InvalidPath:
                return None

        response = await self._call(call, where, what="KV v2 secret")
        if response is None:
            return None
        try:
            raw = response["data"]["data"]
            metadata = response["data"]["metadata"]
            version = int(metadata["version"])
        except (KeyError, TypeError, ValueError):
            raise CredentialUnavailable(
                f"vault: {where} is not a KV v2 secret (is mount {mount!r} KV version 2?)"
            ) from None
        return _string_fields(raw or {}, where), version, metadata.get("created_time")

    async def write_kv(self, mount: str, path: str, fields: Mapping[str, str], cas: int) -> int:
        """Write a new version of KV v2 `mount/path` if its version is still `cas` (0: it
        must not exist yet); returns the new version. A concurrent writer's version makes
        the vault refuse it: CredentialUnavailable, and the caller reads and tries again."""
        where = f"{mount}/{path}"

        def call(client: hvac.Client) -> Any:
            return client.secrets.kv.v2.create_or_update_secret(
                path=path, secret=dict(fields), cas=cas, mount_point=mount
            )

        response = await self._call(call, where, what="KV v2 secret")
        try:
            return int(response["data"]["version"])
        except (KeyError, TypeError, ValueError):
            raise CredentialUnavailable(f"vault: writing {where} returned no version") from None

    async def read(self, path: str) -> LeaseResponse:
        """A logical read, e.g. `<mount>/creds/<role>` of a dynamic secrets engine."""

        def call(client: hvac.Client) -> Any:
            # Client.read() maps 404 to None; call the adapter to keep the error text.
            return client.adapter.get(f"/v1/{path}")

        response = await self._call(call, path, what="secret")
        if not isinstance(response, Mapping):
            raise CredentialUnavailable(f"vault: {path} returned no data")
        return _lease_response(response, path)

    async def renew(self, lease_id: str, increment: float) -> LeaseResponse:
        """Renew a lease by `increment` seconds; the answer may be shorter (max TTL)."""

        def call(client: hvac.Client) -> Any:
            return client.sys.renew_lease(lease_id=lease_id, increment=int(increment))

        response = await self._call(call, f"lease {lease_id}", what="lease")
        if not isinstance(response, Mapping):
            raise CredentialUnavailable(f"vault: renewing lease {lease_id} returned nothing")
        return _lease_response(response, f"lease {lease_id}")

    async def revoke(self, lease_id: str) -> None:
        """Revoke a lease now (the database engine drops the role)."""

        def call(client: hvac.Client) -> Any:
            return client.sys.revoke_lease(lease_id=lease_id)

        await self._call(call, f"lease {lease_id}", what="lease")

    async def check(self) -> None:
        """Readiness: the vault answers and the token is valid (token lookup-self)."""

        def call(client: hvac.Client) -> Any:
            return client.auth.token.lookup_self()

        await self._call(call, "auth/token/lookup-self", what="token")

    async def close(self) -> None:
        """Stop the worker threads (calls in flight finish first, off the event loop)."""
        if self._closed:
            return
        self._closed = True
        await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)

    # ------------------------------------------------------------------ plumbing

    def _client(self) -> hvac.Client:
        """This worker thread's own hvac client."""
        client: hvac.Client | None = getattr(self._local, "client", None)
        if client is None:
            client = hvac.Client(
                url=self.address, token=self._token, verify=self._verify, timeout=self.timeout
            )
            self._local.client = client
        return client

    def _run(self, fn: Callable[[hvac.Client], T]) -> T:
        return fn(self._client())

    async def _call(self, fn: Callable[[hvac.Client], T], where: str, what: str) -> T:
        if self._closed:
            raise CredentialUnavailable("vault: client is closed")
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.timeout + CALL_TIMEOUT_MARGIN_SECONDS):
                return await loop.run_in_executor(self._executor, functools.partial(self._run, fn))
        except TimeoutError:
            raise CredentialUnavailable(
                f"vault: no answer from {self.address} within {self.timeout}s "
                f"(reading {where}); check the address or raise vault.timeout"
            ) from None
        except Exception as exc:
            raise self._translate(exc, where, what) from None

    def _translate(self, exc: Exception, where: str, what: str) -> CredentialUnavailable:
        """One place that turns hvac/requests errors into a message saying what to fix."""
        text = _errors_text(exc)
        if isinstance(exc, requests.exceptions.SSLError):
            msg = (
                f"TLS handshake with {self.address} failed; check vault.ca "
                "(the CA that signed the vault's certificate)"
            )
        elif isinstance(exc, requests.exceptions.Timeout):
            msg = f"no answer from {self.address} within {self.timeout}s (reading {where})"
        elif isinstance(exc, requests.exceptions.ConnectionError):
            msg = f"cannot reach {self.address}; check vault.address and that the vault is up"
        elif isinstance(exc, requests.exceptions.RequestException):
            msg = f"request to {self.address} failed: {type(exc).__name__}"
        elif isinstance(exc, hvac.exceptions.Forbidden | hvac.exceptions.Unauthorized):
            msg = (
                f"permission denied for {where}: the token is invalid or expired, or its "
                f"policy does not grant access to {where}"
            )
        elif isinstance(exc, hvac.exceptions.InvalidPath):
            msg = f"{what} {where} does not exist" + (f" ({text})" if text else "")
        elif isinstance(exc, hvac.exceptions.VaultDown):
            msg = f"{self.address} is sealed or in standby"
        elif isinstance(exc, hvac.exceptions.InvalidRequest):
            msg = f"request for {where} rejected" + (f": {text}" if text else "")
        elif isinstance(exc, hvac.exceptions.RateLimitExceeded):
            msg = f"rate limit exceeded reading {where}"
        elif isinstance(exc, hvac.exceptions.VaultError):
            msg = f"error reading {where} ({type(exc).__name__})" + (f": {text}" if text else "")
        else:
            msg = f"unexpected {type(exc).__name__} talking to {self.address} about {where}"
            log.warning("vault call failed where=%s error_type=%s", where, type(exc).__name__)
        return CredentialUnavailable(f"vault: {msg}")


def _read_token(cfg: VaultConfig) -> str:
    auth = cfg.auth
    if auth.token_env is not None:
        token = os.environ.get(auth.token_env, "").strip()
        if not token:
            raise ConfigError(
                f"vault.auth.token_env: environment variable {auth.token_env} is not set or "
                "is empty"
            )
        return token
    if auth.token_file is not None:
        try:
            with auth.token_file.open("rb") as f:
                raw = f.read(MAX_TOKEN_FILE_BYTES + 1)
        except OSError as exc:
            raise ConfigError(
                f"vault.auth.token_file: cannot read {auth.token_file}: {exc.strerror}"
            ) from None
        if len(raw) > MAX_TOKEN_FILE_BYTES:
            raise ConfigError(
                f"vault.auth.token_file: {auth.token_file} is larger than "
                f"{MAX_TOKEN_FILE_BYTES} bytes; it should hold only the token"
            )
        token = raw.decode("utf-8", errors="replace").strip()
        if not token:
            raise ConfigError(f"vault.auth.token_file: {auth.token_file} is empty")
        return token
    raise ConfigError("vault.auth: token auth needs one of token_env, token_file")


def _errors_text(exc: Exception) -> str:
    # Vault's "errors" describe the request ("permission denied", "unknown role"); they never
    # echo a token or a secret value back.
    errors = getattr(exc, "errors", None)
    if not errors or not isinstance(errors, list):
        return ""
    text = "; ".join(str(e).replace("\n", " ").strip() for e in errors)
    return text[:MAX_ERROR_TEXT]


def _string_fields(raw: Any, where: str) -> dict[str, str]:
    if not isinstance(raw, Mapping):
        raise CredentialUnavailable(f"vault: {where} holds no fields")
    fields: dict[str, str] = {}
    for key, value in raw.items():
        if isinstance(value, str):
            fields[str(key)] = value
        elif isinstance(value, int | float | bool):
            fields[str(key)] = str(value).lower() if isinstance(value, bool) else str(value)
        else:
            raise CredentialUnavailable(
                f"vault: field {key!r} of {where} is a {type(value).__name__}, not a string"
            )
    return fields


def _lease_response(response: Mapping[str, Any], where: str) -> LeaseResponse:
    data = response.get("data") or {}
    if not isinstance(data, Mapping):
        raise CredentialUnavailable(f"vault: {where} returned data that is not a mapping")
    try:
        duration = float(response.get("lease_duration") or 0)
    except (TypeError, ValueError):
        raise CredentialUnavailable(f"vault: {where} returned a bad lease_duration") from None
    return LeaseResponse(
        data=MappingProxyType(dict(data)),
        lease_id=str(response.get("lease_id") or ""),
        lease_duration=duration,
        renewable=bool(response.get("renewable")),
    )
