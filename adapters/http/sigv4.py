"""``inject: {aws_sigv4: {service: s3, region: us-east-1}}``: every request re-signed with
AWS Signature Version 4, by botocore's own signer, with keys from the credential.

The credential's fields are ``access_key_id`` and ``secret_access_key`` and, for temporary
credentials, ``session_token`` (sent as ``X-Amz-Security-Token``); OpenBao's AWS engine
spells them ``access_key``, ``secret_key`` and ``security_token``, which are read too.

Whatever signature the client made is dropped before signing: its ``Authorization``,
``X-Amz-Date``, ``X-Amz-Security-Token`` and any presigned-URL parameters (``X-Amz-Signature``
and its companions in the query). The other ``X-Amz-*`` headers (metadata, checksums, ACLs)
are forwarded and signed.

The payload hash (``x-amz-content-sha256``, which S3 requires and which the signature covers):

- a hash the client sent (64 hex digits) is kept: the service checks the body against it;
- a body sent aws-chunked with a trailing checksum (``x-amz-trailer``, as boto3 sends
  uploads over https) is ``STREAMING-UNSIGNED-PAYLOAD-TRAILER``;
- a body with ``unsigned_payload`` (the default for S3 over https) is ``UNSIGNED-PAYLOAD``
  and streams through untouched;
- any other body is read (at most ``max_signed_body_bytes``) and hashed, which S3 over http
  and every other service require;
- no body: the hash of the empty string.

A body with per-chunk signatures (``STREAMING-AWS4-HMAC-SHA256-PAYLOAD``) would need every
chunk signed again with the broker's key: refused with 400, naming what to change.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from botocore.auth import S3SigV4Auth, SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from yarl import URL

from adapters.http.inject import HeaderInjector, Injector, InjectRefused, Outgoing, field_value
from broker.config import Section
from broker.credentials import Credential
from broker.errors import ConfigError

# Headers of the client's own signature: never forwarded (botocore sets the broker's).
SIGNATURE_HEADERS = frozenset({"authorization", "x-amz-date", "x-amz-security-token"})
# Presigned-URL query parameters (SigV4 in the query string): a client's, dropped.
PRESIGN_PARAMS = frozenset(
    p.lower()
    for p in (
        "X-Amz-Algorithm",
        "X-Amz-Credential",
        "X-Amz-Date",
        "X-Amz-Expires",
        "X-Amz-SignedHeaders",
        "X-Amz-Signature",
        "X-Amz-Security-Token",
    )
)
CONTENT_SHA256 = "x-amz-content-sha256"
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
STREAMING_UNSIGNED_TRAILER = "STREAMING-UNSIGNED-PAYLOAD-TRAILER"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
# A body whose hash must be signed is read whole before it is sent. S3's and the AWS CLI's
# multipart part size is 8 MiB by default; 16 MiB holds one with room, and bounds what one
# request can make the broker hold.
DEFAULT_MAX_SIGNED_BODY_BYTES = 16 * 1024 * 1024
MAX_SIGNED_BODY_LIMIT = 1024 * 1024 * 1024
# The fields of the credential, and how OpenBao's AWS secrets engine names the same ones.
ACCESS_KEY_FIELDS = ("access_key_id", "access_key")
SECRET_KEY_FIELDS = ("secret_access_key", "secret_key")
SESSION_TOKEN_FIELDS = ("session_token", "security_token")
# A service or region name: lower-case letters, digits and dashes (s3, execute-api, eu-west-3).
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-")
_HEX = frozenset("0123456789abcdef")


# botocore's signer logs each canonical request at DEBUG, and a canonical request carries the
# signed headers' values: the session token of temporary keys (X-Amz-Security-Token), and
# whatever the client sent. A broker run with --log-level debug must not write them: that
# logger says nothing else worth having (the signature it logs is derived from the secret).
logging.getLogger("botocore.auth").setLevel(logging.INFO)


class _Payload(SigV4Auth):
    """botocore's signer, with the payload hash decided by `SigV4Injector` (its own would
    read the body, or sign with UNSIGNED-PAYLOAD only for some https operations)."""

    def payload(self, request: AWSRequest) -> str:
        value: str = request.context["sidekey_payload"]
        return value

    def headers_to_sign(self, request: AWSRequest) -> Any:
        # botocore works this out twice per signature (canonical request, Authorization),
        # walking an email.message each time; the second is the first's (the headers do not
        # change in between).
        cached = request.context.get("sidekey_headers_to_sign")
        if cached is None:
            cached = request.context["sidekey_headers_to_sign"] = super().headers_to_sign(request)
        return cached


class _S3Signer(_Payload, S3SigV4Auth):
    """S3: paths are signed as sent (no normalisation), x-amz-content-sha256 always set."""


class _Signer(_Payload, SigV4Auth):
    """Every other service."""


class SigV4Injector(Injector):
    """Signs each request (see the module docstring)."""

    drop = SIGNATURE_HEADERS

    def __init__(
        self,
        origin: str,
        host: str,
        service: str,
        region: str,
        *,
        unsigned_payload: bool,
        max_signed_body: int,
        headers: HeaderInjector | None = None,
    ) -> None:
        self.origin = origin
        self.service, self.region = service, region
        self.unsigned_payload = unsigned_payload
        self.max_signed_body = max_signed_body
        self.headers = headers
        if headers is not None:
            self.drop = SIGNATURE_HEADERS | headers.drop
        self._signer_cls = _S3Signer if service == "s3" else _Signer
        self._host = host
        # The signer of the last credential: a cached credential is the same object until it
        # is refreshed, so the keys are read and checked once per credential.
        self._signer: tuple[Credential, SigV4Auth, tuple[str, ...]] | None = None

    async def apply(self, credential: Credential, out: Outgoing) -> None:
        signer, secrets = self._signer_for(credential)
        if self.headers is not None:
            await self.headers.apply(credential, out)
        payload = await self._payload(out)
        out.target = _strip_presign(out.target)
        request = AWSRequest(method=out.method, url=self.origin + out.target)
        headers = request.headers
        # Host as the upstream client will send it (botocore would parse the URL for it, twice
        # per signature); it is dropped again below, since that client sets it for its hop.
        headers["host"] = self._host
        for name, value in out.headers:
            headers.add_header(name, value)
        request.context["sidekey_payload"] = payload
        signer.add_auth(request)
        out.headers = [(n, v) for n, v in headers.items() if n != "host"]
        out.secrets += secrets

    def _signer_for(self, credential: Credential) -> tuple[SigV4Auth, tuple[str, ...]]:
        cached = self._signer
        if cached is not None and cached[0] is credential:
            return cached[1], cached[2]
        access_key = _first(credential, ACCESS_KEY_FIELDS)
        secret_key = _first(credential, SECRET_KEY_FIELDS)
        if access_key is None or secret_key is None:
            missing = ACCESS_KEY_FIELDS[0] if access_key is None else SECRET_KEY_FIELDS[0]
            raise InjectRefused(503, f"credential has no field {missing} (aws_sigv4)")
        token = _first(credential, SESSION_TOKEN_FIELDS)
        signer = self._signer_cls(Credentials(access_key, secret_key, token), self.service,
                                  self.region)  # fmt: skip
        # The secret key never goes on the wire; the session token does, in a header.
        secrets = (token,) if token else ()
        self._signer = (credential, signer, secrets)
        return signer, secrets

    async def _payload(self, out: Outgoing) -> str:
        sent = [v for n, v in out.headers if n.lower() == CONTENT_SHA256]
        if sent:
            out.headers = [(n, v) for n, v in out.headers if n.lower() != CONTENT_SHA256]
        if len(sent) > 1:
            raise InjectRefused(400, f"{CONTENT_SHA256} sent {len(sent)} times", "client")
        claimed = sent[0].strip() if sent else None
        if claimed is not None and claimed.startswith("STREAMING-AWS4-"):
            raise InjectRefused(
                400,
                f"{CONTENT_SHA256}: {claimed} (per-chunk signatures) cannot be re-signed by "
                "the broker; send the body unsigned or with its hash (the SDK's default when "
                "it has no credentials)",
                "client",
            )
        if claimed is not None and len(claimed) == 64 and set(claimed) <= _HEX:
            return claimed  # the service checks the body against it
        if out.body is None:
            return EMPTY_SHA256
        if claimed == STREAMING_UNSIGNED_TRAILER or any(
            n.lower() == "x-amz-trailer" for n, _ in out.headers
        ):
            return STREAMING_UNSIGNED_TRAILER
        if self.unsigned_payload:
            return UNSIGNED_PAYLOAD
        body = await self._read(out.body, out.content_length)
        out.body, out.content_length = _replay(body), len(body)
        return hashlib.sha256(body).hexdigest()

    async def _read(self, body: AsyncIterator[bytes], content_length: int | None) -> bytes:
        limit = self.max_signed_body
        if content_length is not None and content_length > limit:
            raise self._too_large()
        data = bytearray()
        async for chunk in body:
            data += chunk
            if len(data) > limit:
                raise self._too_large()
        return bytes(data)

    def _too_large(self) -> InjectRefused:
        return InjectRefused(
            413,
            f"a body signed for {self.service} must be read whole before it is sent, and this "
            f"one is over aws_sigv4.max_signed_body_bytes ({self.max_signed_body}); send it in "
            "parts (multipart upload)"
            + (" or set aws_sigv4.unsigned_payload: true" if self.service == "s3" else ""),
            "client",
        )


def parse_sigv4(inject: Section, url: URL, headers: HeaderInjector | None) -> SigV4Injector | None:
    """``inject.aws_sigv4``: None when absent; raises located ConfigErrors."""
    if not inject.has("aws_sigv4"):
        inject.raw("aws_sigv4", None)
        return None
    s = inject.section("aws_sigv4")
    service = _name(s, "service")
    region = _name(s, "region")
    unsigned = s.boolean("unsigned_payload", service == "s3" and url.scheme == "https")
    if unsigned and service != "s3":
        raise ConfigError(
            f"{s.at('unsigned_payload')}: only S3 accepts UNSIGNED-PAYLOAD; {service} needs "
            "the body's hash signed"
        )
    max_body = s.integer(
        "max_signed_body_bytes", 0, MAX_SIGNED_BODY_LIMIT, DEFAULT_MAX_SIGNED_BODY_BYTES
    )
    s.finish()
    if headers is not None:
        for h in headers.headers:
            if h.name.lower() in SIGNATURE_HEADERS:
                raise ConfigError(
                    f"{inject.at('headers')}.{h.name}: aws_sigv4 sets this header itself"
                )
    return SigV4Injector(
        str(url.origin()),
        # The Host header the upstream client sends (adapter.py: host_header).
        url.host_port_subcomponent or url.host or "",
        service,
        region,
        unsigned_payload=unsigned,
        max_signed_body=max_body,
        headers=headers,
    )


def _name(s: Section, key: str) -> str:
    value: str = s.text(key)
    if not set(value) <= _NAME_CHARS:
        raise ConfigError(f"{s.at(key)}: must be an AWS name like s3 or us-east-1, got {value!r}")
    return value


def _first(credential: Credential, names: tuple[str, ...]) -> str | None:
    for name in names:
        value = field_value(credential, name)
        if value:
            return value
    return None


def _strip_presign(target: str) -> str:
    path, sep, query = target.partition("?")
    if not sep:
        return target
    kept = [p for p in query.split("&") if p.partition("=")[0].lower() not in PRESIGN_PARAMS]
    return f"{path}?{'&'.join(kept)}" if kept else path


async def _replay(body: bytes) -> AsyncIterator[bytes]:
    yield body
