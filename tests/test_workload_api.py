"""The broker's identity from a real SPIRE agent's Workload API (tests/spire.py): its SVID
rotating every ~25 s under load without a failed handshake, bundles and JWT bundles that
update, a lost agent retried, federation with bundles from the agent, and the broker's own
JWT-SVIDs."""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import jwt
import pytest
from aiohttp import web
from cryptography import x509

from broker.identity.ca import IssuedFiles
from tests.brokers import running_broker
from tests.pki import Pki
from tests.spire import BROKER_ID, BROKER_SVID_TTL, CLIENT_ID, FetchedSvid, Spire

PARTNER = "spiffe://partner.org/ns/shop/sa/checkout"
# Generous: real rotations take ~25 s each, and the box is shared.
ROTATIONS_SECONDS = 200.0
DEADLINE_SECONDS = 60.0
# Concurrent clients, each opening a new TLS connection per request: every request is a
# handshake, so each rotation is met by handshakes on both sides of it.
LOAD_CLIENTS = 3
# Pause between one client's requests: ~100 handshakes/s in all, a load the shared 2-core box
# carries beside everything else.
LOAD_PAUSE_SECONDS = 0.02


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


def spire_config(spire: Spire, upstream: str, **identity: Any) -> dict[str, Any]:
    """No tls section, no x509_bundle: everything from the agent."""
    return {
        "version": 1,
        "identity": {"trust_domain": "example.org", "workload_api": spire.endpoint, **identity},
        "services": [
            {
                "name": "orders-api",
                "adapter": "http",
                "listen": "127.0.0.1:0",
                "upstream": {"url": upstream},
                "credentials": {"from": "env", "fields": {"token": "SIDEKEY_TEST_API_TOKEN"}},
                "inject": {"headers": {"Authorization": "Bearer {token}"}},
                "allow": [CLIENT_ID, PARTNER] if "federation" in identity else [CLIENT_ID],
            }
        ],
        "admin": {"listen": "127.0.0.1:0"},
    }


def client_context(svid: FetchedSvid) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(svid.bundle))
    ctx.load_cert_chain(svid.cert, svid.key)
    return ctx


async def get(port: int, ctx: ssl.SSLContext, *, close: bool = True) -> tuple[int, str, str, Any]:
    """A new TLS connection and GET /: (status, body, the broker's serial, the streams)."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=ctx, server_hostname="localhost"
    )
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    serial = format(x509.load_der_x509_certificate(der).serial_number, "x")
    status, body = await request(reader, writer, close=close)
    if close:
        writer.close()
    return status, body, serial, (reader, writer)


async def request(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, close: bool
) -> tuple[int, str]:
    connection = b"close" if close else b"keep-alive"
    writer.write(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: " + connection + b"\r\n\r\n")
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    body = await reader.readexactly(length)
    return int(head.split()[1]), body.decode()


async def poll(predicate: Callable[[], bool], timeout: float = DEADLINE_SECONDS) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


def port_of(broker: Any) -> int:
    return int(broker.address("orders-api").rsplit(":", 1)[1])


@pytest.mark.timeout(ROTATIONS_SECONDS + 60)
async def test_two_rotations_under_load_without_a_failed_handshake(
    spire: Spire, tmp_path: Path, upstream: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One test for everything that needs real rotations to happen (~55 s of them)."""
    monkeypatch.setenv("SIDEKEY_TEST_API_TOKEN", "t0ken")
    client = client_context(spire.fetch_x509(tmp_path / "client"))
    async with running_broker(tmp_path, spire_config(spire, upstream)) as broker:
        await poll(lambda: broker.ready)
        metrics = broker.metrics
        rotations = metrics.svid_rotations.labels("workload_api")
        port = port_of(broker)
        # A kept-alive connection from before any rotation, used again at the end.
        status, _, first_serial, (kept_r, kept_w) = await get(port, client, close=False)
        assert status == 200
        served: set[str] = {first_serial}
        failures: list[str] = []
        handshakes = 0
        stop = asyncio.Event()

        async def load() -> None:
            nonlocal handshakes
            while not stop.is_set():
                try:
                    status, body, serial, _ = await get(port, client)
                except (OSError, ssl.SSLError, asyncio.IncompleteReadError) as exc:
                    failures.append(repr(exc))
                else:
                    handshakes += 1
                    served.add(serial)
                    if (status, body) != (200, "ok"):
                        failures.append(f"{status} {body}")
                await asyncio.sleep(LOAD_PAUSE_SECONDS)

        started = time.monotonic()
        clients = [asyncio.create_task(load()) for _ in range(LOAD_CLIENTS)]
        try:
            # Bundle updates from the agent, meanwhile: a new X.509 CA and JWT key prepared.
            spire.prepare_authority()
            spire.prepare_jwt_authority()
            await poll(lambda: rotations.value >= 2, timeout=ROTATIONS_SECONDS)
            await poll(
                lambda: (
                    metrics.bundle_updates.labels("example.org", "x509", "workload_api").value >= 1
                    and metrics.bundle_updates.labels("example.org", "jwt", "workload_api").value
                    >= 1
                )
            )
            await asyncio.sleep(1.0)  # handshakes after the last rotation too
        finally:
            stop.set()
            await asyncio.gather(*clients)
        took = time.monotonic() - started
        logging.getLogger(__name__).warning(
            "rotation test: %d handshakes over %.0f s, %d serials", handshakes, took, len(served)
        )
        assert failures == []
        assert handshakes > 100
        # The first certificate and at least two replacements were served.
        assert len(served) >= 3
        svid = broker.identity.svid
        assert svid is not None and svid.spiffe_id == BROKER_ID and svid.serial in served
        # The connection opened before the rotations still carries requests.
        assert await request(kept_r, kept_w, close=True) == (200, "ok")
        kept_w.close()
        assert len(broker.identity.bundles["example.org"].authorities) == 2
        # What an operator sees.
        ready, body = broker.readiness()
        assert ready and body["identity"] == {"ready": True, "error": None}
        described = broker.inventory()["identity"]
        assert described["svid"]["source"] == f"workload_api:{spire.endpoint}"
        assert 0 < described["svid"]["seconds_to_expiry"] <= BROKER_SVID_TTL + 1
        assert described["bundles"]["example.org"]["authorities"] == 2
        assert described["workload_api"]["connected"] == {"x509": True, "jwt": True}
        text = broker.metrics_text().decode()
        assert 'sidekey_svid_rotations_total{source="workload_api"}' in text
        expiry = next(
            line for line in text.splitlines() if line.startswith("sidekey_svid_expiry_seconds ")
        )
        assert 0 < float(expiry.split()[1]) <= BROKER_SVID_TTL + 1


