"""How the broker logs in to OpenBao/Vault: one class per `vault.auth.method`.

Each method turns what the broker holds (its X.509-SVID, a JWT, an AppRole secret_id, a
token) into a `Login`: a token, its accessor and how long it lives. A method never calls
hvac directly from the event loop: it hands `VaultClient.send` a function of an
`hvac.Client`, which runs on the client's worker threads at the first address that answers,
and an `explain` hook that turns OpenBao's refusal into a message that says what to fix.

Nothing here logs or raises a token, secret_id, wrapping token or JWT. Files are re-read at
every login (the kubelet, Vault Agent and secret stores rotate them in place); a wrapped
secret_id is unwrapped once per file content and then kept in memory only.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol, TypeVar

import hvac
import hvac.exceptions
import jwt as pyjwt
from cryptography import x509

from broker.config import VaultAuthConfig
from broker.errors import ConfigError, CredentialUnavailable, SidekeyError
from broker.identity.material import IdentityMaterial
from broker.identity.trust import Svid

log = logging.getLogger("sidekey.vault")

T = TypeVar("T")

# A token, role_id, secret_id or JWT file larger than this holds something else (and must
# not be read into memory whole). Kubernetes service-account tokens are ~1 KiB.
MAX_SECRET_FILE_BYTES = 64 * 1024
# How often a token file is stat()ed for a new token (Vault Agent writes one shortly
# before the old one ends; a stat a second costs nothing).
TOKEN_FILE_POLL_SECONDS = 1.0
# OpenBao's answer to a wrapping token that was unwrapped already, expired, or never existed.
WRAPPING_TOKEN_INVALID = "wrapping token is not valid or does not exist"  # noqa: S105

# explain(exception, OpenBao's error text) -> what to tell the operator (a message, or the
# error to raise), or None for the generic translation. Called only for answers from the
# vault, never for network errors.
Explain = Callable[[Exception, str], "str | VaultCallError | None"]


class VaultCallError(CredentialUnavailable):
    """A vault call failed; `kind` says how, for metrics and for the token's life cycle.

    unreachable, timeout, tls: nothing (usable) answered. denied: 403, the token is invalid
    or its policy says no. rejected: the vault answered 4xx to the request itself.
    not_found, sealed (503: sealed or a standby that cannot serve), unavailable (5xx),
    rate_limited, error: anything else.
    """

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


class Transport(Protocol):
    """What a login method needs from `VaultClient`: one call, at the first address that
    answers, with the given token (none for a login) and TLS client certificate."""

    @property
    def address(self) -> str:
        """The address calls go to first right now."""

    def send(
        self,
        fn: Callable[[hvac.Client], T],
        *,
        where: str,
        what: str,
        token: str = "",
        cert: tuple[str, str] | None = None,
        explain: Explain | None = None,
    ) -> Awaitable[T]: ...


class ClientCertificate(Protocol):
    """The broker's own X.509-SVID, for the TLS handshake of a cert login and renewal."""

    def files(self) -> contextlib.AbstractContextManager[tuple[str, str]]:
        """Paths of the current certificate chain and key, valid while the context is open."""

    def spiffe_id(self) -> str:
        """The SPIFFE ID of the current certificate (for messages)."""


class JwtSource(Protocol):
    """JWT-SVIDs of the broker's own identity from the Workload API."""

    async def fetch_jwt(self, audience: str) -> str: ...


@dataclass(frozen=True, slots=True)
class Login:
    """A token the broker may use, and what the vault said about it."""

    token: str = field(repr=False)
    accessor: str
    ttl: float  # seconds it lives from now; 0 for a token that never expires
    renewable: bool
    policies: tuple[str, ...] = ()
    # Who the vault saw, for the audit trail: a SPIFFE ID, a role name, a file path.
    subject: str = ""
    # What to ask for at each renewal: the TTL it was created with (default: `ttl`).
    increment: float = 0.0


