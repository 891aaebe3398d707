"""`event_loop`: `sidekey run` starts uvloop by default on Linux and asyncio's own loop when
asked, says which in its log and in `sidekey_build_info` (issue 18.1)."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import pytest
import yaml

from broker.cli import loop_factory
from broker.config import parse_config
from broker.errors import ConfigError
from tests.broker_process import BrokerProcess
from tests.brokers import base_config
from tests.pki import Pki
from tests.servers import free_port


def config(pki: Pki, tmp_path: Path, event_loop: str | None) -> tuple[Path, str]:
    admin = f"127.0.0.1:{free_port()}"
    service = {
        "name": "api",
        "adapter": "http",
        "listen": f"127.0.0.1:{free_port()}",
        "upstream": {"url": "http://127.0.0.1:9"},
        "credentials": {"from": "env", "fields": {"token": "HOME"}},
        "inject": {"headers": {"Authorization": "Bearer {token}"}},
        "allow": [f"spiffe://{pki.trust_domain}/app"],
    }
    raw = base_config(pki, services=[service])
    raw["admin"] = {"listen": admin}
    if event_loop is not None:
        raw["event_loop"] = event_loop
    path = tmp_path / "sidekey.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path, admin


@pytest.mark.parametrize(
    ("event_loop", "named"), [(None, "uvloop "), ("uvloop", "uvloop "), ("asyncio", "asyncio")]
)
def test_run_names_the_loop_it_runs(
    pki: Pki, tmp_path: Path, event_loop: str | None, named: str
) -> None:
    path, admin = config(pki, tmp_path, event_loop)
    broker = BrokerProcess.start(path, admin)
    try:
        with urllib.request.urlopen(f"http://{admin}/metrics", timeout=5) as resp:
            metrics = resp.read().decode()
    finally:
        broker.stop()
    assert f'event_loop="{named}' in metrics
    assert f"event loop: {named}" in broker.log()
    assert f"(event_loop: {event_loop or 'auto'})" in broker.log()


def test_loop_factory_choices() -> None:
    assert loop_factory("asyncio") is None
    factory = loop_factory("auto")
    assert factory is not None and type(factory()).__module__.startswith("uvloop")


def test_an_unknown_loop_is_a_located_error(pki: Pki, tmp_path: Path) -> None:
    path, _ = config(pki, tmp_path, "trio")
    with pytest.raises(ConfigError, match="event_loop: must be one of auto, uvloop, asyncio"):
        parse_config(yaml.safe_load(path.read_text()), path)