async def test_a_lost_agent_is_retried_logged_and_counted(
    spire: Spire,
    tmp_path: Path,
    upstream: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("SIDEKEY_TEST_API_TOKEN", "t0ken")
    client = client_context(spire.fetch_x509(tmp_path / "client"))
    errors = None
    spire.stop_agent()  # the broker starts before the agent: its socket is not there
    try:
        with caplog.at_level(logging.WARNING, "sidekey.identity"):
            async with running_broker(tmp_path, spire_config(spire, upstream)) as broker:
                errors = broker.metrics.identity_errors.labels("workload_api", "x509")
                await poll(lambda: errors.value >= 2)
                ready, body = broker.readiness()
                assert not ready
                assert body["identity"]["error"].startswith(
                    "waiting for the broker's X.509-SVID from the Workload API at "
                    f"{spire.endpoint} (last error: x509 stream: "
                )
                assert "x509 stream lost" in caplog.text and "retrying in" in caplog.text
                spire.start_agent()
                await poll(lambda: broker.ready)
                assert (await get(port_of(broker), client))[:2] == (200, "ok")
                # Lost while serving: the SVID in hand keeps serving; the loss is counted.
                before = errors.value
                spire.stop_agent()
                await poll(lambda: errors.value > before)
                assert broker.ready
                assert (await get(port_of(broker), client))[:2] == (200, "ok")
                spire.start_agent()
                agent = broker.identity.describe()
                await poll(lambda: broker.identity.describe()["workload_api"]["connected"]["x509"])
                assert agent["workload_api"]["errors"] >= 3
    finally:
        if spire._agent is None:
            spire.start_agent()


async def test_federated_bundles_from_the_workload_api(
    spire: Spire, tmp_path: Path, upstream: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SIDEKEY_TEST_API_TOKEN", "t0ken")
    partner = Pki(tmp_path / "partner", "partner.org")
    spire.set_federated_bundle("partner.org", partner.bundle.read_bytes())
    config = spire_config(spire, upstream, federation={"partner.org": "workload_api"})
    ours = spire.fetch_x509(tmp_path / "client")
    try:
        async with running_broker(tmp_path, config) as broker:
            await poll(lambda: broker.ready)
            port = port_of(broker)

            def as_partner(files: IssuedFiles) -> ssl.SSLContext:
                ctx = ssl.create_default_context(cafile=str(ours.bundle))
                ctx.load_cert_chain(files.cert, files.key)
                return ctx

            # The broker's entry does not federate yet: no partner bundle, handshake refused.
            assert "partner.org" not in broker.identity.bundles
            with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
                await get(port, as_partner(partner.client(PARTNER)))
            spire.update_broker(federates_with=["partner.org"])
            await poll(lambda: "partner.org" in broker.identity.bundles)
            assert (await get(port, as_partner(partner.client(PARTNER))))[:2] == (200, "ok")
            forged = partner.mint("forged", uri_sans=[CLIENT_ID])
            status, body, _, _ = await get(port, as_partner(forged))
            assert status == 403 and "outside the bundle of 'example.org'" in body
            bundles = broker.inventory()["identity"]["bundles"]
            assert bundles["partner.org"]["source"] == f"workload_api:{spire.endpoint}"
    finally:
        spire.update_broker()


async def test_the_brokers_jwt_svid_verifies_with_the_jwt_bundles(
    spire: Spire, tmp_path: Path, upstream: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the JWT verifier and the vault login take from the material."""
    monkeypatch.setenv("SIDEKEY_TEST_API_TOKEN", "t0ken")
    async with running_broker(tmp_path, spire_config(spire, upstream)) as broker:
        material = broker.identity
        await poll(lambda: "example.org" in material.jwt_bundles())
        token = await material.fetch_jwt_svid("openbao")
        assert token.spiffe_id == BROKER_ID and token.token not in repr(token)
        header = jwt.get_unverified_header(token.token)
        key = material.jwt_bundles()["example.org"][header["kid"]]
        claims = jwt.decode(token.token, key, algorithms=[header["alg"]], audience="openbao")
        assert claims["sub"] == BROKER_ID
        assert abs(claims["exp"] - token.expires.timestamp()) < 1
        assert set(broker.inventory()["identity"]["jwt_bundles"]["example.org"]) >= {header["kid"]}