class WrappingTokenRefused(VaultCallError):
    """A response-wrapped secret_id could not be unwrapped: someone may have read it."""

    def __init__(self, message: str) -> None:
        super().__init__(message, "rejected")


class LoginMethod(abc.ABC):
    """One `vault.auth.method`."""

    name: ClassVar[str]
    # The broker obtained the token itself, so it revokes it at shutdown. A token it was
    # given (token_env, token_file) may be shared with others and is left alone.
    owns_token: ClassVar[bool] = True
    # It can get a new token on its own when the current one cannot be renewed.
    can_login: ClassVar[bool] = True
    # How often `changed()` is worth asking (None: never).
    poll_interval: float | None = None

    def __init__(self, mount: str) -> None:
        self.mount = mount

    @abc.abstractmethod
    async def login(self, vault: Transport) -> Login:
        """Log in (or, for a given token, look it up). Raises `CredentialUnavailable`."""

    def describe(self) -> str:
        """A log-safe description: the method, its mount and where its input comes from."""
        return f"{self.name} at auth/{self.mount}"

    def client_cert(self) -> contextlib.AbstractContextManager[tuple[str, str] | None]:
        """The TLS client certificate logins and renewals must present (cert auth only)."""
        return contextlib.nullcontext()

    async def changed(self) -> bool:
        """Whether what the broker logs in with changed on disk since the last login."""
        return False

    def when_lost(self) -> str:
        """What happens (or must be done) when the vault stops accepting the token."""
        return "logging in again"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.describe()})"


# ---------------------------------------------------------------------------------- token


class TokenLogin(LoginMethod):
    """A token the broker is given: a literal (tests), `token_env`, or `token_file`.

    "Logging in" looks the token up, to learn its TTL and whether it can be renewed. A
    `token_file` is re-read when it changes (Vault Agent's sink, a CSI driver).
    """

    name = "token"
    owns_token = False
    can_login = False

    def __init__(
        self, token: str | None = None, *, env: str | None = None, file: Path | None = None
    ) -> None:
        super().__init__("token")
        self.env, self.file = env, file
        self.poll_interval = TOKEN_FILE_POLL_SECONDS if file is not None else None
        self._stamp: tuple[int, int, int] | None = None
        if token is not None:
            self._token, self.source = token, "the token given"
        elif env is not None:
            self._token, self.source = _token_from_env(env), f"${env}"
        elif file is not None:
            self._stamp = _stamp_or_none(file)
            self._token, self.source = _token_from_file(file), str(file)
        else:
            raise ConfigError("vault.auth: token auth needs one of token_env, token_file")

    def describe(self) -> str:
        return f"token from {self.source}"

    def when_lost(self) -> str:
        if self.file is not None:
            return f"write a valid token to {self.file}"
        return f"give the broker a valid token in {self.source}"

    async def changed(self) -> bool:
        if self.file is None:
            return False
        return await asyncio.to_thread(_stamp_or_none, self.file) != self._stamp

    async def login(self, vault: Transport) -> Login:
        if self.file is not None and await self.changed():
            stamp, token = await asyncio.to_thread(self._read_file, self.file)
            self._stamp, self._token = stamp, token
            log.info("vault token file changed; using the new token file=%s", self.file)
        token = self._token
        where = "auth/token/lookup-self"
        response = await vault.send(
            lambda c: c.auth.token.lookup_self(),
            where=where,
            what="token",
            token=token,
            explain=self._explain,
        )
        data = _mapping(response, "data", where)
        return Login(
            token=token,
            accessor=str(data.get("accessor") or ""),
            ttl=_seconds(data.get("ttl"), where),
            renewable=bool(data.get("renewable")),
            policies=_strings(data.get("policies")),
            subject=self.source,
            increment=_seconds(data.get("period") or data.get("creation_ttl"), where),
        )

    @staticmethod
    def _read_file(file: Path) -> tuple[tuple[int, int, int] | None, str]:
        stamp = _stamp_or_none(file)
        try:
            return stamp, _read_small(file, "the token")
        except ValueError as exc:
            raise CredentialUnavailable(f"vault: vault.auth.token_file: {exc}") from None

    def _explain(self, exc: Exception, text: str) -> str | None:
        if isinstance(exc, hvac.exceptions.Forbidden):
            return (
                f"token auth: the token from {self.source} is not valid ({_said(text)}): it "
                "expired or was revoked, or its policy lacks auth/token/lookup-self; "
                f"{self.when_lost()}"
            )
        return None


