"""The broker's vault login with what real SPIRE issues it (tests/spire.py): cert auth with
its X.509-SVID, and JWT auth with its JWT-SVID, against OpenBao roles bound to the broker's
SPIFFE ID and trusting SPIRE's bundle."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jwt as pyjwt
import pytest
from cryptography.hazmat.primitives import serialization

from broker.credentials.vault import VaultClient
from broker.credentials.vault_auth import CertLogin, FileCertificate, JwtLogin, LoginMethod
from broker.observe.audit import AuditLog
from tests.openbao_tls import TlsOpenBao
from tests.spire import BROKER_ID, BROKER_UID, Spire
from tests.vault_roles import broker_policy, unique

AUDIENCE = "openbao"


def jwt_svid_keys(spire: Spire) -> list[str]:
    """SPIRE's JWT-SVID signing keys as PEM (OpenBao's jwt_validation_pubkeys)."""
    bundle = json.loads(spire.server("bundle", "show", "-format", "spiffe"))
    keys = [k for k in bundle["keys"] if k.get("use") == "jwt-svid"]
    assert keys, bundle
    return [
        pyjwt.PyJWK(k)
        .key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        .decode()
        for k in keys
    ]


@pytest.fixture
async def vault_for(openbao_tls: TlsOpenBao) -> AsyncIterator[Any]:
    made: list[VaultClient] = []

    def make(login: LoginMethod, audit: AuditLog) -> VaultClient:
        client = VaultClient(openbao_tls.address, login=login, ca=openbao_tls.ca_path, audit=audit)
        made.append(client)
        return client

    yield make
    for client in made:
        await client.close()


def logins(path: Path) -> list[dict[str, Any]]:
    events = [json.loads(line) for line in path.read_text().splitlines()]
    return [e for e in events if e["event"] == "vault_login" and e["outcome"] == "ok"]


async def test_cert_login_with_spires_x509_svid(
    spire: Spire, openbao_tls: TlsOpenBao, tmp_path: Path, vault_for: Any
) -> None:
    svid = spire.fetch_x509(tmp_path / "svid", uid=BROKER_UID)
    assert svid.spiffe_id == BROKER_ID
    root = openbao_tls.client()
    mount = unique("cert-spire")
    root.sys.enable_auth_method("cert", path=mount)
    root.auth.cert.create_ca_certificate_role(
        name="sidekey",
        certificate=spire.bundle_pem().decode(),
        allowed_uri_sans=[BROKER_ID],
        token_policies=[broker_policy(openbao_tls)],
        token_no_default_policy=True,
        mount_point=mount,
    )
    audit = tmp_path / "audit.jsonl"
    login = CertLogin(mount, "sidekey", FileCertificate(svid.cert, svid.key))
    vault = vault_for(login, AuditLog(audit))
    fields, _ = await vault.read_kv("secret", "auth-test/app")
    assert fields == {"k": "v"}
    (event,) = logins(audit)
    assert event["subject"] == BROKER_ID


async def test_jwt_login_with_spires_jwt_svid(
    spire: Spire, openbao_tls: TlsOpenBao, tmp_path: Path, vault_for: Any
) -> None:
    root = openbao_tls.client()
    mount = unique("jwt-spire")
    root.sys.enable_auth_method("jwt", path=mount)
    root.auth.jwt.configure(jwt_validation_pubkeys=jwt_svid_keys(spire), path=mount)
    root.auth.jwt.create_role(
        name="sidekey",
        role_type="jwt",
        user_claim="sub",
        bound_subject=BROKER_ID,
        bound_audiences=[AUDIENCE],
        allowed_redirect_uris=[],
        token_policies=[broker_policy(openbao_tls)],
        token_no_default_policy=True,
        path=mount,
    )
    token_file = tmp_path / "jwt-svid"
    token_file.write_text(spire.fetch_jwt(AUDIENCE, uid=BROKER_UID))
    audit = tmp_path / "audit.jsonl"
    vault = vault_for(JwtLogin(mount, "sidekey", token_file=token_file), AuditLog(audit))
    fields, _ = await vault.read_kv("secret", "auth-test/app")
    assert fields == {"k": "v"}
    (event,) = logins(audit)
    assert event["subject"] == BROKER_ID
    assert token_file.read_text() not in audit.read_text()
