"""The broker's own vault login, method by method, against a real OpenBao.

Every test configures its own auth mount (a unique path, so tests sharing the session
OpenBao never see each other's roles) with hvac, then logs in through `VaultClient` exactly
as the broker does, and checks what OpenBao saw. No test lets a token, secret_id, wrapping
token or JWT appear in a message, a log line or the audit trail.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import hvac
import jwt as pyjwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from broker.credentials.vault import VaultClient
from broker.credentials.vault_auth import (
    AppRoleLogin,
    CertLogin,
    FileCertificate,
    JwtLogin,
    KubernetesLogin,
    LoginMethod,
    TokenLogin,
    WrappingTokenRefused,
)
from broker.errors import CredentialUnavailable
from broker.observe.audit import AuditLog
from broker.observe.metrics import Metrics
from tests.openbao_tls import TlsOpenBao
from tests.pki import SERVER_ID, Pki
from tests.servers import OpenBao, free_port
from tests.tokenreview import TokenReviewer
from tests.vault_roles import BROKER_POLICY, approle, broker_policy, unique, write_secret_id

DEADLINE_SECONDS = 30.0


@pytest.fixture
async def clients() -> AsyncIterator[list[VaultClient]]:
    """VaultClients a test makes; all closed (and their tokens revoked) at the end."""
    made: list[VaultClient] = []
    yield made
    for client in made:
        await client.close()


def client_for(
    made: list[VaultClient],
    bao: OpenBao | TlsOpenBao,
    login: LoginMethod,
    *,
    audit: AuditLog | None = None,
    metrics: Metrics | None = None,
    **kwargs: Any,
) -> VaultClient:
    ca = getattr(bao, "ca_path", None)
    client = VaultClient(
        kwargs.pop("address", bao.address),
        login=login,
        ca=ca,
        audit=audit,
        metrics=metrics,
        timeout=5.0,
        **kwargs,
    )
    made.append(client)
    return client


def lookup(bao: OpenBao | TlsOpenBao, accessor: str) -> dict[str, Any]:
    data: dict[str, Any] = bao.client().auth.token.lookup_accessor(accessor)["data"]
    return data


def audit_events(path: Path, event: str | None = None) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    events = [json.loads(line) for line in path.read_text().splitlines()]
    return [e for e in events if event is None or e["event"] == event]


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


async def eventually(predicate: Any, what: str, deadline: float = DEADLINE_SECONDS) -> None:
    end = time.monotonic() + deadline
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > end:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


# ---------------------------------------------------------------------------------- approle


async def test_approle_login_reads_and_names_the_role(
    openbao: OpenBao, tmp_path: Path, clients: list[VaultClient], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="sidekey")
    mount, role_id_file, secret_id_file = approle(openbao, tmp_path, token_ttl="5m")
    audit = AuditLog(tmp_path / "audit.jsonl")
    login = AppRoleLogin(mount, role_id_file=role_id_file, secret_id_file=secret_id_file)
    vault = client_for(clients, openbao, login, audit=audit)

    fields, _ = await vault.read_kv("secret", "auth-test/app")
    assert fields == {"k": "v"}
    (event,) = audit_events(tmp_path / "audit.jsonl", "vault_login")
    assert event["outcome"] == "ok" and event["method"] == "approle"
    seen = lookup(openbao, event["accessor"])
    assert seen["path"] == f"auth/{mount}/login"
    assert seen["policies"] == ["sidekey-broker"]
    secret_id = secret_id_file.read_text()
    for text in (caplog.text, (tmp_path / "audit.jsonl").read_text(), repr(vault)):
        assert secret_id not in text

    await vault.close()
    # Revoked at shutdown (the broker logged in for it), and the trail says so.
    with pytest.raises(hvac.exceptions.InvalidRequest):
        lookup(openbao, event["accessor"])
    (revoked,) = audit_events(tmp_path / "audit.jsonl", "vault_token_revoked")
    assert revoked["accessor"] == event["accessor"] and revoked["outcome"] == "ok"


async def test_approle_refused_says_what_to_fix_without_the_secret(
    openbao: OpenBao, tmp_path: Path, clients: list[VaultClient]
) -> None:
    mount, role_id_file, secret_id_file = approle(openbao, tmp_path)
    secret_id_file.write_text("not-the-secret-id-" + secrets.token_hex(8))
    login = AppRoleLogin(mount, role_id_file=role_id_file, secret_id_file=secret_id_file)
    vault = client_for(clients, openbao, login)
    with pytest.raises(CredentialUnavailable) as info:
        await vault.read_kv("secret", "auth-test/app")
    message = str(info.value)
    assert "approle auth" in message and str(secret_id_file) in message
    assert "invalid role or secret ID" in message  # what OpenBao said
    assert secret_id_file.read_text() not in message
    assert role_id_file.read_text().strip() not in message
    assert not vault.ready and "approle" in vault.status()["error"]


async def test_wrapped_secret_id_is_unwrapped_once_and_a_used_one_refused(
    openbao: OpenBao, tmp_path: Path, clients: list[VaultClient]
) -> None:
    mount, role_id_file, secret_id_file = approle(openbao, tmp_path, wrapped=True, token_ttl="5m")
    wrapping_token = secret_id_file.read_text()
    audit_path = tmp_path / "audit.jsonl"
    login = AppRoleLogin(
        mount, role_id_file=role_id_file, secret_id_file=secret_id_file, wrapped=True
    )
    first = client_for(clients, openbao, login, audit=AuditLog(audit_path))
    await first.check()
    # A later login of the same broker uses the secret_id it unwrapped (kept in memory):
    # revoke its token from outside and it logs in again without a second unwrap.
    (event,) = audit_events(audit_path, "vault_login")
    openbao.client().auth.token.revoke_accessor(event["accessor"])
    await first.check()
    logins = [e for e in audit_events(audit_path, "vault_login") if e["outcome"] == "ok"]
    assert len(logins) == 2 and logins[0]["accessor"] != logins[1]["accessor"]

    # Another broker (or an attacker's copy) reading the same wrapping token is refused,
    # and told that this means someone else read the secret_id.
    other_audit = tmp_path / "other-audit.jsonl"
    again = AppRoleLogin(
        mount, role_id_file=role_id_file, secret_id_file=secret_id_file, wrapped=True
    )
    second = client_for(clients, openbao, again, audit=AuditLog(other_audit))
    with pytest.raises(CredentialUnavailable) as info:
        await second.check()
    message = str(info.value)
    assert "already unwrapped" in message and "someone else" in message
    assert wrapping_token not in message
    (refused,) = audit_events(other_audit, "vault_wrapping_token_refused")
    assert refused["outcome"] == "refused" and wrapping_token not in json.dumps(refused)

    # A freshly wrapped secret_id written to the file is unwrapped at the next login.
    write_secret_id(openbao, mount, secret_id_file, wrapped=True)
    await eventually(lambda: second.ready, "login with the new wrapping token")
    await second.check()


async def test_wrapping_token_of_another_endpoint_is_refused(
    openbao: OpenBao, tmp_path: Path, clients: list[VaultClient]
) -> None:
    mount, role_id_file, secret_id_file = approle(openbao, tmp_path)
    # A wrapping token that wraps something else (a KV read), swapped in for the secret_id.
    root = openbao.client()
    broker_policy(openbao)
    wrapped = root.adapter.get("/v1/secret/data/auth-test/app", headers={"X-Vault-Wrap-TTL": "5m"})
    secret_id_file.write_text(wrapped["wrap_info"]["token"])
    login = AppRoleLogin(
        mount, role_id_file=role_id_file, secret_id_file=secret_id_file, wrapped=True
    )
    vault = client_for(clients, openbao, login)
    with pytest.raises(WrappingTokenRefused, match=r"not made by auth/.*/secret-id"):
        await vault.keeper.method.login(vault)
    # Refused before unwrapping: the wrapped response is still there for its owner.
    unwrapped = hvac.Client(url=openbao.address, token=wrapped["wrap_info"]["token"])
    assert unwrapped.sys.unwrap()["data"]["data"] == {"k": "v"}


# ------------------------------------------------------------------------------------ token


async def test_token_file_replaced_on_disk_is_used(
    openbao: OpenBao, tmp_path: Path, clients: list[VaultClient]
) -> None:
    policy = broker_policy(openbao)
    root = openbao.client()

    def new_token() -> str:
        auth = root.auth.token.create(policies=[policy], ttl="10m", no_parent=True)["auth"]
        return str(auth["client_token"])

    token_file = tmp_path / "token"
    token_file.write_text(new_token())
    vault = client_for(clients, openbao, TokenLogin(file=token_file))
    await vault.read_kv("secret", "auth-test/app")
    first = vault.keeper.generation
    old = token_file.read_text()

    # What Vault Agent does: write the new token next to the file and rename it over.
    replacement = tmp_path / "token.new"
    replacement.write_text(new_token())
    replacement.replace(token_file)
    root.auth.token.revoke(old)  # the old one is gone: only the new file's token works
    await eventually(lambda: vault.keeper.generation > first, "the new token file read")
    await vault.read_kv("secret", "auth-test/app")
    # Given tokens are not the broker's to revoke: close() leaves the current one alone.
    await vault.close()
    assert root.auth.token.lookup(token_file.read_text())["data"]["ttl"] > 0


async def test_given_token_that_is_revoked_fails_closed_with_the_fix(
    openbao: OpenBao, tmp_path: Path, clients: list[VaultClient]
) -> None:
    policy = broker_policy(openbao)
    root = openbao.client()
    token = root.auth.token.create(policies=[policy], ttl="10m")["auth"]["client_token"]
    token_file = tmp_path / "token"
    token_file.write_text(token)
    vault = client_for(clients, openbao, TokenLogin(file=token_file))
    await vault.read_kv("secret", "auth-test/app")
    root.auth.token.revoke(token)
    with pytest.raises(CredentialUnavailable) as info:
        await vault.read_kv("secret", "auth-test/app")
    message = str(info.value)
    assert "permission denied" in message and token not in message
    await eventually(lambda: not vault.ready, "readiness false")
    error = vault.status()["error"]
    assert f"write a valid token to {token_file}" in error and token not in error


async def test_token_revoked_from_outside_the_broker_logs_in_again(
    openbao: OpenBao, tmp_path: Path, clients: list[VaultClient]
) -> None:
    mount, role_id_file, secret_id_file = approle(openbao, tmp_path, token_ttl="10m")
    metrics = Metrics()
    audit_path = tmp_path / "audit.jsonl"
    login = AppRoleLogin(mount, role_id_file=role_id_file, secret_id_file=secret_id_file)
    vault = client_for(clients, openbao, login, metrics=metrics, audit=AuditLog(audit_path))
    await vault.read_kv("secret", "auth-test/app")
    (event,) = audit_events(audit_path, "vault_login")
    openbao.client().auth.token.revoke_accessor(event["accessor"])
    # The next call is refused with 403, the broker finds its token gone, logs in again
    # and repeats the call: the caller sees no failure.
    fields, _ = await vault.read_kv("secret", "auth-test/app")
    assert fields == {"k": "v"}
    assert sample(metrics, "sidekey_vault_logins_total", method="approle", outcome="ok") == 2
    (lost,) = audit_events(audit_path, "vault_token_invalid")
    assert lost["accessor"] == event["accessor"]


# -------------------------------------------------------------------------------- addresses


async def test_first_address_down_the_next_one_serves(
    openbao: OpenBao, tmp_path: Path, clients: list[VaultClient]
) -> None:
    mount, role_id_file, secret_id_file = approle(openbao, tmp_path)
    metrics = Metrics()
    dead = f"http://127.0.0.1:{free_port()}"
    login = AppRoleLogin(mount, role_id_file=role_id_file, secret_id_file=secret_id_file)
    vault = client_for(clients, openbao, login, address=[dead, openbao.address], metrics=metrics)
    await vault.read_kv("secret", "auth-test/app")
    assert vault.address == openbao.address
    assert sample(metrics, "sidekey_vault_address_changes_total", address=openbao.address) == 1


async def test_namespace_is_sent(
    openbao: OpenBao, tmp_path: Path, clients: list[VaultClient]
) -> None:
    namespace = unique("team")
    root = openbao.client()
    root.adapter.post(f"/v1/sys/namespaces/{namespace}")
    inside = hvac.Client(url=openbao.address, token=openbao.token, namespace=namespace)
    inside.sys.enable_secrets_engine("kv", path="secret", options={"version": "2"})
    inside.secrets.kv.v2.create_or_update_secret(path="auth-test/app", secret={"in": namespace})
    inside.sys.create_or_update_policy("sidekey-broker", BROKER_POLICY)
    inside.sys.enable_auth_method("approle")
    inside.auth.approle.create_or_update_approle(
        "sidekey", token_policies=["sidekey-broker"], token_no_default_policy=True
    )
    role_id = inside.auth.approle.read_role_id("sidekey")["data"]["role_id"]
    secret_id = inside.auth.approle.generate_secret_id("sidekey")["data"]["secret_id"]
    (tmp_path / "role-id").write_text(role_id)
    (tmp_path / "secret-id").write_text(secret_id)
    login = AppRoleLogin(
        "approle", role_id_file=tmp_path / "role-id", secret_id_file=tmp_path / "secret-id"
    )
    vault = client_for(clients, openbao, login, namespace=namespace)
    fields, _ = await vault.read_kv("secret", "auth-test/app")
    assert fields == {"in": namespace}


# ------------------------------------------------------------------------------------- cert


def cert_role(bao: TlsOpenBao, pki: Pki, allowed: str, **role: Any) -> str:
    """Mount cert auth at a unique path; role "sidekey" trusts the test CA for `allowed`."""
    root = bao.client()
    mount = unique("cert")
    root.sys.enable_auth_method("cert", path=mount)
    root.auth.cert.create_ca_certificate_role(
        name="sidekey",
        certificate=pki.bundle.read_text(),
        allowed_uri_sans=[allowed],
        token_policies=[broker_policy(bao)],
        token_no_default_policy=True,
        mount_point=mount,
        **role,
    )
    return mount


def svid_files(tmp_path: Path, issued: Any) -> tuple[Path, Path]:
    """Copy an SVID to files the test may rotate (atomic replace, as SPIRE helpers do)."""
    cert, key = tmp_path / "svid.pem", tmp_path / "svid-key.pem"
    for src, dst in ((issued.cert, cert), (issued.key, key)):
        tmp = dst.with_suffix(".tmp")
        tmp.write_bytes(Path(src).read_bytes())
        tmp.chmod(0o600)
        tmp.replace(dst)
    return cert, key


def serial_of(path: Path) -> str:
    from cryptography import x509

    return str(x509.load_pem_x509_certificate(path.read_bytes()).serial_number)


async def test_cert_login_renews_and_uses_a_rotated_svid(
    openbao_tls: TlsOpenBao, pki: Pki, tmp_path: Path, clients: list[VaultClient]
) -> None:
    # A 3 s TTL: the broker renews within the test, and OpenBao checks at every renewal that
    # the connection presents the login's certificate (or one of the same issuer).
    mount = cert_role(openbao_tls, pki, SERVER_ID, token_ttl="3s", token_max_ttl="1h")
    cert, key = svid_files(tmp_path, pki.server)
    metrics = Metrics()
    audit_path = tmp_path / "audit.jsonl"
    login = CertLogin(mount, "sidekey", FileCertificate(cert, key))
    vault = client_for(clients, openbao_tls, login, metrics=metrics, audit=AuditLog(audit_path))
    await vault.read_kv("secret", "auth-test/app")
    (event,) = audit_events(audit_path, "vault_login")
    assert event["subject"] == SERVER_ID
    assert lookup(openbao_tls, event["accessor"])["meta"]["serial_number"] == serial_of(cert)
    await eventually(
        lambda: sample(metrics, "sidekey_vault_token_renewals_total", outcome="ok") >= 2,
        "two renewals",
    )
    assert sample(metrics, "sidekey_vault_token_renewals_total", outcome="error") == 0

    # SVID rotation: a new certificate and key for the same ID. The next login uses it.
    rotated = pki.mint("rotated-broker", uri_sans=[SERVER_ID])
    svid_files(tmp_path, rotated)
    openbao_tls.client().auth.token.revoke_accessor(event["accessor"])
    await vault.read_kv("secret", "auth-test/app")
    second = [e for e in audit_events(audit_path, "vault_login") if e["outcome"] == "ok"][-1]
    assert second["accessor"] != event["accessor"]
    assert lookup(openbao_tls, second["accessor"])["meta"]["serial_number"] == serial_of(cert)
    # ...and renewals after the rotation still present a certificate OpenBao accepts.
    renewed = sample(metrics, "sidekey_vault_token_renewals_total", outcome="ok")
    await eventually(
        lambda: sample(metrics, "sidekey_vault_token_renewals_total", outcome="ok") > renewed,
        "a renewal with the rotated SVID",
    )


async def test_cert_login_refused_names_the_spiffe_id_and_the_fix(
    openbao_tls: TlsOpenBao, pki: Pki, tmp_path: Path, clients: list[VaultClient]
) -> None:
    mount = cert_role(openbao_tls, pki, "spiffe://example.org/someone-else")
    login = CertLogin(mount, "sidekey", FileCertificate(pki.server.cert, pki.server.key))
    vault = client_for(clients, openbao_tls, login)
    with pytest.raises(CredentialUnavailable) as info:
        await vault.check()
    message = str(info.value)
    assert f"cert auth: no role 'sidekey' at auth/{mount} matches the certificate" in message
    assert SERVER_ID in message and "allowed_uri_sans" in message
    assert "OpenBao said:" in message


async def test_cert_from_memory_needs_no_file(
    openbao_tls: TlsOpenBao, pki: Pki, clients: list[VaultClient]
) -> None:
    """An SVID held in memory (the Workload API's) is presented through a memfd."""
    from contextlib import AbstractContextManager

    from broker.credentials.vault_auth import memory_files, spiffe_id_of

    class InMemory:
        def __init__(self) -> None:
            self.cert = Path(pki.server.cert).read_bytes()
            self.key = Path(pki.server.key).read_bytes()

        def files(self) -> AbstractContextManager[tuple[str, str]]:
            return memory_files(self.cert, self.key)

        def spiffe_id(self) -> str:
            return spiffe_id_of(self.cert)

    mount = cert_role(openbao_tls, pki, SERVER_ID)
    vault = client_for(clients, openbao_tls, CertLogin(mount, None, InMemory()))
    await vault.read_kv("secret", "auth-test/app")


# -------------------------------------------------------------------------------------- jwt


class Issuer:
    """A JWT issuer of the test's own: a P-256 key whose public half OpenBao trusts."""

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.public_pem = (
            self.key.public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            .decode()
        )

    def mint(self, sub: str, aud: str, seconds: int = 300) -> str:
        now = int(time.time())
        claims = {"sub": sub, "aud": aud, "iat": now, "nbf": now, "exp": now + seconds}
        return pyjwt.encode(claims, self.key, algorithm="ES256")


def jwt_role(bao: OpenBao, issuer: Issuer, subject: str, audience: str = "openbao") -> str:
    root = bao.client()
    mount = unique("jwt")
    root.sys.enable_auth_method("jwt", path=mount)
    root.auth.jwt.configure(jwt_validation_pubkeys=[issuer.public_pem], path=mount)
    root.auth.jwt.create_role(
        name="sidekey",
        role_type="jwt",
        user_claim="sub",
        bound_subject=subject,
        bound_audiences=[audience],
        allowed_redirect_uris=[],
        token_policies=[broker_policy(bao)],
        token_no_default_policy=True,
        path=mount,
    )
    return mount


async def test_jwt_login_with_a_token_file_reread_at_each_login(
    openbao: OpenBao, tmp_path: Path, clients: list[VaultClient]
) -> None:
    issuer = Issuer()
    mount = jwt_role(openbao, issuer, SERVER_ID)
    token_file = tmp_path / "jwt"
    token_file.write_text(issuer.mint(SERVER_ID, "openbao"))
    audit_path = tmp_path / "audit.jsonl"
    login = JwtLogin(mount, "sidekey", token_file=token_file)
    vault = client_for(clients, openbao, login, audit=AuditLog(audit_path))
    await vault.read_kv("secret", "auth-test/app")
    (event,) = audit_events(audit_path, "vault_login")
    assert event["subject"] == SERVER_ID
    # The projected token is rotated on disk; an expired one left behind would be refused.
    token_file.write_text(issuer.mint(SERVER_ID, "openbao"))
    openbao.client().auth.token.revoke_accessor(event["accessor"])
    await vault.read_kv("secret", "auth-test/app")
    assert len(audit_events(audit_path, "vault_login")) == 2
    assert token_file.read_text() not in (tmp_path / "audit.jsonl").read_text()


async def test_jwt_refused_says_which_role_and_subject(
    openbao: OpenBao, tmp_path: Path, clients: list[VaultClient]
) -> None:
    issuer = Issuer()
    mount = jwt_role(openbao, issuer, SERVER_ID)
    token_file = tmp_path / "jwt"
    token_file.write_text(issuer.mint(SERVER_ID, "some-other-audience"))
    vault = client_for(clients, openbao, JwtLogin(mount, "sidekey", token_file=token_file))
    with pytest.raises(CredentialUnavailable) as info:
        await vault.check()
    message = str(info.value)
    assert f"jwt auth: role 'sidekey' at auth/{mount} refused {token_file}" in message
    assert f"sub {SERVER_ID}" in message and "bound_audiences" in message
    assert token_file.read_text() not in message


# ------------------------------------------------------------------------------- kubernetes


async def test_kubernetes_login_rereads_the_service_account_token(
    openbao: OpenBao, tmp_path: Path, clients: list[VaultClient]
) -> None:
    """Against a TokenReview STAND-IN (tests/tokenreview.py): no Kubernetes API here."""
    reviewer = TokenReviewer()
    await reviewer.start()
    try:
        root = openbao.client()
        mount = unique("kubernetes")
        root.sys.enable_auth_method("kubernetes", path=mount)
        root.auth.kubernetes.configure(
            kubernetes_host=reviewer.url,
            kubernetes_ca_cert=reviewer.ca_pem,
            disable_local_ca_jwt=True,
            mount_point=mount,
        )
        root.adapter.post(
            f"/v1/auth/{mount}/role/sidekey",
            json={
                "bound_service_account_names": ["sidekey"],
                "bound_service_account_namespaces": ["prod"],
                "token_policies": [broker_policy(openbao)],
                "token_no_default_policy": True,
            },
        )
        token_file = tmp_path / "token"
        token_file.write_text(reviewer.mint("prod", "sidekey"))
        audit_path = tmp_path / "audit.jsonl"
        login = KubernetesLogin(mount, "sidekey", token_file)
        vault = client_for(clients, openbao, login, audit=AuditLog(audit_path))
        await vault.read_kv("secret", "auth-test/app")
        assert reviewer.reviews == [token_file.read_text()]
        (event,) = audit_events(audit_path, "vault_login")
        assert event["subject"] == "system:serviceaccount:prod:sidekey"

        # The kubelet rotates the token in place; the next login sends the new one.
        token_file.write_text(reviewer.mint("prod", "sidekey"))
        root.auth.token.revoke_accessor(event["accessor"])
        await vault.read_kv("secret", "auth-test/app")
        assert reviewer.reviews[-1] == token_file.read_text() != reviewer.reviews[0]

        # A service account the role does not bind is refused, with what to check.
        token_file.write_text(reviewer.mint("prod", "intruder"))
        other = client_for(clients, openbao, KubernetesLogin(mount, "sidekey", token_file))
        with pytest.raises(CredentialUnavailable) as info:
            await other.check()
        message = str(info.value)
        assert "kubernetes auth: role 'sidekey'" in message
        assert "system:serviceaccount:prod:intruder" in message
        assert "bound_service_account_names" in message
        assert token_file.read_text() not in message
    finally:
        await reviewer.stop()


async def test_broker_cert_login_follows_its_rotated_svid(
    openbao_tls: TlsOpenBao, pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through a running broker: cert auth presents the SVID of the broker's identity
    material (tls.cert/tls.key, watched for change), held in memory; after the files rotate,
    the next login presents the new certificate."""
    from tests.brokers import base_config, running_broker

    mount = cert_role(openbao_tls, pki, SERVER_ID, token_ttl="10m")
    cert, key = svid_files(tmp_path, pki.server)
    monkeypatch.setenv("SIDEKEY_TEST_API_TOKEN", "t")
    service = {
        "name": "api",
        "adapter": "http",
        "listen": "127.0.0.1:0",
        "upstream": {"url": "http://127.0.0.1:9"},
        "credentials": {"from": "env", "fields": {"token": "SIDEKEY_TEST_API_TOKEN"}},
        "inject": {"headers": {"Authorization": "Bearer {token}"}},
        "allow": [SERVER_ID],
    }
    audit_path = tmp_path / "audit.jsonl"
    config = base_config(pki, services=[service], audit=audit_path)
    config["tls"] = {"cert": str(cert), "key": str(key)}
    config["vault"] = {
        "address": openbao_tls.address,
        "ca": str(openbao_tls.ca_path),
        "auth": {"method": "cert", "mount": mount, "role": "sidekey"},
    }
    async with running_broker(tmp_path, config) as broker:
        assert broker.vault is not None
        await broker.vault.check()
        (first,) = audit_events(audit_path, "vault_login")
        assert first["subject"] == SERVER_ID
        assert lookup(openbao_tls, first["accessor"])["meta"]["serial_number"] == serial_of(cert)

        svid_files(
            tmp_path, pki.mint("rotated-for-broker", uri_sans=[SERVER_ID], dns=["localhost"])
        )
        await eventually(
            lambda: (
                broker.identity.svid is not None
                and str(broker.identity.svid.leaf.serial_number) == serial_of(cert)
            ),
            "the identity material's new SVID",
        )
        openbao_tls.client().auth.token.revoke_accessor(first["accessor"])
        await broker.vault.check()  # 403, the token is gone: the broker logs in again
        second = [e for e in audit_events(audit_path, "vault_login") if e["outcome"] == "ok"][-1]
        assert second["accessor"] != first["accessor"]
        assert lookup(openbao_tls, second["accessor"])["meta"]["serial_number"] == serial_of(cert)
