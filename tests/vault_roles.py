"""Vault-side set-up the broker's own login needs, shared by the vault tests.

`BROKER_POLICY` is the policy docs/vault.md gives operators, word for word
(with the paths of the test services): roles made here set `token_no_default_policy`, so a
test passing with it shows the policy is complete.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

# The broker's token: look itself up, renew and revoke itself. Its leases: renew and revoke
# them. What its services read: one line each. The shared deny list (governance.deny_list).
BROKER_POLICY = """
path "auth/token/lookup-self" { capabilities = ["read"] }
path "auth/token/renew-self"  { capabilities = ["update"] }
path "auth/token/revoke-self" { capabilities = ["update"] }
path "sys/leases/renew"       { capabilities = ["update"] }
path "sys/leases/revoke"      { capabilities = ["update"] }
path "database/creds/app-rw"     { capabilities = ["read"] }
path "database/creds/app-short"  { capabilities = ["read"] }
path "secret/data/auth-test/*"   { capabilities = ["read"] }
path "secret/data/sidekey/deny"  { capabilities = ["read"] }
"""
POLICY_NAME = "sidekey-broker"


def unique(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


def broker_policy(bao: Any) -> str:
    """Write `BROKER_POLICY` (and the test KV secret it grants); returns the policy name."""
    root = bao.client()
    root.sys.create_or_update_policy(POLICY_NAME, BROKER_POLICY)
    root.secrets.kv.v2.create_or_update_secret(path="auth-test/app", secret={"k": "v"})
    return POLICY_NAME


def approle(
    bao: Any, directory: Path, *, wrapped: bool = False, **role: Any
) -> tuple[str, Path, Path]:
    """Mount AppRole at a unique path with role "sidekey" holding only the broker policy;
    write its role_id and a secret_id (or its wrapping token) to files in `directory`."""
    root = bao.client()
    mount = unique("approle")
    root.sys.enable_auth_method("approle", path=mount)
    root.auth.approle.create_or_update_approle(
        "sidekey",
        token_policies=[broker_policy(bao)],
        token_no_default_policy=True,
        mount_point=mount,
        **role,
    )
    role_id = root.auth.approle.read_role_id("sidekey", mount_point=mount)["data"]["role_id"]
    role_id_file, secret_id_file = directory / "role-id", directory / "secret-id"
    role_id_file.write_text(role_id + "\n")
    write_secret_id(bao, mount, secret_id_file, wrapped=wrapped)
    return mount, role_id_file, secret_id_file


def write_secret_id(bao: Any, mount: str, path: Path, *, wrapped: bool) -> str:
    """Generate a secret_id (wrapped: its wrapping token) and write it atomically to `path`."""
    root = bao.client()
    if wrapped:
        answer = root.auth.approle.generate_secret_id("sidekey", mount_point=mount, wrap_ttl="5m")
        value = answer["wrap_info"]["token"]
    else:
        answer = root.auth.approle.generate_secret_id("sidekey", mount_point=mount)
        value = answer["data"]["secret_id"]
    tmp = path.with_suffix(".tmp")
    tmp.write_text(value)
    tmp.replace(path)
    return str(value)