def _token_from_env(env: str) -> str:
    token = os.environ.get(env, "").strip()
    if not token:
        raise ConfigError(
            f"vault.auth.token_env: environment variable {env} is not set or is empty"
        )
    return token


def _token_from_file(file: Path) -> str:
    try:
        return _read_small(file, "the token")
    except ValueError as exc:
        raise ConfigError(f"vault.auth.token_file: {exc}") from None


# -------------------------------------------------------------------------------- approle


class AppRoleLogin(LoginMethod):
    """AppRole: role_id from a file or variable, secret_id from a file, maybe wrapped.

    A wrapped secret_id (`wrapped: true`) is unwrapped once: the broker checks that the
    wrapping token was made by this mount's secret-id endpoint, unwraps it, and keeps the
    secret_id in memory for later logins. A wrapping token that cannot be unwrapped was
    used before, or expired: the broker refuses it and says that someone may have read it.
    A new wrapping token written to the file is unwrapped at the next login.
    """

    name = "approle"

    def __init__(
        self,
        mount: str,
        *,
        secret_id_file: Path,
        role_id_file: Path | None = None,
        role_id_env: str | None = None,
        wrapped: bool = False,
    ) -> None:
        super().__init__(mount)
        self.role_id_file, self.role_id_env = role_id_file, role_id_env
        self.secret_id_file, self.wrapped = secret_id_file, wrapped
        self._unwrapped: str | None = None  # the secret_id from the last unwrap (memory only)
        self._unwrapped_stamp: tuple[int, int, int] | None = None

    def describe(self) -> str:
        role_id = self.role_id_file or f"${self.role_id_env}"
        wrapped = "wrapped " if self.wrapped else ""
        return (
            f"approle at auth/{self.mount} (role_id from {role_id}, {wrapped}secret_id from "
            f"{self.secret_id_file})"
        )

    async def login(self, vault: Transport) -> Login:
        role_id = await asyncio.to_thread(self._role_id)
        secret_id = await self._secret_id(vault)
        where = f"auth/{self.mount}/login"
        response = await vault.send(
            lambda c: c.auth.approle.login(
                role_id=role_id, secret_id=secret_id, mount_point=self.mount, use_token=False
            ),
            where=where,
            what="approle login",
            explain=self._explain_login,
        )
        return _login_from_auth(response, where, subject=f"approle {self.role_id_source}")

    @property
    def role_id_source(self) -> str:
        return str(self.role_id_file) if self.role_id_file else f"${self.role_id_env}"

    def _role_id(self) -> str:
        if self.role_id_file is not None:
            return read_secret_file(self.role_id_file, "the role_id")
        value = os.environ.get(self.role_id_env or "", "").strip()
        if not value:
            raise CredentialUnavailable(
                f"vault: approle: environment variable {self.role_id_env} (vault.auth."
                "role_id_env) is not set or is empty"
            )
        return value

    async def _secret_id(self, vault: Transport) -> str:
        path = self.secret_id_file
        if not self.wrapped:
            return await asyncio.to_thread(read_secret_file, path, "the secret_id")
        stamp = await asyncio.to_thread(_stamp_or_none, path)
        if self._unwrapped is not None and stamp == self._unwrapped_stamp:
            return self._unwrapped
        wrapping = await asyncio.to_thread(read_secret_file, path, "the wrapping token")
        explain = self._explain_wrapping
        info = await vault.send(
            lambda c: c.adapter.post("/v1/sys/wrapping/lookup", json={"token": wrapping}),
            where="sys/wrapping/lookup",
            what="wrapping token",
            explain=explain,
        )
        creation_path = str(_mapping(info, "data", "sys/wrapping/lookup").get("creation_path"))
        expected = f"auth/{self.mount}/role/"
        if not (creation_path.startswith(expected) and creation_path.endswith("/secret-id")):
            raise WrappingTokenRefused(
                f"vault: approle: the wrapping token in {path} was not made by "
                f"{expected}<role>/secret-id but by {creation_path!r}; refusing to unwrap it "
                "(someone may have swapped it): write a wrapped secret_id of this role there"
            )
        unwrapped = await vault.send(
            lambda c: c.sys.unwrap(),
            where="sys/wrapping/unwrap",
            what="wrapping token",
            token=wrapping,
            explain=explain,
        )
        secret_id = _mapping(unwrapped, "data", "sys/wrapping/unwrap").get("secret_id")
        if not isinstance(secret_id, str) or not secret_id:
            raise CredentialUnavailable(
                f"vault: approle: the wrapping token in {path} did not wrap a secret_id"
            )
        log.info("approle secret_id unwrapped file=%s (kept in memory only)", path)
        self._unwrapped, self._unwrapped_stamp = secret_id, stamp
        return secret_id

    def _explain_wrapping(self, exc: Exception, text: str) -> str | VaultCallError | None:
        if WRAPPING_TOKEN_INVALID in text:
            return WrappingTokenRefused(
                f"vault: approle: refusing the wrapping token in {self.secret_id_file}: "
                f"OpenBao says it was already unwrapped or has expired ({_said(text)}). If "
                "this broker did not unwrap it, someone else has read the secret_id: treat it "
                f"as leaked (list and destroy the role's secret IDs under auth/{self.mount}/"
                "role/<role>/secret-id), then write a freshly wrapped secret_id to the file"
            )
        return None

    def _explain_login(self, exc: Exception, text: str) -> str | None:
        if isinstance(exc, hvac.exceptions.InvalidRequest | hvac.exceptions.Forbidden):
            again = (
                "; a wrapped secret_id is unwrapped once, so write a freshly wrapped one to "
                f"{self.secret_id_file}"
                if self.wrapped
                else f"; write a current secret_id to {self.secret_id_file}"
            )
            return (
                f"approle auth at auth/{self.mount}: OpenBao refused the role_id from "
                f"{self.role_id_source} with the secret_id from {self.secret_id_file} "
                f"({_said(text)}): the secret_id expired, was used up (secret_id_ttl, "
                "secret_id_num_uses) or belongs to another role, the role's CIDR list does "
                f"not match, or auth/{self.mount} is not an approle mount (vault.auth.mount)"
                f"{again}"
            )
        return None


