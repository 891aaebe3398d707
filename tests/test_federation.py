"""Federation: X.509-SVIDs of a partner trust domain, verified against that domain's bundle
only, with allow rules naming IDs of any configured domain (config, and a real broker with
real TLS clients)."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from broker.config import load_config
from broker.errors import ConfigError
from broker.identity.ca import IssuedFiles
from tests.brokers import base_config, running_broker, write_config
from tests.pki import Pki, client_ssl_context

ORDERS = "spiffe://example.org/ns/prod/sa/orders"
PARTNER = "spiffe://partner.org/ns/shop/sa/checkout"


@pytest.fixture(scope="module")
def partner(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("partner"), "partner.org")


def federated_config(pki: Pki, partner: Pki, upstream: str, **identity: Any) -> dict[str, Any]:
    config = base_config(
        pki,
        services=[
            {
                "name": "orders-api",
                "adapter": "http",
                "listen": "127.0.0.1:0",
                "upstream": {"url": upstream},
                "credentials": {"from": "env", "fields": {"token": "SIDEKEY_TEST_API_TOKEN"}},
                "inject": {"headers": {"Authorization": "Bearer {token}"}},
                "allow": [ORDERS, PARTNER],
            }
        ],
    )
    config["identity"]["federation"] = {"partner.org": str(partner.bundle)}
    config["identity"].update(identity)
    return config


# ------------------------------------------------------------------------------ config


def test_allow_rules_may_name_ids_of_federated_domains_only(
    pki: Pki, partner: Pki, tmp_path: Path
) -> None:
    config = federated_config(pki, partner, "http://127.0.0.1:9")
    loaded = load_config(write_config(tmp_path, config))
    assert loaded.identity.trust_domains == ("example.org", "partner.org")
    assert loaded.identity.federation["partner.org"] == partner.bundle
    config["services"][0]["allow"].append("spiffe://evil.org/x")
    with pytest.raises(ConfigError) as raised:
        load_config(write_config(tmp_path, config))
    assert str(raised.value) == (
        "services[0].allow[2]: 'spiffe://evil.org/x' is outside the configured trust domains "
        "('example.org', 'partner.org'); a partner's trust domain goes under identity.federation"
    )


@pytest.mark.parametrize(
    ("federation", "message"),
    [
        (
            {"example.org": "x.pem"},
            "identity.federation.example.org: this is identity.trust_domain",
        ),
        ({"partner.org": "missing.pem"}, "identity.federation.partner.org: file not found"),
        (
            {"partner.org": "workload_api"},
            "identity.federation.partner.org: workload_api needs identity.workload_api",
        ),
        ({"not a domain!": "x.pem"}, "identity.federation.not a domain!: not a valid trust"),
        (["partner.org"], "identity.federation: must be a mapping of strings to strings"),
    ],
)
def test_federation_errors_are_located(
    pki: Pki, partner: Pki, tmp_path: Path, federation: Any, message: str
) -> None:
    config = federated_config(pki, partner, "http://127.0.0.1:9")
    config["identity"]["federation"] = federation
    with pytest.raises(ConfigError, match="^" + message.replace(".", r"\.")):
        load_config(write_config(tmp_path, config))


# --------------------------------------------------------------------- a real broker


@pytest.fixture
async def upstream() -> AsyncIterator[str]:
    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/", ok)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    await runner.cleanup()


async def request(pki: Pki, port: int, presented: IssuedFiles) -> tuple[int, str]:
    """GET / with `presented` as the client certificate: (status, body); status 0 when the
    broker ended the connection in the handshake (TLS 1.3 tells the client only then)."""
    client = client_ssl_context(pki)
    client.load_cert_chain(presented.cert, presented.key)
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=client, server_hostname="localhost"
    )
    try:
        writer.write(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        response = await reader.read()
    except (ssl.SSLError, ConnectionError):
        return 0, ""
    finally:
        writer.close()
    if not response:
        return 0, ""
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode()


async def test_each_svid_verifies_against_its_own_domains_bundle_only(
    pki: Pki, partner: Pki, tmp_path: Path, upstream: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SIDEKEY_TEST_API_TOKEN", "t0ken")
    config = federated_config(pki, partner, upstream)
    async with running_broker(tmp_path, config) as broker:
        port = int(broker.address("orders-api").rsplit(":", 1)[1])
        # Each domain's own workloads, by their own CA: allowed.
        assert await request(pki, port, pki.client(ORDERS)) == (200, "ok")
        assert await request(pki, port, partner.client(PARTNER)) == (200, "ok")
        # The partner's CA vouching for one of our IDs: the chain verifies (its CA is in the
        # store) but ends outside example.org's bundle.
        status, body = await request(pki, port, partner.mint("forged", uri_sans=[ORDERS]))
        assert status == 403
        assert (
            f"the certificate of {ORDERS} chains to a CA outside the bundle of 'example.org' "
            "(partner.org's)"
        ) in body
        # And ours vouching for a partner ID.
        status, body = await request(pki, port, pki.mint("partner-by-us", uri_sans=[PARTNER]))
        assert status == 403
        assert "outside the bundle of 'partner.org' (example.org's)" in body
        # An ID of a domain with no bundle, on a chain that verifies.
        status, body = await request(pki, port, pki.foreign_domain_client())
        assert status == 403
        assert "no bundle is configured for 'evil.org'" in body
        # A CA nobody configured: the handshake itself fails.
        stranger = Pki(tmp_path / "stranger", "stranger.org")
        assert await request(pki, port, stranger.client()) == (0, "")
        described = broker.inventory()["identity"]["bundles"]
        assert described["partner.org"]["source"] == f"file:{partner.bundle}"


async def test_a_federated_bundle_file_follows_rotation(
    pki: Pki, partner: Pki, tmp_path: Path, upstream: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SIDEKEY_TEST_API_TOKEN", "t0ken")
    bundle = tmp_path / "partner-bundle.pem"
    bundle.write_bytes(pki.bundle.read_bytes())  # the wrong CA, to begin with
    config = federated_config(pki, partner, upstream)
    config["identity"]["federation"] = {"partner.org": str(bundle)}
    async with running_broker(tmp_path, config) as broker:
        port = int(broker.address("orders-api").rsplit(":", 1)[1])
        assert await request(pki, port, partner.client(PARTNER)) == (0, "")
        bundle.write_bytes(partner.bundle.read_bytes())
        broker.reload_identity()
        assert await request(pki, port, partner.client(PARTNER)) == (200, "ok")
