"""The `vault` section: where OpenBao/Vault is and how the broker logs in to it.

```yaml
vault:
  address: [https://bao-0:8200, https://bao-1:8200]   # or one string
  ca: certs/vault-ca.pem
  namespace: team-a
  auth: {method: approle, role_id_file: ..., secret_id_file: ..., wrapped: true}
```

Every method takes `mount` (default: the method's name). Keys of another method are
refused by name, so a config meant for one method never half-configures another.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from broker.errors import ConfigError

from .identity import IdentityConfig
from .section import Section

VAULT_AUTH_METHODS = ("token", "approle", "cert", "jwt", "kubernetes")
VaultAuthMethod = Literal["token", "approle", "cert", "jwt", "kubernetes"]
# Where the kubelet mounts a pod's service-account token (and rotates it in place).
DEFAULT_KUBERNETES_TOKEN_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")
# A Vault call that takes longer than this is a hung connection, not a slow answer.
MAX_VAULT_TIMEOUT_SECONDS = 120
DEFAULT_VAULT_TIMEOUT_SECONDS = 5.0

# The keys each method reads besides `method` and `mount`; any other method's key is an error.
_METHOD_KEYS: dict[str, tuple[str, ...]] = {
    "token": ("token_env", "token_file"),
    "approle": ("role_id_file", "role_id_env", "secret_id_file", "wrapped"),
    "cert": ("role",),
    "jwt": ("role", "audience", "token_file"),
    "kubernetes": ("role", "token_file"),
}


@dataclass(frozen=True, slots=True)
class VaultAuthConfig:
    """How the broker logs in. Only the fields of `method` are set."""

    method: VaultAuthMethod
    token_env: str | None = None
    token_file: Path | None = None  # token: the token; jwt, kubernetes: the JWT to log in with
    mount: str | None = None  # default: the method's name
    role: str | None = None  # cert (optional), jwt, kubernetes
    audience: str | None = None  # jwt with a JWT-SVID from the Workload API
    role_id_file: Path | None = None
    role_id_env: str | None = None
    secret_id_file: Path | None = None
    wrapped: bool = False  # approle: secret_id_file holds a response-wrapping token

    @property
    def mount_point(self) -> str:
        """The auth mount's path under `auth/`."""
        return self.mount or self.method


@dataclass(frozen=True, slots=True)
class VaultConfig:
    """`address` is the first of `addresses` (kept for readers of the one-address form)."""

    address: str
    auth: VaultAuthConfig
    ca: Path | None = None
    timeout: float = DEFAULT_VAULT_TIMEOUT_SECONDS
    addresses: tuple[str, ...] = field(default=())
    namespace: str | None = None

    def __post_init__(self) -> None:
        if not self.addresses:
            object.__setattr__(self, "addresses", (self.address,))


def parse_vault(section: Section, base: Path) -> VaultConfig:
    addresses = _parse_addresses(section)
    auth = _parse_auth(section.section("auth"), base)
    if auth.method == "cert" and not all(a.startswith("https://") for a in addresses):
        raise ConfigError(
            f"{section.at('auth.method')}: cert auth needs an https:// vault.address (the "
            "certificate is presented in the TLS handshake)"
        )
    namespace = section.text("namespace", None)
    vault = VaultConfig(
        address=addresses[0],
        auth=auth,
        ca=section.path("ca", base, None),
        timeout=section.number(
            "timeout", 0.1, MAX_VAULT_TIMEOUT_SECONDS, DEFAULT_VAULT_TIMEOUT_SECONDS
        ),
        addresses=addresses,
        namespace=namespace.strip("/") if namespace else None,
    )
    section.finish()
    return vault


def check_vault_identity(vault: VaultConfig, identity: IdentityConfig) -> None:
    """A method that uses the broker's SPIFFE identity needs a source for it."""
    auth = vault.auth
    if auth.method == "jwt" and auth.token_file is None and identity.workload_api is None:
        raise ConfigError(
            "vault.auth.audience: a JWT-SVID of the broker comes from the Workload API: set "
            "identity.workload_api (or SPIFFE_ENDPOINT_SOCKET), or give vault.auth.token_file"
        )


