"""AWS SigV4 re-signing through the HTTP adapter: boto3 and the AWS CLI with no credentials of
their own, through the broker, against moto's S3 with every signature checked.

The keys are an IAM user's made in moto (tests/moto_server.py) and stored in OpenBao KV; the
clients sign nothing (boto3 ``signature_version=UNSIGNED``, ``aws --no-sign-request``) or
sign with made-up keys, and the broker signs every request again with botocore's signer. A
wrong secret in KV fails at moto: the signature is really checked.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import botocore
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from broker.runtime import Broker
from tests.brokers import audit_events, base_config, running_broker
from tests.moto_server import REGION, Keys, Moto
from tests.pki import DEFAULT_CLIENT_ID, Pki, client_ssl_context
from tests.servers import VENV_BIN, OpenBao
from tests.test_http_adapter import call, put_secret

SERVICE = "s3"
pytestmark = pytest.mark.timeout(240)


@dataclass
class S3Proxy:
    broker: Broker
    url: str
    audit_path: Path
    pki: Pki

    def client(self, *, keys: Keys | None = None, **config: Any) -> Any:
        """boto3's S3 client pointed at the broker, with its X.509-SVID, signing nothing
        (or with `keys` that mean nothing to moto)."""
        client_cert = self.pki.client(DEFAULT_CLIENT_ID)
        signing: dict[str, Any] = (
            {"aws_access_key_id": keys.access_key_id,
             "aws_secret_access_key": keys.secret_access_key}
            if keys else {}
        )  # fmt: skip
        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.url,
            region_name=REGION,
            verify=str(self.pki.bundle),
            config=Config(
                signature_version="s3v4" if keys else botocore.UNSIGNED,
                client_cert=(str(client_cert.cert), str(client_cert.key)),
                s3={"addressing_style": "path"},
                retries={"max_attempts": 1},
                **config,
            ),
            **signing,
        )

    def requests(self) -> list[dict[str, Any]]:
        return audit_events(self.audit_path, "request")


def s3_service(moto: Moto, kv_path: str, **sigv4: Any) -> dict[str, Any]:
    return {
        "name": SERVICE,
        "adapter": "http",
        "listen": "127.0.0.1:0",
        "client_auth": "mtls",
        "upstream": {"url": moto.url},
        "credentials": {"from": "vault-kv", "path": kv_path},
        "inject": {"aws_sigv4": {"service": "s3", "region": REGION, **sigv4}},
        "allow": [DEFAULT_CLIENT_ID],
    }


def kv_keys(openbao: OpenBao, keys: Keys) -> str:
    path = f"sidekey-s3/{uuid.uuid4().hex}"
    put_secret(openbao, path, **keys.fields())
    return path


@dataclass
class Env:
    tmp_path: Path
    pki: Pki
    openbao: OpenBao
    monkeypatch: pytest.MonkeyPatch
    moto: Moto

    @asynccontextmanager
    async def proxy(self, keys: Keys | None = None, **sigv4: Any) -> AsyncIterator[S3Proxy]:
        kv = kv_keys(self.openbao, keys or self.moto.keys)
        audit = self.tmp_path / "audit.jsonl"
        config = base_config(self.pki, services=[s3_service(self.moto, kv, **sigv4)],
                             vault=self.openbao, audit=audit)  # fmt: skip
        async with running_broker(self.tmp_path, config, self.monkeypatch,
                                  vault=self.openbao) as broker:  # fmt: skip
            yield S3Proxy(broker, f"https://localhost:{broker.address(SERVICE).rsplit(':')[1]}",
                          audit, self.pki)  # fmt: skip


@pytest.fixture
def env(
    tmp_path: Path, pki: Pki, openbao: OpenBao, monkeypatch: pytest.MonkeyPatch, moto: Moto
) -> Env:
    return Env(tmp_path, pki, openbao, monkeypatch, moto)


def bucket() -> str:
    return f"sidekey-{uuid.uuid4().hex[:12]}"


async def in_thread(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """boto3 is blocking; the broker runs on this test's event loop."""
    return await asyncio.to_thread(fn, *args, **kwargs)