# ----------------------------------------------------------------------------------- cert


class CertLogin(LoginMethod):
    """TLS certificate auth with the broker's own X.509-SVID as the client certificate.

    The certificate is taken from its source at every login and every renewal (OpenBao
    checks at renewal that the connection presents the login's certificate, or one from the
    same issuer), so after an SVID rotation the next login uses the new one.
    """

    name = "cert"

    def __init__(self, mount: str, role: str | None, certificate: ClientCertificate) -> None:
        super().__init__(mount)
        self.role, self.certificate = role, certificate

    def describe(self) -> str:
        role = f" role {self.role}" if self.role else ""
        return f"cert at auth/{self.mount}{role} (the broker's X.509-SVID)"

    def client_cert(self) -> contextlib.AbstractContextManager[tuple[str, str] | None]:
        return self.certificate.files()

    async def login(self, vault: Transport) -> Login:
        spiffe_id = await asyncio.to_thread(self.certificate.spiffe_id)
        where = f"auth/{self.mount}/login"

        def explain(exc: Exception, text: str) -> str | None:
            if isinstance(exc, hvac.exceptions.InvalidRequest | hvac.exceptions.Forbidden):
                role = f"role {self.role!r}" if self.role else "role"
                return (
                    f"cert auth: no {role} at auth/{self.mount} matches the certificate "
                    f"{spiffe_id} ({_said(text)}): add {spiffe_id} to the role's "
                    "allowed_uri_sans and its trust bundle to the role's certificate, or "
                    "check vault.auth.role and vault.auth.mount"
                )
            return None

        with self.certificate.files() as files:
            response = await vault.send(
                lambda c: c.auth.cert.login(
                    name=self.role or "", mount_point=self.mount, use_token=False
                ),
                where=where,
                what="cert login",
                cert=files,
                explain=explain,
            )
        return _login_from_auth(response, where, subject=spiffe_id)


