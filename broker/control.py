"""Live control across a fleet: the deny list in OpenBao KV, watched by every broker.

`sidekey offboard` writes an entry (`add_entry`), `sidekey onboard` removes it
(`remove_entry`), both with check-and-set so two operators never lose each other's entry.
Every broker runs a `DenyWatcher` that reads the list every `governance.watch_interval`
seconds and hands each new version to the runtime, which denies, closes and revokes. There
is no control plane of our own: the vault every broker already trusts is the shared state,
and its own audit log shows who wrote the entry.
"""

from __future__ import annotations

import asyncio
import getpass
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from broker.config import DenyListConfig
from broker.credentials.vault import VaultClient
from broker.errors import CredentialUnavailable
from broker.governance.denylist import DenyEntry, decode, encode
from broker.observe.metrics import Value

log = logging.getLogger("sidekey.control")

# Check-and-set retries when another writer changed the list between our read and write.
CAS_ATTEMPTS = 5


class DenyWatcher:
    """Reads the deny list on an interval; calls `on_change` with each new version.

    A failed read keeps the last list in force (identities denied stay denied) and is
    visible in `error`, `/readyz` and `sidekey_deny_list_up`.
    """

    def __init__(
        self,
        vault: VaultClient,
        config: DenyListConfig,
        interval: float,
        on_change: Callable[[dict[str, DenyEntry]], Awaitable[None]],
        *,
        up: Value | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.vault = vault
        self.config = config
        self.interval = interval
        self._on_change = on_change
        self._up = up  # sidekey_deny_list_up
        self._clock = clock
        self.version: int | None = None  # 0: the list does not exist (nobody offboarded)
        self.error: str | None = "not read yet"
        self.last_read: float | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def where(self) -> str:
        return f"{self.config.mount}/{self.config.path}"

    @property
    def ok(self) -> bool:
        return self.error is None

    def state(self) -> dict[str, object]:
        age = None if self.last_read is None else round(self._clock() - self.last_read, 1)
        return {"ok": self.ok, "path": self.where, "version": self.version,
                "error": self.error, "last_read_seconds_ago": age}  # fmt: skip

    async def read_once(self) -> None:
        try:
            found = await self.vault.read_kv_optional(self.config.mount, self.config.path)
        except CredentialUnavailable as exc:
            if self.error != str(exc):
                log.warning("cannot read the deny list %s: %s", self.where, exc)
            self.error = str(exc)
            if self._up is not None:
                self._up.value = 0.0
            return
        fields, version = ({}, 0) if found is None else (found[0], found[1])
        self.error = None
        if self._up is not None:
            self._up.value = 1.0
        self.last_read = self._clock()
        if version != self.version:
            self.version = version
            await self._on_change(decode(fields))

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="deny-list-watcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.read_once()
            except Exception:
                # A bug must not stop the watcher: the next read tries again.
                log.exception("deny list watcher failed")


def _by() -> str:
    try:
        return f"{getpass.getuser()}@{socket.gethostname()}"
    except (OSError, KeyError):
        return socket.gethostname()


async def add_entry(
    vault: VaultClient, config: DenyListConfig, spiffe_id: str, reason: str
) -> DenyEntry:
    """Offboard: add (or replace) `spiffe_id`'s entry; returns what was written."""
    entry = DenyEntry(spiffe_id, reason, datetime.now(UTC).isoformat(timespec="seconds"), _by())

    def change(fields: dict[str, str]) -> bool:
        fields[spiffe_id] = encode(entry)
        return True

    await _update(vault, config, change)
    return entry


async def remove_entry(vault: VaultClient, config: DenyListConfig, spiffe_id: str) -> bool:
    """Onboard: remove `spiffe_id`'s entry; False if it had none."""

    def change(fields: dict[str, str]) -> bool:
        return fields.pop(spiffe_id, None) is not None

    return await _update(vault, config, change)


async def _update(
    vault: VaultClient, config: DenyListConfig, change: Callable[[dict[str, str]], bool]
) -> bool:
    for attempt in range(CAS_ATTEMPTS):
        found = await vault.read_kv_optional(config.mount, config.path)
        fields, version = ({}, 0) if found is None else (dict(found[0]), found[1])
        if not change(fields):
            return False
        try:
            await vault.write_kv(config.mount, config.path, fields, cas=version)
        except CredentialUnavailable as exc:
            if "check-and-set" not in str(exc) or attempt == CAS_ATTEMPTS - 1:
                raise
            continue  # someone else wrote in between: read their version and apply again
        return True
    return False  # pragma: no cover - the loop returns or raises
