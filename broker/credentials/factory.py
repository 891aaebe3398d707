"""Build a service's `CredentialSource` from its config."""

from __future__ import annotations

from broker.config import ServiceConfig
from broker.credentials import CredentialSource
from broker.credentials.cache import CachedSource
from broker.credentials.leases import LeaseManager
from broker.credentials.oauth2 import OAuth2Fetcher, OAuth2Source
from broker.credentials.providers import make_fetcher
from broker.credentials.vault import VaultClient
from broker.errors import ConfigError
from broker.observe.metrics import Metrics


def make_source(
    service: ServiceConfig, vault: VaultClient | None, metrics: Metrics
) -> CredentialSource:
    """A `LeaseManager` for vault-database, an `OAuth2Source` for oauth2, a `CachedSource`
    for vault-kv, env and file."""
    creds = service.credentials
    where = f"{service.where}.credentials"
    if creds.oauth2 is not None:
        client = make_fetcher(creds.oauth2.client, vault, f"{where}.client")
        fetcher = OAuth2Fetcher(creds.oauth2, client, creds.ttl, where=where)
        return OAuth2Source(service.name, fetcher, creds.ttl, metrics)
    if creds.provider == "vault-database":
        if vault is None:
            raise ConfigError(f"{where}.from: vault-database needs a top-level vault section")
        if not creds.role:
            raise ConfigError(f"{where}.role: required for vault-database")
        return LeaseManager(
            service.name,
            vault,
            creds.mount,
            creds.role,
            metrics,
            idle_timeout=creds.idle_timeout,
        )
    return CachedSource(
        service.name,
        creds.provider,
        make_fetcher(creds, vault, where),
        creds.ttl,
        metrics,
        description=f"{creds.describe()} (cached {creds.ttl:g}s)",
    )