class FileCertificate:
    """The broker's SVID from `tls.cert` / `tls.key`, re-read at every use (rotation)."""

    def __init__(self, cert: Path, key: Path) -> None:
        self.cert, self.key = cert, key

    def files(self) -> contextlib.AbstractContextManager[tuple[str, str]]:
        return contextlib.nullcontext((str(self.cert), str(self.key)))

    def spiffe_id(self) -> str:
        try:
            pem = self.cert.read_bytes()
        except OSError as exc:
            raise CredentialUnavailable(
                f"vault: cert auth: cannot read {self.cert}: {exc.strerror}"
            ) from None
        return spiffe_id_of(pem)

    def __repr__(self) -> str:
        return f"FileCertificate({self.cert})"


class MaterialCertificate:
    """The broker's X.509-SVID from its identity material (`tls.cert`/`tls.key` watched for
    change, or the Workload API), taken at every use: after a rotation the next login and
    renewal present the new one. It stays in memory (see `memory_files`)."""

    def __init__(self, material: IdentityMaterial) -> None:
        self.material = material

    def _svid(self) -> Svid:
        svid = self.material.svid
        if svid is None:
            raise CredentialUnavailable(
                "vault: cert auth: the broker has no X.509-SVID yet (waiting for "
                "identity.workload_api, or tls.cert and tls.key)"
            )
        return svid

    def files(self) -> contextlib.AbstractContextManager[tuple[str, str]]:
        svid = self._svid()
        return memory_files(svid.chain_pem(), svid.key_pem())

    def spiffe_id(self) -> str:
        return self._svid().spiffe_id or "<certificate without a SPIFFE ID>"

    def __repr__(self) -> str:
        return f"MaterialCertificate({self.material.svid.source if self.material.svid else None})"


class MaterialJwt:
    """JWT-SVIDs of the broker from its identity material's Workload API."""

    def __init__(self, material: IdentityMaterial) -> None:
        self.material = material

    async def fetch_jwt(self, audience: str) -> str:
        try:
            svid: Any = await self.material.fetch_jwt_svid(audience)
        except SidekeyError as exc:
            raise CredentialUnavailable(
                f"vault: jwt auth: no JWT-SVID for audience {audience}: {exc}"
            ) from None
        # The token itself, or an object that carries it (and its subject and expiry).
        token = svid if isinstance(svid, str) else getattr(svid, "token", None)
        if not isinstance(token, str) or not token:
            raise CredentialUnavailable(
                f"vault: jwt auth: the Workload API gave no JWT-SVID for audience {audience}"
            )
        return token


@contextlib.contextmanager
def memory_files(cert_pem: bytes, key_pem: bytes) -> Iterator[tuple[str, str]]:
    """Paths to a certificate chain and key that live in memory only (memfd, Linux).

    Python's ssl loads a client certificate only from a path; a memfd gives it one without
    the private key ever touching a disk. The paths are valid while the context is open.
    """
    if not hasattr(os, "memfd_create") or not os.path.isdir("/proc/self/fd"):
        raise CredentialUnavailable(
            "vault: cert auth with an SVID held in memory needs memfd_create and /proc "
            "(Linux); the broker does not write its private key to disk"
        )
    fds: list[int] = []
    try:
        for name, data in (("sidekey-vault-cert", cert_pem), ("sidekey-vault-key", key_pem)):
            fd = os.memfd_create(name, os.MFD_CLOEXEC)
            fds.append(fd)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        yield f"/proc/self/fd/{fds[0]}", f"/proc/self/fd/{fds[1]}"
    finally:
        for fd in fds:
            os.close(fd)


