"""moto's server as a real S3 (and IAM, STS) that checks every request's SigV4 signature.

`moto_server` runs with ``INITIAL_NO_AUTH_ACTION_COUNT=0``: no request is served without a
valid signature from keys moto's own IAM knows. To make the first keys, the fixture opens a
window of a few unauthenticated actions through moto's admin API (``/moto-api/reset-auth``),
creates an IAM user with an S3 policy and an access key, a role that user may assume, and
closes the window again (``0``) before any test runs: from then on a wrong key, a wrong
secret or a stale session token fails with moto's 403.

    def test_x(moto):
        moto.keys.access_key_id, moto.keys.secret_access_key
        moto.temporary()   # access key, secret, session token of an assumed role
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import pytest

from tests.servers import POLL_SECONDS, VENV_BIN, _stop_pid, free_port

START_SECONDS = 60.0
REGION = "us-east-1"
USER = "sidekey-broker"
ROLE = "sidekey-s3"
S3_POLICY = json.dumps(
    {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": ["s3:*", "sts:*"], "Resource": "*"}],
    }
)


@dataclass(frozen=True)
class Keys:
    access_key_id: str
    secret_access_key: str = field(repr=False)
    session_token: str | None = field(default=None, repr=False)

    def fields(self) -> dict[str, str]:
        out = {"access_key_id": self.access_key_id, "secret_access_key": self.secret_access_key}
        if self.session_token:
            out["session_token"] = self.session_token
        return out


@dataclass
class Moto:
    url: str
    keys: Keys
    role_arn: str
    workdir: Path
    proc: subprocess.Popen[bytes] = field(repr=False)

    def client(self, service: str, keys: Keys | None = None) -> Any:
        keys = keys or self.keys
        return boto3.client(
            service,
            endpoint_url=self.url,
            region_name=REGION,
            aws_access_key_id=keys.access_key_id,
            aws_secret_access_key=keys.secret_access_key,
            aws_session_token=keys.session_token,
        )

    def temporary(self) -> Keys:
        """Temporary credentials of the role (STS AssumeRole, signed with the user's keys)."""
        got = self.client("sts").assume_role(RoleArn=self.role_arn, RoleSessionName="sidekey")
        creds = got["Credentials"]
        return Keys(creds["AccessKeyId"], creds["SecretAccessKey"], creds["SessionToken"])

    def log(self) -> str:
        return (self.workdir / "moto.log").read_text(errors="replace")

    def stop(self) -> None:
        _stop_pid(self.proc)


def _reset_auth(url: str, count: int) -> None:
    request = urllib.request.Request(
        f"{url}/moto-api/reset-auth",
        data=str(count).encode(),
        method="POST",
        # Not a form: moto reads the raw body.
        headers={"Content-Type": "text/plain"},
    )
    with urllib.request.urlopen(request, timeout=10) as resp:
        assert resp.status == 200


def start_moto(workdir: Path) -> Moto:
    binary = VENV_BIN / "moto_server"
    if not binary.exists():
        pytest.skip("moto_server (moto[server]) is not installed")
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = (workdir / "moto.log").open("wb")
    proc = subprocess.Popen(
        [str(binary), "-H", "127.0.0.1", "-p", str(port)],
        cwd=workdir,
        env={
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(workdir),
            "INITIAL_NO_AUTH_ACTION_COUNT": "0",
            # moto must not find credentials or config of this machine's user.
            "AWS_CONFIG_FILE": "/dev/null",
            "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
        },
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    deadline = time.monotonic() + START_SECONDS
    while True:
        if proc.poll() is not None:
            text = (workdir / "moto.log").read_text(errors="replace")
            raise RuntimeError(f"moto_server exited with {proc.returncode}:\n{text}")
        try:
            with urllib.request.urlopen(f"{url}/moto-api/data.json", timeout=1):
                break
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"moto_server not up after {START_SECONDS}s")
        time.sleep(POLL_SECONDS)
    try:
        # The bootstrap window: exactly the actions below go unauthenticated, then none.
        _reset_auth(url, 5)
        iam = boto3.client(
            "iam",
            endpoint_url=url,
            region_name=REGION,
            aws_access_key_id="bootstrap",
            aws_secret_access_key="bootstrap",
        )
        iam.create_user(UserName=USER)
        iam.put_user_policy(UserName=USER, PolicyName="s3", PolicyDocument=S3_POLICY)
        key = iam.create_access_key(UserName=USER)["AccessKey"]
        trust = {"Version": "2012-10-17", "Statement": [{
            "Effect": "Allow", "Principal": {"AWS": f"arn:aws:iam::123456789012:user/{USER}"},
            "Action": "sts:AssumeRole"}]}  # fmt: skip
        role = iam.create_role(RoleName=ROLE, AssumeRolePolicyDocument=json.dumps(trust))
        iam.put_role_policy(RoleName=ROLE, PolicyName="s3", PolicyDocument=S3_POLICY)
        _reset_auth(url, 0)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    keys = Keys(key["AccessKeyId"], key["SecretAccessKey"])
    return Moto(url, keys, role["Role"]["Arn"], workdir, proc)


@pytest.fixture(scope="session")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Moto]:
    """One moto server for the session, signatures enforced (see the module docstring)."""
    server = start_moto(tmp_path_factory.mktemp("moto"))
    try:
        yield server
    finally:
        server.stop()
