"""The broker's identity material from files: read, checked, replaced on change (rename or in
place), on reload (SIGHUP), never by a half-written or mismatched file; and the serving TLS
that follows it, for the next handshake, with open connections left alone."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from cryptography import x509

from broker.config import IdentityConfig, TLSConfig
from broker.errors import ConfigError
from broker.identity.ca import IssuedFiles, init_ca, issue, issue_certificate, write_issued
from broker.identity.material import IdentityMaterial
from broker.identity.tls import ServerTLS
from broker.identity.trust import Snapshot
from broker.observe.metrics import Metrics
from tests.brokers import base_config, running_broker, write_config
from tests.loops import Run
from tests.pki import SERVER_DNS, SERVER_ID, SERVER_IPS, Pki, client_ssl_context

ORDERS = "spiffe://example.org/ns/prod/sa/orders"
# Generous: a loaded 2-core CI box.
DEADLINE_SECONDS = 30.0


def serving(pki: Pki, directory: Path) -> IssuedFiles:
    """A fresh serving SVID for the broker, written (by rename) as DIR/broker{,-key}.pem."""
    return issue(pki.dir, SERVER_ID, directory / "broker", dns=SERVER_DNS, ips=SERVER_IPS)


def material_for(
    pki: Pki, files: IssuedFiles, bundle: Path | None = None, **kwargs: Any
) -> IdentityMaterial:
    identity = IdentityConfig(pki.trust_domain, bundle or pki.bundle)
    return IdentityMaterial(identity, TLSConfig(files.cert, files.key), **kwargs)


def serial_of(files: IssuedFiles) -> str:
    return format(x509.load_pem_x509_certificate(files.cert.read_bytes()).serial_number, "x")


async def poll(predicate: Callable[[], bool], timeout: float = DEADLINE_SECONDS) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


def test_files_are_read_and_described(pki: Pki, tmp_path: Path) -> None:
    files = serving(pki, tmp_path)
    material = material_for(pki, files)
    assert material.ready
    svid = material.svid
    assert svid is not None and svid.spiffe_id == SERVER_ID and svid.serial == serial_of(files)
    described = material.describe()
    assert described["svid"]["source"] == f"file:{files.cert}"
    assert described["svid"]["spiffe_id"] == SERVER_ID
    assert 0 < described["svid"]["seconds_to_expiry"] <= 86400
    assert described["bundles"]["example.org"]["source"] == f"file:{pki.bundle}"
    assert described["bundles"]["example.org"]["authorities"] == 1
    assert "PRIVATE KEY" not in json.dumps(described)


def test_a_broken_pair_at_start_is_a_located_config_error(pki: Pki, tmp_path: Path) -> None:
    files = serving(pki, tmp_path)
    other = issue(pki.dir, SERVER_ID, tmp_path / "other")
    with pytest.raises(ConfigError, match=r"tls\.key: .*not the one of the certificate"):
        material_for(pki, IssuedFiles(files.cert, other.key, files.bundle))
    files.cert.write_text("-----BEGIN CERTIFICATE-----\nMIIB")
    with pytest.raises(ConfigError, match=r"tls\.cert: cannot load certificate/key pair"):
        material_for(pki, files)


async def test_a_renamed_pair_replaces_the_old_one_and_subscribers_hear_of_it(
    pki: Pki, tmp_path: Path
) -> None:
    files = serving(pki, tmp_path)
    metrics = Metrics()
    material = material_for(pki, files, metrics=metrics, poll_seconds=0.05)
    seen: list[Snapshot] = []
    material.subscribe(seen.append)
    await material.start()
    try:
        first = material.svid
        assert first is not None
        rotated = serving(pki, tmp_path)  # what cert-manager does: write aside, rename
        await poll(lambda: material.svid is not first)
        assert material.svid is not None and material.svid.serial == serial_of(rotated)
        assert seen and seen[-1].svid is material.svid
        assert metrics.svid_rotations.labels("file").value == 1
    finally:
        await material.stop()


async def test_a_half_written_or_mismatched_pair_never_replaces_the_current_one(
    pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    files = serving(pki, tmp_path)
    metrics = Metrics()
    material = material_for(pki, files, metrics=metrics, poll_seconds=0.05)
    await material.start()
    try:
        current = material.svid
        good = issue(pki.dir, SERVER_ID, tmp_path / "next", dns=SERVER_DNS)
        # In place, half of it: the current pair stays, the problem is logged once.
        with caplog.at_level(logging.WARNING, "sidekey.identity"):
            files.cert.write_bytes(good.cert.read_bytes()[:200])
            await poll(lambda: metrics.identity_errors.labels("file", "rejected").value == 1)
            await asyncio.sleep(0.3)  # several polls of the same bad state
        assert metrics.identity_errors.labels("file", "rejected").value == 1
        assert "kept the current svid" in caplog.text
        assert material.svid is current
        # The whole certificate, but the old key: still refused.
        files.cert.write_bytes(good.cert.read_bytes())
        await poll(lambda: metrics.identity_errors.labels("file", "rejected").value == 2)
        assert material.svid is current
        # Then the key arrives: the pair is whole and replaces the old one.
        os.replace(good.key, files.key)
        await poll(lambda: material.svid is not current)
        assert material.svid is not None and material.svid.serial == serial_of(good)
        assert material.ready
    finally:
        await material.stop()


async def test_an_expired_replacement_is_refused(pki: Pki, tmp_path: Path) -> None:
    files = serving(pki, tmp_path)
    material = material_for(pki, files)
    current = material.svid
    expired_cert, expired_key = issue_certificate(
        pki.ca_cert,
        pki.ca_key,
        uri_sans=[SERVER_ID],
        not_before=datetime.now(UTC) - timedelta(days=2),
        valid_for=timedelta(days=1),
    )
    write_issued(expired_cert, expired_key, tmp_path / "broker", pki.bundle.read_bytes())
    material.reload()
    assert material.svid is current


async def test_reload_rereads_now_and_bundles_follow_too(pki: Pki, tmp_path: Path) -> None:
    files = serving(pki, tmp_path)
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(pki.bundle.read_bytes())
    metrics = Metrics()
    # No watching: only reload() (what SIGHUP calls) can see the change.
    material = material_for(pki, files, bundle, metrics=metrics, poll_seconds=3600)
    await material.start()
    try:
        first = material.svid
        serving(pki, tmp_path)
        other = init_ca(tmp_path / "second-ca", "example.org").read_bytes()
        bundle.write_bytes(pki.bundle.read_bytes() + other)
        assert material.svid is first
        material.reload()
        assert material.svid is not first
        assert len(material.bundles["example.org"].authorities) == 2
        assert metrics.bundle_updates.labels("example.org", "x509", "file").value == 1
    finally:
        await material.stop()


async def test_readiness_turns_false_when_the_certificate_expires_unreplaced(
    pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cert, key = issue_certificate(
        pki.ca_cert,
        pki.ca_key,
        uri_sans=[SERVER_ID],
        not_before=datetime.now(UTC) - timedelta(seconds=1),
        valid_for=timedelta(seconds=3),
    )
    files = write_issued(cert, key, tmp_path / "broker", pki.bundle.read_bytes())
    material = material_for(pki, files)
    assert material.ready
    with caplog.at_level(logging.ERROR, "sidekey.identity"):
        await material.start()
        try:
            await poll(lambda: not material.ready, timeout=10)
            _ready, reason = material.readiness()
            assert reason is not None and "expired" in reason and str(files.cert) in reason
            assert material.seconds_to_expiry() < 0
            await poll(lambda: "no replacement has arrived" in caplog.text, timeout=5)
        finally:
            await material.stop()


# ------------------------------------------------------------- serving TLS that follows


def peer_serial(port: int, client: ssl.SSLContext) -> str:
    with (
        socket.create_connection(("127.0.0.1", port), 5) as raw,
        client.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        return format(x509.load_der_x509_certificate(der).serial_number, "x")


def test_server_tls_serves_the_new_pair_from_the_next_handshake_under_both_loops(
    run: Run, pki: Pki, tmp_path: Path
) -> None:
    """Through a listener that keeps the context it was given (loop.create_server), as the
    HTTP adapter's and the TLS-first listeners do; an open connection keeps working."""
    files = serving(pki, tmp_path)
    material = material_for(pki, files)
    tls = ServerTLS(material.snapshot)
    material.subscribe(tls.update)
    client = client_ssl_context(pki, pki.client())

    async def body() -> None:
        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while data := await reader.read(100):
                writer.write(data)
                await writer.drain()
            writer.close()

        server = await asyncio.start_server(echo, "127.0.0.1", 0, ssl=tls.context)
        port = server.sockets[0].getsockname()[1]
        loop = asyncio.get_running_loop()
        try:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=client, server_hostname="localhost"
            )
            before = await loop.run_in_executor(None, peer_serial, port, client)
            assert before == serial_of(files)
            rotated = serving(pki, tmp_path)
            material.reload()
            after = await loop.run_in_executor(None, peer_serial, port, client)
            assert after == serial_of(rotated) != before
            # The connection opened before the rotation is still up and working.
            writer.write(b"still here")
            assert await reader.readexactly(10) == b"still here"
            writer.close()
        finally:
            server.close()
            await server.wait_closed()

    run(body())


