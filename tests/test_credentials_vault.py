"""VaultClient against a real OpenBao: reads, leases, and errors that say what to fix."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from broker.config import VaultAuthConfig, VaultConfig
from broker.credentials.vault import LeaseResponse, VaultClient
from broker.errors import ConfigError, CredentialUnavailable
from tests.servers import OpenBao, VaultDatabase, free_port


@pytest.fixture
async def vault(openbao: OpenBao):
    client = VaultClient(openbao.address, openbao.token, timeout=5.0)
    yield client
    await client.close()


def test_from_config_env(openbao: OpenBao, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIDEKEY_TEST_TOKEN", openbao.token)
    cfg = VaultConfig(openbao.address, VaultAuthConfig("token", token_env="SIDEKEY_TEST_TOKEN"))
    client = VaultClient.from_config(cfg)
    assert openbao.token not in repr(client) and openbao.token not in str(client)


@pytest.mark.parametrize("value", [None, "", "   "])
def test_from_config_missing_env(value: str | None, monkeypatch: pytest.MonkeyPatch) -> None:
    if value is None:
        monkeypatch.delenv("SIDEKEY_NO_TOKEN", raising=False)
    else:
        monkeypatch.setenv("SIDEKEY_NO_TOKEN", value)
    cfg = VaultConfig("http://127.0.0.1:1", VaultAuthConfig("token", token_env="SIDEKEY_NO_TOKEN"))
    with pytest.raises(ConfigError, match=r"vault\.auth\.token_env: .*SIDEKEY_NO_TOKEN"):
        VaultClient.from_config(cfg)


def test_from_config_token_file(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("s.sekrit-token-value\n")
    cfg = VaultConfig("http://127.0.0.1:1", VaultAuthConfig("token", token_file=token_file))
    client = VaultClient.from_config(cfg)
    assert "sekrit" not in repr(client)
    token_file.write_text("\n")
    with pytest.raises(ConfigError, match=r"vault\.auth\.token_file: .* is empty"):
        VaultClient.from_config(cfg)


async def test_read_kv_all_fields_and_version(openbao: OpenBao, vault: VaultClient) -> None:
    kv = openbao.client().secrets.kv.v2
    kv.create_or_update_secret(path="vc/app", secret={"user": "app", "token": "t1", "n": 7})
    fields, version = await vault.read_kv("secret", "vc/app")
    assert fields == {"user": "app", "token": "t1", "n": "7"}
    kv.create_or_update_secret(path="vc/app", secret={"user": "app", "token": "t2"})
    fields, version2 = await vault.read_kv("secret", "vc/app")
    assert fields["token"] == "t2" and version2 == version + 1


async def test_not_found_names_the_path(vault: VaultClient) -> None:
    with pytest.raises(CredentialUnavailable, match=r"secret/vc/missing does not exist"):
        await vault.read_kv("secret", "vc/missing")


async def test_permission_denied_names_path_and_policy(
    openbao: OpenBao, vault: VaultClient
) -> None:
    root = openbao.client()
    root.secrets.kv.v2.create_or_update_secret(path="vc/private", secret={"k": "v"})
    root.sys.create_or_update_policy(
        "vc-narrow", 'path "secret/data/vc/public" { capabilities = ["read"] }'
    )
    narrow = root.auth.token.create(policies=["vc-narrow"], ttl="10m")["auth"]["client_token"]
    client = VaultClient(openbao.address, narrow)
    try:
        with pytest.raises(CredentialUnavailable) as info:
            await client.read_kv("secret", "vc/private")
        message = str(info.value)
        assert "permission denied for secret/vc/private" in message
        assert "policy" in message
        assert narrow not in message and openbao.token not in message
        await client.check()  # the token itself is fine
    finally:
        await client.close()


async def test_invalid_token(openbao: OpenBao) -> None:
    client = VaultClient(openbao.address, "not-a-real-token")
    try:
        with pytest.raises(CredentialUnavailable, match="permission denied") as info:
            await client.check()
        assert "not-a-real-token" not in str(info.value)
    finally:
        await client.close()


async def test_unreachable_address() -> None:
    address = f"http://127.0.0.1:{free_port()}"
    client = VaultClient(address, "tok", timeout=2.0)
    try:
        with pytest.raises(CredentialUnavailable, match=r"cannot reach .*vault\.address"):
            await client.read_kv("secret", "x")
    finally:
        await client.close()


async def test_calls_do_not_block_the_event_loop(vault: VaultClient) -> None:
    # While Vault calls run, the loop keeps ticking: the longest gap between ticks stays far
    # below what a blocking call sequence would cause.
    gaps: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        last = time.perf_counter()
        while not stop.is_set():
            await asyncio.sleep(0)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    task = asyncio.create_task(ticker())
    started = time.perf_counter()
    await asyncio.gather(*(vault.check() for _ in range(40)))
    elapsed = time.perf_counter() - started
    stop.set()
    await task
    assert len(gaps) > 10
    assert max(gaps) < elapsed / 2


async def test_dynamic_read_renew_revoke(vault_database: VaultDatabase) -> None:
    vdb = vault_database
    client = VaultClient(vdb.openbao.address, vdb.openbao.token)
    try:
        response = await client.read(f"{vdb.mount}/creds/{vdb.role}")
        assert isinstance(response, LeaseResponse)
        assert response.lease_id.startswith(f"{vdb.mount}/creds/{vdb.role}/")
        assert response.lease_duration > 0 and response.renewable
        password = response.data["password"]
        assert password not in repr(response) and password not in str(response)
        assert response.data["username"] in await vdb.postgres.aroles()

        renewed = await client.renew(response.lease_id, 120)
        assert renewed.lease_id == response.lease_id
        assert 0 < renewed.lease_duration <= 120

        await client.revoke(response.lease_id)
        assert response.data["username"] not in await vdb.postgres.aroles()
        with pytest.raises(CredentialUnavailable, match="lease"):
            await client.renew(response.lease_id, 60)
    finally:
        await client.close()


async def test_unknown_database_role(vault_database: VaultDatabase) -> None:
    client = VaultClient(vault_database.openbao.address, vault_database.openbao.token)
    try:
        with pytest.raises(CredentialUnavailable, match=r"database/creds/no-such-role"):
            await client.read("database/creds/no-such-role")
    finally:
        await client.close()


async def test_closed_client_fails_closed(openbao: OpenBao) -> None:
    client = VaultClient(openbao.address, openbao.token)
    await client.close()
    with pytest.raises(CredentialUnavailable, match="closed"):
        await client.check()
