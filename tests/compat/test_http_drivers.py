"""The HTTP clients of the matrix through the broker: curl, requests, httpx, aiohttp,
undici, Go's net/http and Java's HttpClient, each configured with its row's settings in
tests/compat/drivers.py, against a real upstream that insists on the injected token."""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import httpx
import pytest
import requests

from tests.compat.harness import Files, Report, build_clients, run_program, tls_env
from tests.pki import DEFAULT_CLIENT_ID, Pki
from tests.servers import OpenBao
from tests.test_http_adapter import (
    SERVICE,
    Upstream,
    blocks_sha256,
    curl,
    http_service,
    new_secret,
    proxy,
)

DENIED_ID = "spiffe://example.org/ns/prod/sa/intruder"
LARGE = 10_000_000
LARGE_SHA256 = blocks_sha256(LARGE)
BODY = '{"n": 42}'


@dataclass
class Http:
    url: str
    files: Files
    denied: Files


@pytest.fixture
async def http(
    tmp_path: Path, pki: Pki, openbao: OpenBao, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Http]:
    upstream = Upstream()
    await upstream.start()
    try:
        secret = new_secret(openbao, upstream)
        service = http_service(upstream.url, secret.path, allow=[DEFAULT_CLIENT_ID])
        async with proxy(tmp_path, pki, openbao, monkeypatch, service) as p:
            assert p.url.endswith(p.broker.address(SERVICE))
            yield Http(p.url, Files.of(pki.client()), Files.of(pki.client(DENIED_ID)))
    finally:
        await upstream.stop()


def context(files: Files) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(files.ca))
    ctx.load_cert_chain(str(files.cert), str(files.key))
    return ctx


