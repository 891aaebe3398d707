"""The `vault` section: where OpenBao/Vault is and how the broker logs in to it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from broker.errors import ConfigError

from .section import Section

VAULT_AUTH_METHODS = ("token",)


@dataclass(frozen=True, slots=True)
class VaultAuthConfig:
    method: Literal["token"]
    token_env: str | None = None
    token_file: Path | None = None


@dataclass(frozen=True, slots=True)
class VaultConfig:
    address: str
    auth: VaultAuthConfig
    ca: Path | None = None
    timeout: float = 5.0


def parse_vault(section: Section, base: Path) -> VaultConfig:
    address = section.text("address")
    if not address.startswith(("http://", "https://")):
        raise ConfigError(f"{section.at('address')}: must start with http:// or https://")
    auth_section = section.section("auth")
    method = auth_section.choice("method", VAULT_AUTH_METHODS)
    token_env = auth_section.text("token_env", None)
    token_file = auth_section.path("token_file", base, None)
    if (token_env is None) == (token_file is None):
        raise ConfigError(
            f"{auth_section.where}: token auth needs exactly one of token_env, token_file"
        )
    auth_section.finish()
    vault = VaultConfig(
        address=address.rstrip("/"),
        auth=VaultAuthConfig(method, token_env, token_file),
        ca=section.path("ca", base, None),
        timeout=section.number("timeout", 0.1, 120, 5.0),
    )
    section.finish()
    return vault
