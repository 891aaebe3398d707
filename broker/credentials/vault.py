"""An asyncio face on hvac for Vault/OpenBao: several addresses, the broker's own token.

hvac is synchronous (requests underneath), so every call runs on a small dedicated thread pool
and never blocks the event loop. Each worker thread has its own `hvac.Client` per address: a
`requests.Session` is not documented as thread-safe. A login or renewal that presents a TLS
client certificate (cert auth) gets a client and connection of its own, so the certificate
of the moment is the one in the handshake.

**Addresses.** `vault.address` may list several nodes of one cluster. A call goes to the
address that answered last; when that one cannot be reached or cannot serve (sealed, a
standby with no active node), the call moves on to the next at once, and later calls start
there. A call that timed out is not repeated elsewhere (the vault may have acted on it), but
the next call starts at the next address. A standby that forwards is transparent; one that
redirects (307) is followed, up to `MAX_REDIRECTS`. `vault.namespace` is sent on every call.

**Token.** `TokenKeeper` (broker/credentials/vault_token.py) logs in with the configured
method and keeps the token valid; a call the vault refuses with 403 asks it whether the
token is gone, and is tried once more with a new token if it was.

Every hvac/requests exception is translated here, once, into `VaultCallError` (a
`CredentialUnavailable`) with a message that says what to fix. The token never appears in a
message, a log line or a repr.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

import hvac
import hvac.exceptions
import requests

from broker.config import VaultConfig
from broker.credentials.journal import LeaseJournal
from broker.credentials.vault_auth import (
    ClientCertificate,
    Explain,
    JwtSource,
    LoginMethod,
    TokenLogin,
    VaultCallError,
    make_login,
)
from broker.credentials.vault_token import Token, TokenKeeper
from broker.errors import CredentialUnavailable
from broker.observe.audit import AuditLog
from broker.observe.metrics import Metrics

log = logging.getLogger("sidekey.vault")

T = TypeVar("T")

# Vault calls in flight at once. Calls are short (ms) and the lease manager batches renewals;
# a handful of threads keeps a slow vault from queueing everything behind one call without
# letting a burst open hundreds of connections to it.
VAULT_WORKERS = 4
# requests' timeout bounds each connect and each read, not the whole call; this margin on top
# of the configured timeout caps the whole call (DNS, connect, TLS, read) from asyncio's side.
CALL_TIMEOUT_MARGIN_SECONDS = 1.0
# A standby redirects once, to the active node; more than a few hops is a loop.
MAX_REDIRECTS = 3
# Vault error texts are short; anything longer is cut so a message stays one readable line.
MAX_ERROR_TEXT = 200
# Failures that mean "this address cannot serve right now": the call moves on to the next.
MOVE_ON_KINDS = frozenset({"unreachable", "tls", "sealed", "unavailable"})
# How often the leases a killed predecessor left (LeaseJournal) are tried again while the
# vault does not answer.
LEFT_LEASES_RETRY_SECONDS = 5.0


@dataclass(frozen=True, slots=True)
class LeaseResponse:
    """What a logical read or a renewal returned. `data` holds secret values: never logged.

    `generation` is the broker's token that made the read: the lease dies with that token
    (`VaultClient.token_remaining`)."""

    data: Mapping[str, Any] = field(repr=False)
    lease_id: str
    lease_duration: float
    renewable: bool
    generation: int = 0

    def __repr__(self) -> str:
        return (
            f"LeaseResponse(lease_id={self.lease_id!r}, lease_duration={self.lease_duration}, "
            f"renewable={self.renewable}, data=<{len(self.data)} redacted>)"
        )

    __str__ = __repr__


class VaultClient:
    """Async Vault/OpenBao client: the broker's own login, several addresses.

    Give it a `token` (a fixed token, as `token_env` does) or a `login` method. All methods
    raise `CredentialUnavailable` (never an hvac or requests exception).
    """

    def __init__(
        self,
        address: str | Sequence[str],
        token: str | None = None,
        *,
        login: LoginMethod | None = None,
        ca: Path | str | None = None,
        namespace: str | None = None,
        timeout: float = 5.0,
        workers: int = VAULT_WORKERS,
        metrics: Metrics | None = None,
        audit: AuditLog | None = None,
    ) -> None:
        if (token is None) == (login is None):
            raise ValueError("VaultClient needs exactly one of token, login")
        raw = [address] if isinstance(address, str) else list(address)
        if not raw:
            raise ValueError("VaultClient needs at least one address")
        self.addresses = tuple(a.rstrip("/") for a in raw)
        self._preferred = 0
        self.namespace = namespace
        self._verify: bool | str = str(ca) if ca is not None else True
        self.timeout = timeout
        self._local = threading.local()
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sidekey-vault")
        self._closed = False
        self.metrics = metrics if metrics is not None else Metrics()
        self.keeper = TokenKeeper(
            login if login is not None else TokenLogin(token),
            self,
            metrics=self.metrics,
            audit=audit,
        )
        self._audit = audit
        # Under `workers: N`: this worker slot's record of its leases (broker.credentials.
        # journal), and the task revoking what the slot's previous process left.
        self.journal: LeaseJournal | None = None
        self._left_task: asyncio.Task[None] | None = None

    @classmethod
    def from_config(
        cls,
        cfg: VaultConfig,
        *,
        metrics: Metrics | None = None,
        audit: AuditLog | None = None,
        certificate: ClientCertificate | None = None,
        jwt_source: JwtSource | None = None,
    ) -> VaultClient:
        """Build a client for `vault:`; no IO but reading a `token_env` / `token_file`.

        Raises `ConfigError` naming the config key when that token is missing or empty.
        """
        login = make_login(cfg.auth, certificate=certificate, jwt_source=jwt_source)
        return cls(
            cfg.addresses,
            login=login,
            ca=cfg.ca,
            namespace=cfg.namespace,
            timeout=cfg.timeout,
            metrics=metrics,
            audit=audit,
        )

    def __repr__(self) -> str:
        return f"VaultClient(address={self.address!r}, auth={self.keeper.method.describe()!r})"

    __str__ = __repr__

    @property
    def address(self) -> str:
        """The address calls go to first right now."""
        return self.addresses[self._preferred]

    # ------------------------------------------------------------------ public API

    def start(self) -> None:
        """Log in in the background now rather than at the first call; with a journal,
        revoke in the background the leases the previous process left in it."""
        self.keeper.start()
        if self.journal is not None and self.journal.left and self._left_task is None:
            self._left_task = asyncio.create_task(self._revoke_left(), name="vault-left-leases")

    async def read_kv(self, mount: str, path: str) -> tuple[dict[str, str], int]:
        """The latest version of KV v2 secret `mount/path`: all its fields, and the version."""
        where = f"{mount}/{path}"

        def call(client: hvac.Client) -> Any:
            return client.secrets.kv.v2.read_secret_version(
                path=path, mount_point=mount, raise_on_deleted_version=True
            )

        response, _ = await self._call(call, where, what="KV v2 secret")
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

        response, _ = await self._call(call, where, what="KV v2 secret")
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

        response, _ = await self._call(call, where, what="KV v2 secret")
        try:
            return int(response["data"]["version"])
        except (KeyError, TypeError, ValueError):
            raise CredentialUnavailable(f"vault: writing {where} returned no version") from None

    async def read(self, path: str) -> LeaseResponse:
        """A logical read, e.g. `<mount>/creds/<role>` of a dynamic secrets engine."""

        def call(client: hvac.Client) -> Any:
            # Client.read() maps 404 to None; call the adapter to keep the error text.
            return client.adapter.get(f"/v1/{path}")

        response, tok = await self._call(call, path, what="secret")
        if not isinstance(response, Mapping):
            raise CredentialUnavailable(f"vault: {path} returned no data")
        lease = _lease_response(response, path, tok.generation)
        self._journal_lease(lease)
        return lease

    async def renew(self, lease_id: str, increment: float) -> LeaseResponse:
        """Renew a lease by `increment` seconds; the answer may be shorter (max TTL)."""

        def call(client: hvac.Client) -> Any:
            return client.sys.renew_lease(lease_id=lease_id, increment=int(increment))

        response, _ = await self._call(call, f"lease {lease_id}", what="lease")
        if not isinstance(response, Mapping):
            raise CredentialUnavailable(f"vault: renewing lease {lease_id} returned nothing")
        lease = _lease_response(response, f"lease {lease_id}")
        self._journal_lease(lease)
        return lease

    async def revoke(self, lease_id: str) -> None:
        """Revoke a lease now (the database engine drops the role)."""

        def call(client: hvac.Client) -> Any:
            return client.sys.revoke_lease(lease_id=lease_id)

        await self._call(call, f"lease {lease_id}", what="lease")
        if self.journal is not None:
            self.journal.ended(lease_id)

    async def _revoke_left(self) -> None:
        """Revoke the leases a killed predecessor left in the journal, each once, retrying
        while the vault does not answer and the lease has not expired anyway."""
        assert self.journal is not None
        left = self.journal.left
        log.warning("revoking %d lease(s) left in %s by the broker's previous process "
                    "(it did not stop cleanly)", len(left), self.journal.path)  # fmt: skip
        failed: set[str] = set()  # warned about once each, not at every retry
        while left:
            for lease_id, expires in list(left.items()):
                if expires <= time.time():
                    self.journal.ended(lease_id)  # the vault ended it at its TTL
                    continue
                try:
                    await self.revoke(lease_id)
                except CredentialUnavailable as exc:
                    level = logging.DEBUG if lease_id in failed else logging.WARNING
                    failed.add(lease_id)
                    log.log(level, "cannot revoke a lease left by the previous process yet; "
                            "trying again every %.0fs until it expires lease_id=%s error=%s",
                            LEFT_LEASES_RETRY_SECONDS, lease_id, exc)  # fmt: skip
                    continue
                log.info("lease revoked lease_id=%s reason=left by the previous process",
                         lease_id)  # fmt: skip
                if self._audit is not None:
                    self._audit.emit(
                        "lease_revoked", lease_id=lease_id, reason="left by the previous process"
                    )
            if left:
                await asyncio.sleep(LEFT_LEASES_RETRY_SECONDS)

    def _journal_lease(self, lease: LeaseResponse) -> None:
        if self.journal is not None and lease.lease_id and lease.lease_duration > 0:
            self.journal.added(lease.lease_id, time.time() + lease.lease_duration)

    async def check(self) -> None:
        """Readiness: the vault answers and the token is valid (token lookup-self)."""

        def call(client: hvac.Client) -> Any:
            return client.auth.token.lookup_self()

        await self._call(call, "auth/token/lookup-self", what="token")

    @property
    def generation(self) -> int:
        """The broker's current token: each login that brings a new token counts one up."""
        return self.keeper.generation

    def token_remaining(self, generation: int) -> float:
        """Seconds the broker's token of `generation` still lives (inf while it is current
        and renewing; 0 once gone): the vault revokes that token's leases when it ends."""
        return self.keeper.remaining(generation)

    def status(self) -> dict[str, Any]:
        """For readiness: whether the broker holds a valid token, and why not."""
        return {**self.keeper.status(), "address": self.address}

    @property
    def ready(self) -> bool:
        return self.keeper.ready

    async def close(self) -> None:
        """Revoke the broker's own token(s), then stop the worker threads (calls in flight
        finish first, off the event loop). Close lease holders first: revoking a token
        revokes its leases, and the lease manager's own revocations are the audited ones."""
        if self._closed:
            return
        if self._left_task is not None:
            self._left_task.cancel()
            await asyncio.gather(self._left_task, return_exceptions=True)
        await self.keeper.close()
        self._closed = True
        if self.journal is not None:
            self.journal.close()
        await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)

    # ------------------------------------------------------------------ plumbing

    async def _call(self, fn: Callable[[hvac.Client], T], where: str, what: str) -> tuple[T, Token]:
        """`fn` with the broker's token; once more with a new token if the vault says the
        token is gone (revoked from outside)."""
        if self._closed:
            raise CredentialUnavailable("vault: client is closed")
        tok = await self.keeper.token()
        try:
            result = await self.send(fn, where=where, what=what, token=tok.value)
        except VaultCallError as exc:
            if exc.kind != "denied":
                raise
            new = await self.keeper.rejected(tok)
            if new is None:
                raise
            tok = new
            result = await self.send(fn, where=where, what=what, token=tok.value)
        self.keeper.accepted(tok)
        return result, tok

    async def send(
        self,
        fn: Callable[[hvac.Client], T],
        *,
        where: str,
        what: str,
        token: str = "",
        cert: tuple[str, str] | None = None,
        explain: Explain | None = None,
    ) -> T:
        """One call at the first address that can serve it (see the module docstring)."""
        if self._closed:
            raise CredentialUnavailable("vault: client is closed")
        count = len(self.addresses)
        first = self._preferred
        tried: list[tuple[str, VaultCallError]] = []
        for step in range(count):
            index = (first + step) % count
            address = self.addresses[index]
            try:
                result = await self._attempt(fn, address, token, cert)
            except TimeoutError:
                error = VaultCallError(
                    f"vault: no answer from {address} within {self.timeout}s ({where}); "
                    "check the address or raise vault.timeout",
                    "timeout",
                )
                if count > 1:
                    self._switch((index + 1) % count, f"timed out ({where})")
                raise self._failed(error, tried) from None
            except Exception as exc:
                error = self._translate(exc, address, where, what, explain)
                if error.kind in MOVE_ON_KINDS and step < count - 1:
                    log.warning(
                        "vault address cannot serve; trying the next address=%s error=%s",
                        address, error,
                    )  # fmt: skip
                    tried.append((address, error))
                    continue
                raise self._failed(error, tried) from None
            if index != self._preferred:
                self._switch(index, "answered")
            return result
        raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises

    def _failed(
        self, error: VaultCallError, tried: list[tuple[str, VaultCallError]]
    ) -> VaultCallError:
        self.metrics.vault_failures.labels(kind=error.kind).inc()
        if tried and type(error) is VaultCallError:
            others = "; ".join(f"{address}: {e.kind}" for address, e in tried)
            return VaultCallError(f"{error} (also tried {others})", error.kind)
        return error

    def _switch(self, index: int, why: str) -> None:
        if index == self._preferred:
            return
        old, self._preferred = self.address, index
        self.metrics.vault_address_changes.labels(address=self.address).inc()
        log.warning("vault address changed from=%s to=%s reason=%s", old, self.address, why)

    async def _attempt(
        self,
        fn: Callable[[hvac.Client], T],
        address: str,
        token: str,
        cert: tuple[str, str] | None,
    ) -> T:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self.timeout + CALL_TIMEOUT_MARGIN_SECONDS):
            return await loop.run_in_executor(
                self._executor, functools.partial(self._run, fn, address, token, cert)
            )

    def _run(
        self,
        fn: Callable[[hvac.Client], T],
        address: str,
        token: str,
        cert: tuple[str, str] | None,
    ) -> T:
        """In a worker thread: `fn` on this thread's client for `address`, with `token`."""
        if cert is not None:
            # A connection of its own: pooled ones may have shaken hands with an older SVID.
            client = self._new_client(address, cert)
            try:
                client.token = token
                return fn(client)
            finally:
                client.adapter.close()
        clients: dict[str, hvac.Client] | None = getattr(self._local, "clients", None)
        if clients is None:
            clients = self._local.clients = {}
        client = clients.get(address)
        if client is None:
            client = clients[address] = self._new_client(address, None)
        client.token = token
        return fn(client)

    def _new_client(self, address: str, cert: tuple[str, str] | None) -> hvac.Client:
        # token="" rather than None: hvac would fall back to $VAULT_TOKEN or ~/.vault-token.
        client = hvac.Client(
            url=address,
            token="",
            cert=cert,
            verify=self._verify,
            timeout=self.timeout,
            namespace=self.namespace,
        )
        client.session.max_redirects = MAX_REDIRECTS
        return client

    def _translate(
        self, exc: Exception, address: str, where: str, what: str, explain: Explain | None
    ) -> VaultCallError:
        """One place that turns hvac/requests errors into a message saying what to fix."""
        text = _errors_text(exc)
        kind = "error"
        if isinstance(exc, requests.exceptions.SSLError):
            kind = "tls"
            msg = (
                f"TLS handshake with {address} failed; check vault.ca "
                "(the CA that signed the vault's certificate)"
            )
        elif isinstance(exc, requests.exceptions.Timeout):
            kind = "timeout"
            msg = f"no answer from {address} within {self.timeout}s ({where})"
        elif isinstance(exc, requests.exceptions.TooManyRedirects):
            kind = "unavailable"
            msg = f"{address} redirected more than {MAX_REDIRECTS} times ({where})"
        elif isinstance(exc, requests.exceptions.ConnectionError):
            kind = "unreachable"
            target = _origin(getattr(getattr(exc, "request", None), "url", None) or "")
            if target and target != address:
                # OpenBao's standbys answer writes with a 307 to the active node; during an
                # election that is the old one, which is gone.
                msg = (
                    f"{address} redirected to {target}, which cannot be reached (a standby "
                    "pointing at an active node that is gone: an election is under way?)"
                )
            else:
                msg = f"cannot reach {address}; check vault.address and that the vault is up"
        elif isinstance(exc, requests.exceptions.RequestException):
            kind = "unreachable"
            msg = f"request to {address} failed: {type(exc).__name__}"
        elif isinstance(exc, hvac.exceptions.VaultDown):
            kind = "sealed"
            msg = f"{address} is sealed, or a standby that cannot reach an active node"
        elif isinstance(exc, hvac.exceptions.InternalServerError | hvac.exceptions.BadGateway):
            kind = "unavailable"
            msg = f"{address} failed to serve {where}" + (f": {text}" if text else "")
        elif isinstance(exc, hvac.exceptions.RateLimitExceeded):
            kind = "rate_limited"
            msg = f"rate limit exceeded reading {where}"
        else:
            said = explain(exc, text) if explain is not None else None
            if isinstance(said, VaultCallError):
                return said
            if isinstance(exc, hvac.exceptions.Forbidden | hvac.exceptions.Unauthorized):
                kind = "denied"
                msg = said or (
                    f"permission denied for {where}: the token is invalid or expired, or "
                    f"its policy does not grant access to {where}"
                )
            elif isinstance(exc, hvac.exceptions.InvalidPath):
                kind = "not_found"
                msg = said or f"{what} {where} does not exist" + (f" ({text})" if text else "")
            elif isinstance(exc, hvac.exceptions.InvalidRequest):
                kind = "rejected"
                msg = said or f"request for {where} rejected" + (f": {text}" if text else "")
            elif isinstance(exc, hvac.exceptions.VaultError):
                msg = said or (
                    f"error reading {where} ({type(exc).__name__})" + (f": {text}" if text else "")
                )
            else:
                msg = f"unexpected {type(exc).__name__} talking to {address} about {where}"
                log.warning("vault call failed where=%s error_type=%s", where, type(exc).__name__)
        return VaultCallError(f"vault: {msg}", kind)


def _origin(url: str) -> str:
    """scheme://host:port of a URL ("" if it is not one)."""
    scheme, sep, rest = url.partition("://")
    return f"{scheme}://{rest.split('/', 1)[0]}" if sep else ""


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


def _lease_response(response: Mapping[str, Any], where: str, generation: int = 0) -> LeaseResponse:
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
        generation=generation,
    )