def test_a_ca_removed_from_the_bundle_stops_verifying_new_handshakes(
    run: Run, pki: Pki, tmp_path: Path
) -> None:
    """The verify store comes with the new context too: a client of a CA that left the
    bundle is refused on its next connection."""
    files = serving(pki, tmp_path)
    second = Pki(tmp_path / "second", "example.org")
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(pki.bundle.read_bytes() + second.bundle.read_bytes())
    material = material_for(pki, files, bundle)
    tls = ServerTLS(material.snapshot)
    material.subscribe(tls.update)
    # Trusts the broker (pki's CA), presents a certificate of the second CA.
    client = client_ssl_context(pki)
    client.load_cert_chain(second.client().cert, second.client().key)

    async def body() -> None:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"ok")
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=tls.context)
        port = server.sockets[0].getsockname()[1]
        try:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=client, server_hostname="localhost"
            )
            assert await reader.readexactly(2) == b"ok"
            writer.close()
            bundle.write_bytes(pki.bundle.read_bytes())
            material.reload()
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=client, server_hostname="localhost"
            )
            with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
                await reader.readexactly(2)
            writer.close()
        finally:
            server.close()
            await server.wait_closed()

    run(body())


# ---------------------------------------------------------------- the running broker


async def get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
    """One HTTP/1.1 request on a kept-alive connection; the response body."""
    writer.write(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    return await reader.readexactly(length)


async def test_broker_follows_files_on_disk_and_keeps_open_connections(
    pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, upstream_url: str
) -> None:
    monkeypatch.setattr("broker.identity.material.FILE_POLL_SECONDS", 0.1)
    monkeypatch.setenv("SIDEKEY_TEST_API_TOKEN", "t0ken")
    files = serving(pki, tmp_path)
    config = base_config(pki, services=[api_service(upstream_url)])
    config["tls"] = {"cert": str(files.cert), "key": str(files.key)}
    client = client_ssl_context(pki, pki.client())
    async with running_broker(tmp_path, config) as broker:
        port = int(broker.address("orders-api").rsplit(":", 1)[1])
        loop = asyncio.get_running_loop()
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client, server_hostname="localhost"
        )
        assert await get(reader, writer) == b"ok"
        first = await loop.run_in_executor(None, peer_serial, port, client)
        rotated = serving(pki, tmp_path)
        await poll(
            lambda: (
                broker.identity.svid is not None
                and broker.identity.svid.serial == serial_of(rotated)
            )
        )
        after = await loop.run_in_executor(None, peer_serial, port, client)
        assert after == serial_of(rotated) != first
        # The kept-alive connection from before the rotation still carries requests.
        assert await get(reader, writer) == b"ok"
        writer.close()
        inventory = broker.inventory()["identity"]
        assert inventory["svid"]["serial"] == serial_of(rotated)
        text = broker.metrics_text()
        assert b'sidekey_svid_rotations_total{source="file"} 1.0' in text
        assert b"sidekey_svid_expiry_seconds 8" in text  # a day: 8xxxx seconds


