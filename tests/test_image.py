"""The container image, checked as far as one machine without a container engine allows: the
Dockerfile's stages replayed into a fresh venv (tests/image.py), then run as the image's uid
on a read-only root file system (tests/pod.py) with HOME and TMPDIR as the image sets them.
hadolint checks the Dockerfile itself in `make lint`.
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from broker import __version__
from tests.image import BUILD_SECONDS, Image
from tests.pki import Pki
from tests.pod import Bind, Sandbox, require_root
from tests.servers import free_port

# The broker binds and answers /readyz within a second or two when idle; CI's box is shared.
START_SECONDS = 60.0
POLL_SECONDS = 0.1
CLI_SECONDS = 120.0

# The first test builds the image's venv (tests/image.py) inside its own time.
pytestmark = pytest.mark.timeout(BUILD_SECONDS + 300)


def test_the_wheel_is_installed_not_the_source_tree(image: Image):
    python = image.bin / "python"
    code = (
        "import broker, adapters, uvloop, importlib.metadata as m, json;"
        "d = m.distribution('sidekey');"
        "print(json.dumps([broker.__file__, adapters.__file__, d.read_text('direct_url.json'),"
        " d.version]))"
    )
    broker_file, adapters_file, direct_url, version = json.loads(
        subprocess.check_output([str(python), "-c", code], cwd="/", text=True, timeout=CLI_SECONDS)
    )
    site = str(image.venv / "lib")
    assert broker_file.startswith(site) and adapters_file.startswith(site)
    assert direct_url is None  # installed from a wheel file, not a source path or editable
    assert version == __version__
    # Bytecode compiled at install: a read-only root file system cannot take it later.
    assert list((Path(broker_file).parent / "__pycache__").glob("*.pyc"))


def _sandbox(image: Image, base: Path, binds: list[Bind], name: str) -> Sandbox:
    uid, gid = image.user
    return Sandbox(
        binds=binds,
        scratch=base / "scratch" / name,
        uid=uid,
        gid=gid,
        env={**image.env, "PATH": f"{image.bin}:/usr/bin:/bin"},
    )


@pytest.fixture
def workdir(image: Image) -> Iterator[Path]:
    path = image.base / f"run-{time.monotonic_ns()}"
    path.mkdir()
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def broker_config(workdir: Path, pki: Pki) -> Path:
    """An mTLS HTTP service in front of a local upstream, every file readable by the image's
    uid: the config dir that the image mounts at /etc/sidekey."""
    etc = workdir / "etc"
    etc.mkdir()
    for name, source in (
        ("bundle.pem", pki.bundle),
        ("broker.pem", pki.server.cert),
        ("broker-key.pem", pki.server.key),
    ):
        shutil.copy(source, etc / name)
        os.chmod(etc / name, 0o644)
    (etc / "api.yaml").write_text("token: t0ken\n")
    os.chmod(etc, 0o755)
    return etc


def _write_config(etc: Path, upstream_port: int, listen_port: int, admin_port: int) -> None:
    config = {
        "version": 1,
        "identity": {"trust_domain": "example.org", "x509_bundle": "bundle.pem"},
        "tls": {"cert": "broker.pem", "key": "broker-key.pem"},
        "admin": {"listen": f"127.0.0.1:{admin_port}"},
        "audit": {"file": "/var/log/sidekey/audit.jsonl"},
        "services": [
            {
                "name": "api",
                "adapter": "http",
                "listen": f"127.0.0.1:{listen_port}",
                "client_auth": "mtls",
                "upstream": {"url": f"http://127.0.0.1:{upstream_port}"},
                "credentials": {"from": "file", "path": "api.yaml"},
                "inject": {"headers": {"Authorization": "Bearer {token}"}},
                "allow": ["spiffe://example.org/ns/prod/sa/orders"],
            }
        ],
    }
    (etc / "sidekey.yaml").write_text(yaml.safe_dump(config))
    os.chmod(etc / "sidekey.yaml", 0o644)


def test_version_and_check_with_a_read_only_root(image: Image, workdir: Path, broker_config: Path):
    """`sidekey --version` (the HEALTHCHECK) and `sidekey check` as uid 10001 with / read-only,
    HOME=/nonexistent, and TMPDIR=/tmp both mounted and read-only."""
    require_root()
    _write_config(broker_config, free_port(), free_port(), free_port())
    etc = Bind("/etc/sidekey", broker_config, read_only=True)
    tmp = workdir / "tmp"
    tmp.mkdir(mode=0o1777)
    os.chmod(tmp, 0o1777)
    with_tmp = _sandbox(image, workdir, [etc, Bind("/tmp", tmp)], "with-tmp")
    without_tmp = _sandbox(image, workdir, [etc], "without-tmp")
    assert image.healthcheck == ["sidekey", "--version"]
    for sandbox in (with_tmp, without_tmp):
        done = _run(sandbox, image.healthcheck)
        assert done.stdout.strip() == f"sidekey {__version__}"
        done = _run(sandbox, ["sidekey", "check", "--config", "/etc/sidekey/sidekey.yaml"])
        assert done.stdout.strip() == "/etc/sidekey/sidekey.yaml: ok (1 services)"
        # The root file system really is read-only to it.
        denied = subprocess.run(
            sandbox.argv(["python", "-c", "open('/etc/sidekey-written', 'w')"]),
            capture_output=True, text=True, timeout=CLI_SECONDS, check=False,
        )  # fmt: skip
        assert "Read-only file system" in denied.stderr
    assert image.env["HOME"] == "/nonexistent"
    assert image.env["TMPDIR"] == "/tmp"
    assert list(tmp.iterdir()) == []


def _run(sandbox: Sandbox, command: list[str]) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        sandbox.argv(command), capture_output=True, text=True, timeout=CLI_SECONDS, check=False
    )
    assert done.returncode == 0, f"{command} exited {done.returncode}: {done.stderr}"
    return done


class _Upstream(http.server.BaseHTTPRequestHandler):
    seen: list[str | None] = []

    def do_GET(self) -> None:
        _Upstream.seen.append(self.headers.get("Authorization"))
        body = b"ok\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_image_serves_with_a_read_only_root(
    image: Image, workdir: Path, broker_config: Path, pki: Pki
):
    """The image's ENTRYPOINT + CMD as uid 10001, / read-only, only /tmp and the audit path
    writable: it serves an mTLS request with uvloop, writes the audit line where the config
    says, leaves /tmp empty, and drains on SIGTERM."""
    require_root()
    upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
    thread = threading.Thread(target=upstream.serve_forever, daemon=True)
    thread.start()
    listen_port, admin_port = free_port(), free_port()
    _write_config(broker_config, upstream.server_address[1], listen_port, admin_port)
    tmp, audit = workdir / "tmp", workdir / "audit"
    for path in (tmp, audit):
        path.mkdir()
        os.chmod(path, 0o1777)
    sandbox = _sandbox(
        image,
        workdir,
        [
            Bind("/etc/sidekey", broker_config, read_only=True),
            Bind("/tmp", tmp),
            Bind("/var/log/sidekey", audit),
        ],
        "serve",
    )
    log = workdir / "broker.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            sandbox.argv(image.entrypoint + image.cmd), stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    try:
        admin = f"http://127.0.0.1:{admin_port}"
        _wait_ready(f"{admin}/readyz", proc, log)
        metrics = urllib.request.urlopen(f"{admin}/metrics", timeout=5).read().decode()
        assert 'event_loop="uvloop ' in metrics
        client = pki.client()
        done = subprocess.run(
            ["curl", "-sS", "--fail", "--cacert", str(pki.bundle), "--cert", str(client.cert),
             "--key", str(client.key), f"https://localhost:{listen_port}/orders"],
            capture_output=True, text=True, timeout=CLI_SECONDS, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert done.stdout == "ok\n"
        assert _Upstream.seen[-1] == "Bearer t0ken"
    finally:
        proc.terminate()
        code = proc.wait(timeout=60)
        upstream.shutdown()
    output = log.read_text()
    assert code == 0, output
    assert "Read-only file system" not in output
    assert "Traceback" not in output
    lines = [json.loads(line) for line in (audit / "audit.jsonl").read_text().splitlines()]
    assert any(line.get("service") == "api" for line in lines)
    assert list(tmp.iterdir()) == []


def _wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the broker exited {proc.returncode}: {log.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(POLL_SECONDS)
    pytest.fail(f"not ready in {START_SECONDS}s: {log.read_text()}")