async def test_curl(http: Http) -> None:
    report = Report("curl")
    tls = [
        "--cert",
        str(http.files.cert),
        "--key",
        str(http.files.key),
        "--cacert",
        str(http.files.ca),
    ]
    with report.feature("get"):
        code, out, err = await curl(*tls, f"{http.url}/compat/get")
        assert code == 0 and "/compat/get" in out, err
    with report.feature("post"):
        code, out, err = await curl(*tls, "-H", "Content-Type: application/json", "--data", BODY,
                                    f"{http.url}/compat/post")  # fmt: skip
        assert code == 0 and '{\\"n\\": 42}' in out, (out, err)
    with report.feature("large_result"):
        proc = await asyncio.create_subprocess_exec(
            "curl", "-sS", *tls, f"{http.url}/download?size={LARGE}",
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        data, _ = await proc.communicate()
        assert hashlib.sha256(data).hexdigest() == LARGE_SHA256
    with report.feature("denied") as detail:
        denied = ["--cert", str(http.denied.cert), "--key", str(http.denied.key), "--cacert",
                  str(http.denied.ca)]  # fmt: skip
        code, out, _ = await curl(*denied, "-w", "\n%{http_code}", f"{http.url}/compat/denied")
        assert out.endswith("\n403"), out
        detail.append(out)
    report.check()


def _requests(report: Report, http: Http) -> None:
    cert = (str(http.files.cert), str(http.files.key))
    with report.feature("get"):
        r = requests.get(f"{http.url}/compat/get", cert=cert, verify=str(http.files.ca), timeout=30)
        assert r.status_code == 200 and "/compat/get" in r.text
    with report.feature("post"):
        r = requests.post(f"{http.url}/compat/post", data=BODY, cert=cert,
                          verify=str(http.files.ca), timeout=30)  # fmt: skip
        assert r.status_code == 200 and r.json()["body"] == BODY
    with report.feature("large_result"):
        r = requests.get(f"{http.url}/download?size={LARGE}", cert=cert,
                         verify=str(http.files.ca), timeout=60, stream=True)  # fmt: skip
        digest = hashlib.sha256()
        for chunk in r.iter_content(65536):
            digest.update(chunk)
        assert digest.hexdigest() == LARGE_SHA256
    with report.feature("denied") as detail:
        r = requests.get(f"{http.url}/compat/denied", verify=str(http.files.ca), timeout=30,
                         cert=(str(http.denied.cert), str(http.denied.key)))  # fmt: skip
        assert r.status_code == 403
        detail.append(r.text)


async def test_requests(http: Http) -> None:
    report = Report("requests")
    await asyncio.to_thread(_requests, report, http)
    report.check()


async def test_httpx(http: Http) -> None:
    report = Report("httpx")
    async with httpx.AsyncClient(verify=context(http.files), timeout=60) as client:
        with report.feature("get"):
            r = await client.get(f"{http.url}/compat/get")
            assert r.status_code == 200 and "/compat/get" in r.text
        with report.feature("post"):
            r = await client.post(f"{http.url}/compat/post", content=BODY)
            assert r.status_code == 200 and r.json()["body"] == BODY
        with report.feature("large_result"):
            digest = hashlib.sha256()
            async with client.stream("GET", f"{http.url}/download?size={LARGE}") as r:
                async for chunk in r.aiter_bytes():
                    digest.update(chunk)
            assert digest.hexdigest() == LARGE_SHA256
    async with httpx.AsyncClient(verify=context(http.denied), timeout=30) as client:
        with report.feature("denied") as detail:
            r = await client.get(f"{http.url}/compat/denied")
            assert r.status_code == 403
            detail.append(r.text)
    report.check()


async def test_aiohttp(http: Http) -> None:
    report = Report("aiohttp")
    connector = aiohttp.TCPConnector(ssl=context(http.files))
    async with aiohttp.ClientSession(connector=connector) as session:
        with report.feature("get"):
            async with session.get(f"{http.url}/compat/get") as r:
                assert r.status == 200 and "/compat/get" in await r.text()
        with report.feature("post"):
            async with session.post(f"{http.url}/compat/post", data=BODY) as r:
                assert r.status == 200 and (await r.json())["body"] == BODY
        with report.feature("large_result"):
            digest = hashlib.sha256()
            async with session.get(f"{http.url}/download?size={LARGE}") as r:
                async for chunk in r.content.iter_chunked(65536):
                    digest.update(chunk)
            assert digest.hexdigest() == LARGE_SHA256
    connector = aiohttp.TCPConnector(ssl=context(http.denied))
    async with aiohttp.ClientSession(connector=connector) as session:
        with report.feature("denied") as detail:
            async with session.get(f"{http.url}/compat/denied") as r:
                assert r.status == 403
                detail.append(await r.text())
    report.check()


@pytest.fixture(scope="module")
def clients() -> Path:
    return build_clients()


def _check_large(report: Report) -> None:
    ok, digest = report.results.get("large_result", (False, ""))
    if ok and digest != LARGE_SHA256:
        report.results["large_result"] = (False, f"sha256 {digest}")


async def test_undici(http: Http, clients: Path) -> None:
    report = Report("undici")
    env = {"COMPAT_URL": http.url, **tls_env(http.files, http.denied)}
    report.add_lines(await run_program(["node", "compat.mjs", "undici"], env, cwd=clients / "node"))
    _check_large(report)
    report.check()


async def test_go_net_http(http: Http, clients: Path) -> None:
    report = Report("net/http")
    env = {"COMPAT_URL": http.url, **tls_env(http.files, http.denied)}
    report.add_lines(await run_program([str(clients / "compat-go"), "http"], env))
    _check_large(report)
    report.check()


async def test_java_httpclient(http: Http, clients: Path) -> None:
    report = Report("HttpClient")
    env = {"COMPAT_URL": http.url, **tls_env(http.files, http.denied)}
    java = clients / "java" / "target"
    argv = ["java", "-cp", f"{java}/classes:{java}/lib/*", "compat.Compat", "http"]
    report.add_lines(await run_program(argv, env))
    _check_large(report)
    report.check()
