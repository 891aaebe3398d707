"""Providers: env and file fetchers (vault-kv is exercised in test_credentials_cache.py)."""

from __future__ import annotations

import json
from pathlib import Path
from types import MappingProxyType

import pytest

from broker.config import CredentialsConfig
from broker.credentials.providers import EnvFetcher, FileFetcher, make_fetcher
from broker.errors import ConfigError, CredentialUnavailable

SECRET = "hunter2-Zq8"


async def test_env_reads_every_field() -> None:
    fetch = EnvFetcher(
        {"user": "APP_USER", "password": "APP_PW"}, {"APP_USER": "u", "APP_PW": SECRET}
    )
    cred = await fetch()
    assert dict(cred.fields) == {"user": "u", "password": SECRET}
    assert cred.ref.provider == "env" and cred.ref.location == "APP_PW,APP_USER"
    assert SECRET not in repr(cred) and SECRET not in repr(fetch)


async def test_env_missing_variable_is_named() -> None:
    fetch = EnvFetcher({"user": "APP_USER", "password": "APP_PW"}, {"APP_USER": "u"})
    with pytest.raises(CredentialUnavailable, match=r"variable APP_PW \(field 'password'\)"):
        await fetch()


async def test_file_yaml_and_rotation(tmp_path: Path) -> None:
    path = tmp_path / "creds.yaml"
    path.write_text(f"user: app\npassword: {SECRET}\nport: 5432\n")
    fetch = FileFetcher(path)
    cred = await fetch()
    assert dict(cred.fields) == {"user": "app", "password": SECRET, "port": "5432"}
    path.write_text("user: app\npassword: rotated\n")
    assert (await fetch()).fields["password"] == "rotated"


async def test_file_json(tmp_path: Path) -> None:
    path = tmp_path / "creds.json"
    path.write_text(json.dumps({"token": SECRET}))
    assert (await FileFetcher(path)()).fields == {"token": SECRET}


@pytest.mark.parametrize(
    ("name", "content", "error"),
    [
        ("bad.yaml", f"password: [{SECRET}\n", r"not valid YAML \(line"),
        ("bad.json", f'{{"password": "{SECRET}"', r"not valid JSON \(line"),
        ("list.yaml", f"- {SECRET}\n", "non-empty mapping"),
        ("nested.yaml", f"password: {{inner: {SECRET}}}\n", "field 'password' must be a string"),
    ],
)
async def test_file_errors_never_quote_values(
    tmp_path: Path, name: str, content: str, error: str
) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(CredentialUnavailable, match=error) as info:
        await FileFetcher(path)()
    assert SECRET not in str(info.value)


async def test_file_missing(tmp_path: Path) -> None:
    with pytest.raises(CredentialUnavailable, match="cannot read"):
        await FileFetcher(tmp_path / "nope.yaml")()


def test_make_fetcher_checks_config() -> None:
    with pytest.raises(ConfigError, match=r"services\[0\]\.credentials\.from: vault-kv needs"):
        make_fetcher(
            CredentialsConfig("vault-kv", "secret", path="x"), None, "services[0].credentials"
        )
    fetch = make_fetcher(
        CredentialsConfig("env", "", fields=MappingProxyType({"a": "B"})), None, "where"
    )
    assert isinstance(fetch, EnvFetcher)