def _parse_addresses(section: Section) -> tuple[str, ...]:
    raw = section.strings("address")
    addresses: list[str] = []
    for i, address in enumerate(raw):
        where = section.at("address") if len(raw) == 1 else f"{section.at('address')}[{i}]"
        if not address.startswith(("http://", "https://")):
            raise ConfigError(f"{where}: must start with http:// or https://")
        normal = address.rstrip("/")
        if normal in addresses:
            raise ConfigError(f"{where}: {normal} is listed twice")
        addresses.append(normal)
    return tuple(addresses)


def _parse_auth(auth: Section, base: Path) -> VaultAuthConfig:
    method: VaultAuthMethod = auth.choice("method", VAULT_AUTH_METHODS)
    for key in sorted({k for keys in _METHOD_KEYS.values() for k in keys}):
        if auth.has(key) and key not in _METHOD_KEYS[method]:
            users = [m for m, keys in _METHOD_KEYS.items() if key in keys]
            raise ConfigError(
                f"{auth.at(key)}: not a setting of method {method} (only of {', '.join(users)})"
            )
    mount = auth.text("mount", None)
    if mount is not None:
        mount = mount.strip("/")
        if not mount:
            raise ConfigError(f"{auth.at('mount')}: must name a mount, got '/'")
    if method == "token":
        config = _parse_token(auth, base, mount)
    elif method == "approle":
        config = _parse_approle(auth, base, mount)
    elif method == "cert":
        config = VaultAuthConfig(method, mount=mount, role=auth.text("role", None))
    elif method == "jwt":
        role = auth.text("role")
        token_file = auth.path("token_file", base, None)
        audience = auth.text("audience", None)
        if token_file is None and audience is None:
            raise ConfigError(
                f"{auth.where}: jwt auth needs token_file (a JWT on disk, e.g. a projected "
                "service-account token) or audience (for a JWT-SVID from the Workload API)"
            )
        if token_file is not None and audience is not None:
            raise ConfigError(
                f"{auth.at('audience')}: only for a JWT-SVID from the Workload API; a "
                "token_file carries its own audience"
            )
        config = VaultAuthConfig(
            method, mount=mount, role=role, token_file=token_file, audience=audience
        )
    else:
        role = auth.text("role")
        if auth.has("token_file"):
            token_file = auth.path("token_file", base)
        else:
            token_file = DEFAULT_KUBERNETES_TOKEN_FILE
            if not token_file.is_file():
                raise ConfigError(
                    f"{auth.at('token_file')}: the default {token_file} does not exist (not "
                    "running in a Kubernetes pod?); set token_file"
                )
        config = VaultAuthConfig(method, mount=mount, role=role, token_file=token_file)
    auth.finish()
    return config


def _parse_token(auth: Section, base: Path, mount: str | None) -> VaultAuthConfig:
    token_env = auth.text("token_env", None)
    token_file = auth.path("token_file", base, None)
    if (token_env is None) == (token_file is None):
        raise ConfigError(f"{auth.where}: token auth needs exactly one of token_env, token_file")
    return VaultAuthConfig("token", token_env=token_env, token_file=token_file, mount=mount)


def _parse_approle(auth: Section, base: Path, mount: str | None) -> VaultAuthConfig:
    role_id_file = auth.path("role_id_file", base, None)
    role_id_env = auth.text("role_id_env", None)
    if (role_id_file is None) == (role_id_env is None):
        raise ConfigError(
            f"{auth.where}: approle auth needs exactly one of role_id_file, role_id_env"
        )
    return VaultAuthConfig(
        "approle",
        mount=mount,
        role_id_file=role_id_file,
        role_id_env=role_id_env,
        secret_id_file=auth.path("secret_id_file", base),
        wrapped=auth.boolean("wrapped", False),
    )
