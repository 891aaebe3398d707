"""Config errors of the HTTP adapter: located messages, raised before anything binds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from broker.config import load_config
from broker.errors import ConfigError
from broker.runtime import Broker
from tests.brokers import base_config, write_config
from tests.pki import DEFAULT_CLIENT_ID, Pki


def service(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "name": "api",
        "adapter": "http",
        "listen": "127.0.0.1:0",
        "upstream": {"url": "https://api.example.net"},
        # env credentials: building the broker needs no vault.
        "credentials": {"from": "env", "fields": {"token": "API_TOKEN"}},
        "inject": {"headers": {"Authorization": "Bearer {token}"}},
        "allow": [DEFAULT_CLIENT_ID],
    }
    base.update(overrides)
    return base


def build(tmp_path: Path, pki: Pki, *services: dict[str, Any]) -> Broker:
    config = base_config(pki, services=list(services), admin=False)
    return Broker(load_config(write_config(tmp_path, config)))


def test_valid_config_builds(tmp_path: Path, pki: Pki) -> None:
    broker = build(tmp_path, pki, service(upstream={
        "url": "http://127.0.0.1:8080/base/", "timeout": 5, "connect_timeout": 1.5}))  # fmt: skip
    adapter: Any = broker.services["api"].adapter
    assert adapter.settings.timeout == 5.0
    assert adapter.settings.connect_timeout == 1.5
    assert [h.fields for h in adapter.settings.headers] == [("token",)]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"upstream": {"url": "ftp://api.example.net"}},
         "services[1].upstream.url: must be an http or https URL, got 'ftp://api.example.net'"),
        ({"upstream": {"url": "not a url"}}, "services[1].upstream.url: must be an http"),
        ({"upstream": {"url": "https://"}}, "services[1].upstream.url: must be an http"),
        ({"upstream": {}}, "services[1].upstream.url: required"),
        ({"upstream": {"url": "https://u:p@api.example.net"}},
         "services[1].upstream.url: must not contain user info"),
        ({"upstream": {"url": "https://api.example.net/?a=1"}},
         "services[1].upstream.url: must not have a query or fragment"),
        ({"upstream": {"url": "https://api.example.net", "bogus": 1}},
         "services[1].upstream.bogus: unknown key"),
        ({"upstream": {"url": "https://api.example.net", "timeout": 0}},
         "services[1].upstream.timeout: must be a number"),
        ({"upstream": {"url": "https://api.example.net", "ca": "missing.pem"}},
         "services[1].upstream.ca: file not found"),
        ({"upstream": {"url": "http://api.example.net", "ca": "sidekey.yaml"}},
         "services[1].upstream.ca: only applies to an https URL"),
        ({"upstream": {"url": "https://api.example.net", "ca": "sidekey.yaml"}},
         "services[1].upstream.ca: cannot load CA file"),
        ({"inject": {}}, "services[1].inject.headers: required"),
        ({"inject": {"headers": {}}}, "services[1].inject.headers: name at least one header"),
        ({"inject": {"headers": {"A": "x"}, "extra": 1}}, "services[1].inject.extra: unknown key"),
        ({"inject": {"headers": {"Authorization": "Bearer {token"}}},
         "services[1].inject.headers.Authorization: not a valid template"),
        ({"inject": {"headers": {"Authorization": "Bearer {token.__class__}"}}},
         "services[1].inject.headers.Authorization: template fields must be plain names"),
        ({"inject": {"headers": {"Authorization": "Bearer {0}"}}},
         "services[1].inject.headers.Authorization: template fields must be plain names"),
        ({"inject": {"headers": {"Authorization": "{token!r}"}}},
         "services[1].inject.headers.Authorization: template fields must be plain names"),
        ({"inject": {"headers": {"Host": "{token}"}}},
         "services[1].inject.headers.Host: the broker sets this header itself"),
        ({"inject": {"headers": {"Bad Name": "{token}"}}},
         "services[1].inject.headers.Bad Name: not a valid HTTP header name"),
        ({"inject": {"headers": {"X-A": "{token}\r\nX-B: 1"}}},
         "services[1].inject.headers.X-A: a header value cannot contain CR, LF or NUL"),
        ({"inject": {"headers": {"X-A": "{token}", "x-a": "{token}"}}},
         "services[1].inject.headers.x-a: named twice"),
        ({"upstream": {"url": "https://api.example.net", "stream_idle_timeout": 0}},
         "services[1].upstream.stream_idle_timeout: must be a number 0.1-86400"),
        ({"websocket": "no"}, "services[1].websocket: must be true or false"),
        ({"adapter": "postgres", "websocket": False},
         "services[1].websocket: only applies to adapter: http"),
        ({"allow_trace": "yes"}, "services[1].allow_trace: must be true or false"),
        ({"adapter": "postgres", "allow_trace": True},
         "services[1].allow_trace: only applies to adapter: http"),
        ({"limits": {"max_head_bytes": 100}},
         "services[1].limits.max_head_bytes: must be an integer 1024-1048576, got 100"),
        ({"limits": {"max_head_bytes": 2**21}},
         "services[1].limits.max_head_bytes: must be an integer 1024-1048576"),
        ({"limits": {"max_body_bytes": 1}}, "services[1].limits.max_body_bytes: unknown key"),
        ({"limits": {"body_idle_timeout": 0}},
         "services[1].limits.body_idle_timeout: must be a number 0.1-3600"),
        ({"limits": 5}, "services[1].limits: must be a mapping"),
        ({"adapter": "postgres", "limits": {"max_head_bytes": 4096}},
         "services[1].limits: only applies to adapter: http"),
        ({"inject": {"headers": {"X-Forwarded-For": "{token}"}}},
         "services[1].inject.headers.X-Forwarded-For: the broker sets this header itself"),
        ({"forward_identity": {"header": "Bad Name"}},
         "services[1].forward_identity.header: not a valid HTTP header name"),
        ({"forward_identity": {"claims": True}}, "services[1].forward_identity.header: required"),
        ({"forward_identity": {"header": "authorization"}},
         "services[1].forward_identity.header: authorization is already injected (inject)"),
        ({"forward_identity": {"header": "Host"}},
         "services[1].forward_identity.header: Host is already set by the broker for its hop"),
        ({"forward_identity": {"header": "X-Forwarded-User"}},
         "services[1].forward_identity.header: X-Forwarded-* are the broker's forwarding"),
        ({"forward_identity": {"header": "X-Sidekey-Claims"}},
         "services[1].forward_identity.header: X-Sidekey-Claims carries the claims"),
        ({"forward_identity": {"header": "X-Id", "claims": "yes"}},
         "services[1].forward_identity.claims: must be true or false"),
        ({"forward_identity": {"header": "X-Id", "extra": 1}},
         "services[1].forward_identity.extra: unknown key"),
        ({"adapter": "postgres", "forward_identity": {"header": "X-Id"}},
         "services[1].forward_identity: only applies to adapter: http"),
    ],
)  # fmt: skip
def test_config_errors_are_located(
    tmp_path: Path, pki: Pki, overrides: dict[str, Any], message: str
) -> None:
    first = service(name="first", listen="127.0.0.1:0")
    with pytest.raises(ConfigError) as info:
        build(tmp_path, pki, first, service(**overrides))
    assert str(info.value).startswith(message), str(info.value)