async def get_body(s3: Any, bucket: str, key: str) -> tuple[bytes, dict[str, Any]]:
    """An object's body and response, read off the loop (the body streams from the broker)."""

    def get() -> tuple[bytes, dict[str, Any]]:
        got = s3.get_object(Bucket=bucket, Key=key)
        return got["Body"].read(), got

    result: tuple[bytes, dict[str, Any]] = await asyncio.to_thread(get)
    return result


def test_moto_enforces_signatures(moto: Moto) -> None:
    """The server really checks: no signature, or a wrong secret, is refused."""
    unsigned = boto3.client("s3", endpoint_url=moto.url, region_name=REGION,
                            config=Config(signature_version=botocore.UNSIGNED))  # fmt: skip
    with pytest.raises(ClientError):
        unsigned.list_buckets()  # moto 5.2 answers 500 (a KeyError on Authorization), not 403
    wrong = Keys(moto.keys.access_key_id, "wrong" + moto.keys.secret_access_key[5:])
    with pytest.raises(ClientError) as refused:
        moto.client("s3", wrong).list_buckets()
    assert refused.value.response["Error"]["Code"] == "SignatureDoesNotMatch"
    moto.client("s3").list_buckets()


async def test_boto3_without_credentials_through_the_broker(env: Env) -> None:
    name = bucket()
    body = os.urandom(300_000)
    async with env.proxy() as p:
        s3 = p.client()
        await in_thread(s3.create_bucket, Bucket=name)
        await in_thread(s3.put_object, Bucket=name, Key="a/b c.bin", Body=body,
                        Metadata={"owner": "orders"})  # fmt: skip
        data, got = await get_body(s3, name, "a/b c.bin")
        assert data == body
        assert got["Metadata"] == {"owner": "orders"}
        listed = await in_thread(s3.list_objects_v2, Bucket=name, Prefix="a/")
        assert [o["Key"] for o in listed["Contents"]] == ["a/b c.bin"]
        await in_thread(s3.delete_object, Bucket=name, Key="a/b c.bin")
        statuses = [r["upstream_status"] for r in p.requests()]
        assert statuses and all(s in (200, 204) for s in statuses), statuses
    # What the broker made is what moto stored: read it back directly with the IAM keys.
    assert env.moto.client("s3").list_objects_v2(Bucket=name)["KeyCount"] == 0


async def test_client_signature_is_dropped_and_replaced(env: Env) -> None:
    """A client that signs with keys of its own (unknown to moto) still works: its
    Authorization and X-Amz-Date never reach moto, the broker's signature does."""
    name = bucket()
    async with env.proxy() as p:
        s3 = p.client(keys=Keys("AKIAFAKEFAKEFAKEFAKE", "fake-secret-" + "x" * 28))
        await in_thread(s3.create_bucket, Bucket=name)
        await in_thread(s3.put_object, Bucket=name, Key="k", Body=b"signed by the broker")
        assert (await get_body(s3, name, "k"))[0] == b"signed by the broker"


async def test_wrong_secret_in_the_vault_fails_at_s3(env: Env) -> None:
    wrong = Keys(env.moto.keys.access_key_id, "0" * 40)
    async with env.proxy(keys=wrong) as p:
        with pytest.raises(ClientError) as refused:
            await in_thread(p.client().list_buckets)
        assert refused.value.response["Error"]["Code"] == "SignatureDoesNotMatch"
        [request] = p.requests()
        assert request["upstream_status"] == 403