def spiffe_id_of(pem: bytes) -> str:
    """The URI SAN of the first certificate in `pem` (or a note that it has none)."""
    try:
        cert = x509.load_pem_x509_certificate(pem)
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        uris = sans.value.get_values_for_type(x509.UniformResourceIdentifier)
    except (ValueError, x509.ExtensionNotFound):
        return "<certificate without a SPIFFE ID>"
    return uris[0] if uris else "<certificate without a SPIFFE ID>"


# ------------------------------------------------------------------------- jwt, kubernetes


class JwtLogin(LoginMethod):
    """The JWT auth method with a token file, or a JWT-SVID for `audience`."""

    name = "jwt"

    def __init__(
        self,
        mount: str,
        role: str,
        *,
        token_file: Path | None = None,
        audience: str | None = None,
        source: JwtSource | None = None,
    ) -> None:
        super().__init__(mount)
        if token_file is None and (audience is None or source is None):
            raise ConfigError(
                "vault.auth: jwt auth without token_file needs a JWT-SVID source "
                "(identity.workload_api) and vault.auth.audience"
            )
        self.role, self.token_file, self.audience, self.source = role, token_file, audience, source

    def describe(self) -> str:
        where = self.token_file or f"JWT-SVID for audience {self.audience}"
        return f"jwt at auth/{self.mount} role {self.role} ({where})"

    async def login(self, vault: Transport) -> Login:
        if self.token_file is not None:
            token = await asyncio.to_thread(read_secret_file, self.token_file, "the JWT")
            origin = str(self.token_file)
        else:
            assert self.source is not None and self.audience is not None
            token = await self.source.fetch_jwt(self.audience)
            origin = f"a JWT-SVID for audience {self.audience}"
        subject = jwt_subject(token)
        where = f"auth/{self.mount}/login"

        def explain(exc: Exception, text: str) -> str | None:
            if isinstance(exc, hvac.exceptions.InvalidRequest | hvac.exceptions.Forbidden):
                return (
                    f"jwt auth: role {self.role!r} at auth/{self.mount} refused {origin} "
                    f"(sub {subject}) ({_said(text)}): check the role's bound_audiences, "
                    "bound_subject and user_claim, and the mount's jwks_url or "
                    "jwt_validation_pubkeys"
                )
            return None

        response = await vault.send(
            lambda c: c.auth.jwt.jwt_login(
                role=self.role, jwt=token, path=self.mount, use_token=False
            ),
            where=where,
            what="jwt login",
            explain=explain,
        )
        return _login_from_auth(response, where, subject=subject)


class KubernetesLogin(LoginMethod):
    """The Kubernetes auth method with the pod's service-account token, re-read at every
    login because the kubelet rotates it."""

    name = "kubernetes"

    def __init__(self, mount: str, role: str, token_file: Path) -> None:
        super().__init__(mount)
        self.role, self.token_file = role, token_file

    def describe(self) -> str:
        return f"kubernetes at auth/{self.mount} role {self.role} ({self.token_file})"

    async def login(self, vault: Transport) -> Login:
        token = await asyncio.to_thread(
            read_secret_file, self.token_file, "the service-account token"
        )
        subject = jwt_subject(token)
        where = f"auth/{self.mount}/login"

        def explain(exc: Exception, text: str) -> str | None:
            if isinstance(exc, hvac.exceptions.InvalidRequest | hvac.exceptions.Forbidden):
                return (
                    f"kubernetes auth: role {self.role!r} at auth/{self.mount} refused the "
                    f"service-account token from {self.token_file} ({subject}) "
                    f"({_said(text)}): check the role's bound_service_account_names and "
                    "bound_service_account_namespaces, and the mount's kubernetes_host and "
                    "token reviewer"
                )
            return None

        response = await vault.send(
            lambda c: c.auth.kubernetes.login(
                role=self.role, jwt=token, mount_point=self.mount, use_token=False
            ),
            where=where,
            what="kubernetes login",
            explain=explain,
        )
        return _login_from_auth(response, where, subject=subject)