def api_service(upstream_url: str) -> dict[str, Any]:
    return {
        "name": "orders-api",
        "adapter": "http",
        "listen": "127.0.0.1:0",
        "upstream": {"url": upstream_url},
        "credentials": {"from": "env", "fields": {"token": "SIDEKEY_TEST_API_TOKEN"}},
        "inject": {"headers": {"Authorization": "Bearer {token}"}},
        "allow": [ORDERS],
    }


@pytest.fixture
async def upstream_url() -> AsyncIterator[str]:
    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/", ok)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    await runner.cleanup()


# `sidekey run` with the file watch slowed to an hour, so only SIGHUP can see the change.
RUN_WITHOUT_WATCH = (
    "import sys, broker.identity.material as m; m.FILE_POLL_SECONDS = 3600; "
    "from broker.cli import main; sys.exit(main(sys.argv[1:]))"
)


def test_sighup_rereads_the_files_of_a_running_sidekey(pki: Pki, tmp_path: Path) -> None:
    files = serving(pki, tmp_path)
    config = base_config(pki, services=[api_service("http://127.0.0.1:9")])
    config["services"][0]["credentials"] = {"from": "env", "fields": {"token": "HOME"}}
    config["tls"] = {"cert": str(files.cert), "key": str(files.key)}
    config["services"][0]["listen"] = "127.0.0.1:0"
    path = write_config(tmp_path, config)
    log = tmp_path / "sidekey.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                RUN_WITHOUT_WATCH,
                "run",
                "--config",
                str(path),
                "--log-format",
                "text",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + DEADLINE_SECONDS
        while "running with" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        rotated = serving(pki, tmp_path)
        proc.send_signal(signal.SIGHUP)
        while f"serial {serial_of(rotated)}" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(DEADLINE_SECONDS)