async def test_temporary_credentials_send_the_session_token(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    temporary = await in_thread(env.moto.temporary)
    assert temporary.access_key_id.startswith("ASIA")
    name = bucket()
    caplog.set_level(logging.DEBUG)  # botocore's signer logs its canonical request at DEBUG
    async with env.proxy(keys=temporary) as p:
        s3 = p.client()
        await in_thread(s3.create_bucket, Bucket=name)
        await in_thread(s3.put_object, Bucket=name, Key="t", Body=b"temporary")
        assert (await get_body(s3, name, "t"))[0] == b"temporary"
        trail = p.audit_path.read_text()
    for text in (caplog.text, trail):
        assert temporary.session_token and temporary.session_token not in text
        assert temporary.secret_access_key not in text
    # Without the token the same keys are refused: moto checks it.
    no_token = Keys(temporary.access_key_id, temporary.secret_access_key)
    async with env.proxy(keys=no_token) as p:
        with pytest.raises(ClientError) as refused:
            await in_thread(p.client().list_buckets)
        assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403


def _sized_file(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    with path.open("wb") as f:
        for _ in range(size // (1024 * 1024)):
            block = os.urandom(1024 * 1024)
            digest.update(block)
            f.write(block)
    return digest.hexdigest()


# boto3 sends uploads over https aws-chunked with a trailing checksum, which the broker signs
# as STREAMING-UNSIGNED-PAYLOAD-TRAILER; without that checksum a body is plain, and its hash
# must be signed.
PLAIN_BODIES = {"request_checksum_calculation": "when_required"}


async def test_multipart_upload_with_signed_parts(env: Env, tmp_path: Path) -> None:
    """Over http to moto the payload hash is signed: each 8 MiB part is read and hashed."""
    name = bucket()
    source = tmp_path / "big.bin"
    digest = _sized_file(source, 20 * 1024 * 1024)
    async with env.proxy() as p:
        s3 = p.client(**PLAIN_BODIES)
        await in_thread(s3.create_bucket, Bucket=name)
        await in_thread(s3.upload_file, str(source), name, "big.bin")
        out = tmp_path / "back.bin"
        await in_thread(s3.download_file, name, "big.bin", str(out))
        assert hashlib.sha256(out.read_bytes()).hexdigest() == digest
        assert any("uploadId" in r["path"] or r["method"] == "POST" for r in p.requests())


async def test_unsigned_payload_streams_a_large_body(env: Env, tmp_path: Path) -> None:
    """unsigned_payload: true sends UNSIGNED-PAYLOAD: a 40 MiB PUT streams through, more than
    max_signed_body_bytes would allow a signed one."""
    name = bucket()
    source = tmp_path / "stream.bin"
    digest = _sized_file(source, 40 * 1024 * 1024)
    async with env.proxy(unsigned_payload=True, max_signed_body_bytes=1024) as p:
        s3 = p.client(**PLAIN_BODIES)
        await in_thread(s3.create_bucket, Bucket=name)
        with source.open("rb") as f:
            await in_thread(s3.put_object, Bucket=name, Key="s", Body=f)
    got = env.moto.client("s3").get_object(Bucket=name, Key="s")["Body"].read()
    assert hashlib.sha256(got).hexdigest() == digest


async def test_signed_body_over_the_limit_is_refused_with_413(env: Env) -> None:
    name = bucket()
    async with env.proxy(max_signed_body_bytes=1024) as p:
        s3 = p.client(**PLAIN_BODIES)
        await in_thread(s3.create_bucket, Bucket=name)
        with pytest.raises(ClientError) as refused:
            await in_thread(s3.put_object, Bucket=name, Key="k", Body=b"x" * 4096)
        assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 413


@pytest.fixture
def aws_cli() -> Iterator[Path]:
    cli = VENV_BIN / "aws"
    if not cli.exists():
        pytest.skip("the AWS CLI (awscli) is not installed")
    yield cli


async def test_aws_cli_without_credentials(env: Env, aws_cli: Path, tmp_path: Path) -> None:
    """``aws s3`` with --no-sign-request, through a local (plain HTTP, loopback) listener: the
    sidecar shape, since the CLI cannot present a client certificate."""
    name = bucket()
    kv = kv_keys(env.openbao, env.moto.keys)
    service = s3_service(env.moto, kv)
    service.update(client_auth="local", local_identity=DEFAULT_CLIENT_ID)
    config = base_config(env.pki, services=[service], vault=env.openbao)
    source = tmp_path / "cli.bin"
    source.write_bytes(os.urandom(100_000))
    cli_env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "AWS_CONFIG_FILE": "/dev/null",
        "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
        "AWS_DEFAULT_REGION": REGION,
    }
    async with running_broker(tmp_path, config, env.monkeypatch, vault=env.openbao) as broker:
        endpoint = f"http://{broker.address(SERVICE)}"

        async def aws(*args: str) -> str:
            proc = await asyncio.create_subprocess_exec(
                str(aws_cli), "--no-sign-request", "--endpoint-url", endpoint, *args,
                env=cli_env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            out, err = await proc.communicate()
            assert proc.returncode == 0, err.decode()
            return out.decode()

        await aws("s3", "mb", f"s3://{name}")
        await aws("s3", "cp", str(source), f"s3://{name}/cli.bin")
        listing = await aws("s3", "ls", f"s3://{name}/")
        assert "cli.bin" in listing
        back = tmp_path / "back.bin"
        await aws("s3", "cp", f"s3://{name}/cli.bin", str(back))
        assert back.read_bytes() == source.read_bytes()


async def test_presigned_query_dropped_and_chunk_signed_body_refused(env: Env) -> None:
    name = bucket()
    env.moto.client("s3").create_bucket(Bucket=name)
    ctx = client_ssl_context(env.pki, env.pki.client())
    async with env.proxy() as p:
        # A presigned URL's own signature (made by someone else) is not what moto checks.
        query = (
            "X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAX%2F20260101%2Fus-east-1"
            "%2Fs3%2Faws4_request&X-Amz-Signature=00ff&X-Amz-SignedHeaders=host&list-type=2"
        )
        listed = await call(ctx, f"{p.url}/{name}?{query}")
        assert listed.status == 200, listed.body
        assert b"<ListBucketResult" in listed.body
        # Per-chunk signatures chain from the client's seed signature: not re-signable.
        refused = await call(
            ctx, f"{p.url}/{name}/chunked", "PUT", data=b"0;chunk-signature=00\r\n\r\n",
            headers={"x-amz-content-sha256": "STREAMING-AWS4-HMAC-SHA256-PAYLOAD"},
        )  # fmt: skip
        assert refused.status == 400
        assert b"cannot be re-signed" in refused.body


async def test_other_services_sign_the_body_hash(env: Env) -> None:
    """A service other than S3 (STS, a form-encoded POST API) signs with the body's hash: moto
    recomputes it, so the body the broker read and hashed is the one it sent, and it answers
    as the IAM user whose keys are in KV."""
    kv = kv_keys(env.openbao, env.moto.keys)
    service = s3_service(env.moto, kv)
    service["inject"] = {"aws_sigv4": {"service": "sts", "region": REGION}}
    config = base_config(env.pki, services=[service], vault=env.openbao)
    async with running_broker(env.tmp_path, config, env.monkeypatch, vault=env.openbao) as broker:
        client_cert = env.pki.client(DEFAULT_CLIENT_ID)
        sts = boto3.session.Session().client(
            "sts",
            endpoint_url=f"https://localhost:{broker.address(SERVICE).rsplit(':')[1]}",
            region_name=REGION,
            verify=str(env.pki.bundle),
            config=Config(signature_version=botocore.UNSIGNED, retries={"max_attempts": 1},
                          client_cert=(str(client_cert.cert), str(client_cert.key))),
        )  # fmt: skip
        me = await in_thread(sts.get_caller_identity)
        assert me["Arn"] == "arn:aws:iam::123456789012:user/sidekey-broker"
