"""make_source: the right CredentialSource for each provider, working end to end."""

from __future__ import annotations

from pathlib import Path
from types import MappingProxyType

import pytest

from broker.config import CredentialsConfig, ListenAddress, ServiceConfig
from broker.credentials.cache import CachedSource
from broker.credentials.factory import make_source
from broker.credentials.leases import LeaseManager
from broker.credentials.vault import VaultClient
from broker.errors import ConfigError
from broker.identity import local_identity
from broker.observe.metrics import Metrics
from tests.servers import OpenBao, VaultDatabase

ME = local_identity("spiffe://example.org/ns/test/sa/app")


def service(credentials: CredentialsConfig) -> ServiceConfig:
    return ServiceConfig(
        name="svc",
        index=3,
        adapter="http",
        listen=ListenAddress("127.0.0.1", 0),
        client_auth="local",
        allow=(),
        credentials=credentials,
        upstream=MappingProxyType({}),
        inject=MappingProxyType({}),
    )


async def test_cached_providers(
    openbao: OpenBao, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    openbao.client().secrets.kv.v2.create_or_update_secret(
        path="factory/kv", secret={"token": "kv"}
    )
    monkeypatch.setenv("SIDEKEY_FACTORY_TOKEN", "env")
    (tmp_path / "c.yaml").write_text("token: file\n")
    vault = VaultClient(openbao.address, openbao.token)
    configs = {
        "kv": CredentialsConfig("vault-kv", "secret", path="factory/kv", ttl=5),
        "env": CredentialsConfig(
            "env", "", fields=MappingProxyType({"token": "SIDEKEY_FACTORY_TOKEN"})
        ),
        "file": CredentialsConfig("file", "", file=tmp_path / "c.yaml"),
    }
    try:
        for expected, creds in configs.items():
            source = make_source(service(creds), vault, Metrics())
            assert isinstance(source, CachedSource)
            assert creds.provider in source.describe()
            await source.prime()
            async with source.use(ME) as cred:
                assert cred.fields["token"] == expected
            await source.close()
    finally:
        await vault.close()


async def test_vault_database_gets_a_lease_manager(vault_database: VaultDatabase) -> None:
    vault = VaultClient(vault_database.openbao.address, vault_database.openbao.token)
    creds = CredentialsConfig("vault-database", "database", role="app-rw", idle_timeout=30)
    source = make_source(service(creds), vault, Metrics())
    try:
        assert isinstance(source, LeaseManager)
        assert source.idle_timeout == 30
        async with source.use(ME) as cred:
            assert set(cred.fields) == {"username", "password"}
    finally:
        await source.close()
        await vault.close()


@pytest.mark.parametrize(
    "creds",
    [
        CredentialsConfig("vault-kv", "secret", path="x"),
        CredentialsConfig("vault-database", "database", role="r"),
    ],
)
def test_vault_providers_need_a_vault(creds: CredentialsConfig) -> None:
    with pytest.raises(ConfigError, match=r"services\[3\]\.credentials\.from: vault-"):
        make_source(service(creds), None, Metrics())