def jwt_subject(token: str) -> str:
    """The `sub` claim of a JWT, unverified, for messages only (OpenBao verifies it)."""
    try:
        claims = pyjwt.decode(token, options={"verify_signature": False})
    except pyjwt.PyJWTError:
        return "<not a JWT>"
    return str(claims.get("sub") or "<no sub claim>")[:200]


# ------------------------------------------------------------------------------- factory


def make_login(
    auth: VaultAuthConfig,
    *,
    certificate: ClientCertificate | None = None,
    jwt_source: JwtSource | None = None,
) -> LoginMethod:
    """The login method `vault.auth` describes. Raises `ConfigError` (token method: when
    the token variable or file is missing or empty)."""
    mount = auth.mount_point
    if auth.method == "token":
        return TokenLogin(env=auth.token_env, file=auth.token_file)
    if auth.method == "approle":
        assert auth.secret_id_file is not None
        return AppRoleLogin(
            mount,
            secret_id_file=auth.secret_id_file,
            role_id_file=auth.role_id_file,
            role_id_env=auth.role_id_env,
            wrapped=auth.wrapped,
        )
    if auth.method == "cert":
        if certificate is None:
            raise ConfigError("vault.auth.method: cert auth needs the broker's own SVID")
        return CertLogin(mount, auth.role, certificate)
    if auth.method == "jwt":
        assert auth.role is not None
        return JwtLogin(
            mount, auth.role, token_file=auth.token_file, audience=auth.audience, source=jwt_source
        )
    assert auth.role is not None and auth.token_file is not None
    return KubernetesLogin(mount, auth.role, auth.token_file)


# ------------------------------------------------------------------------------- helpers


def read_secret_file(path: Path, what: str) -> str:
    """A small file holding one secret value, stripped. Errors name the file, not its bytes."""
    try:
        return _read_small(path, what)
    except ValueError as exc:
        raise CredentialUnavailable(f"vault: {exc}") from None


def _read_small(path: Path, what: str) -> str:
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_SECRET_FILE_BYTES + 1)
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None
    if len(raw) > MAX_SECRET_FILE_BYTES:
        raise ValueError(
            f"{path} is larger than {MAX_SECRET_FILE_BYTES} bytes; it should hold only {what}"
        )
    value = raw.decode("utf-8", errors="replace").strip()
    if not value:
        raise ValueError(f"{path} is empty (it should hold {what})")
    return value


def _stamp_or_none(path: Path) -> tuple[int, int, int] | None:
    """What identifies a file's content cheaply: a rename (atomic replace) changes the inode,
    an in-place write the mtime or size."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def _said(text: str) -> str:
    return f"OpenBao said: {text}" if text else "OpenBao gave no reason"


def _mapping(response: Any, key: str, where: str) -> Mapping[str, Any]:
    value = response.get(key) if isinstance(response, Mapping) else None
    if not isinstance(value, Mapping):
        raise CredentialUnavailable(f"vault: {where} returned no {key}")
    return value


def _seconds(value: Any, where: str) -> float:
    try:
        return max(0.0, float(value or 0))
    except (TypeError, ValueError):
        raise CredentialUnavailable(f"vault: {where} returned a bad TTL") from None


def _strings(value: Any) -> tuple[str, ...]:
    return tuple(str(v) for v in value) if isinstance(value, list) else ()


def _login_from_auth(response: Any, where: str, subject: str) -> Login:
    auth = _mapping(response, "auth", where)
    token = auth.get("client_token")
    if not isinstance(token, str) or not token:
        raise CredentialUnavailable(f"vault: {where} returned no client token")
    return Login(
        token=token,
        accessor=str(auth.get("accessor") or ""),
        ttl=_seconds(auth.get("lease_duration"), where),
        renewable=bool(auth.get("renewable")),
        policies=_strings(auth.get("policies")),
        subject=subject,
    )
