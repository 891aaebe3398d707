"""OpenBao with a TLS listener, for what needs one: cert auth (the client certificate is
part of the TLS handshake) and `vault.ca`.

`bao server -dev -dev-tls` generates its own CA and a certificate for 127.0.0.1/localhost
into `-dev-tls-cert-dir`; the listener requests (but does not require) client certificates,
which is what the cert auth method reads. One server per test session:

    def test_cert(openbao_tls):
        openbao_tls.client().sys.enable_auth_method("cert", path="cert-x")
        VaultClient(openbao_tls.address, ..., ca=openbao_tls.ca_path)
"""

from __future__ import annotations

import os
import secrets
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import hvac
import pytest

from tests.servers import OPENBAO_START_SECONDS, POLL_SECONDS, _bao_binary, _stop_pid, free_port


@dataclass
class TlsOpenBao:
    """A running dev-mode OpenBao on https://127.0.0.1:<port>; `token` is its root token."""

    address: str
    token: str = field(repr=False)
    ca_path: Path
    workdir: Path
    proc: subprocess.Popen[bytes] = field(repr=False)

    def client(self, token: str | None = None) -> hvac.Client:
        return hvac.Client(
            url=self.address,
            token=self.token if token is None else token,
            verify=str(self.ca_path),
        )

    def stop(self) -> None:
        _stop_pid(self.proc)

    def log(self) -> str:
        return (self.workdir / "bao.log").read_text(errors="replace")


def start_openbao_tls(workdir: Path) -> TlsOpenBao:
    workdir.mkdir(parents=True, exist_ok=True)
    certs = workdir / "tls"
    certs.mkdir(exist_ok=True)
    token = "root-" + secrets.token_hex(16)
    port = free_port()
    env = {
        "HOME": str(workdir),
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "BAO_DISABLE_MLOCK": "true",
    }
    with (workdir / "bao.log").open("wb") as log:
        proc = subprocess.Popen(
            [
                _bao_binary(), "server", "-dev", "-dev-tls", f"-dev-tls-cert-dir={certs}",
                f"-dev-root-token-id={token}", f"-dev-listen-address=127.0.0.1:{port}",
                "-dev-no-store-token",
            ],
            cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    bao = TlsOpenBao(f"https://127.0.0.1:{port}", token, certs / "vault-ca.pem", workdir, proc)
    deadline = time.monotonic() + OPENBAO_START_SECONDS
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"OpenBao exited with {proc.returncode}:\n{bao.log()[-4000:]}")
        if bao.ca_path.exists():
            try:
                ctx = ssl.create_default_context(cafile=str(bao.ca_path))
                with urllib.request.urlopen(
                    f"{bao.address}/v1/sys/health", timeout=1, context=ctx
                ) as resp:
                    if resp.status == 200:
                        return bao
            except (urllib.error.URLError, OSError, ValueError, ssl.SSLError):
                pass
        if time.monotonic() > deadline:
            bao.stop()
            raise RuntimeError(f"OpenBao (TLS) not healthy after {OPENBAO_START_SECONDS}s")
        time.sleep(POLL_SECONDS)


@pytest.fixture(scope="session")
def openbao_tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsOpenBao]:
    """One dev-mode OpenBao with a TLS listener for the session (KV v2 at `secret/`)."""
    bao = start_openbao_tls(tmp_path_factory.mktemp("openbao-tls"))
    try:
        yield bao
    finally:
        bao.stop()
