"""The `identity` and `tls` sections: the trust domain, where the trust bundles and the broker's
own certificate come from, and federation with other trust domains.

Each piece of material has one source. The broker's certificate and key are ``tls.cert`` and
``tls.key``, or, when the ``tls`` section is left out, the X.509-SVID from the SPIFFE Workload
API. The own trust domain's bundle is ``identity.x509_bundle``, or, when left out, the
Workload API's. Each federated trust domain's bundle is a file, or the word ``workload_api``::

    identity:
      trust_domain: example.org
      workload_api: unix:///run/spire/agent.sock
      federation: {partner.org: certs/partner-bundle.pem, other.org: workload_api}

The Workload API endpoint is ``identity.workload_api``; when the key is absent, the
``SPIFFE_ENDPOINT_SOCKET`` environment variable (what SPIRE's and the SPIFFE CSI driver's
deployments set) is used, but only if some piece needs it: a broker configured with files
alone does not talk to an agent because the variable happens to be set.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from urllib.parse import urlparse

from broker.errors import ConfigError
from broker.spiffeid import SpiffeIdError, parse_trust_domain

from .jwt import JwtConfig, parse_jwt
from .section import Section

# The word that takes a piece from the Workload API in `identity.federation`.
WORKLOAD_API = "workload_api"
# The variable SPIFFE deployments set for workloads (the SPIFFE Workload Endpoint standard).
SPIFFE_ENDPOINT_SOCKET = "SPIFFE_ENDPOINT_SOCKET"


@dataclass(frozen=True, slots=True)
class IdentityConfig:
    trust_domain: str
    # None: the bundle comes from the Workload API.
    x509_bundle: Path | None = None
    # The Workload API endpoint in use (``unix:///path``), or None when nothing needs one.
    workload_api: str | None = None
    # Federated trust domain -> its bundle file; None: from the Workload API.
    federation: Mapping[str, Path | None] = field(default_factory=lambda: MappingProxyType({}))
    # Accepted token issuers (`identity.jwt`); None: no service may take tokens.
    jwt: JwtConfig | None = None

    @property
    def trust_domains(self) -> tuple[str, ...]:
        """Every trust domain whose X.509-SVIDs this broker verifies: its own first."""
        return (self.trust_domain, *self.federation)


@dataclass(frozen=True, slots=True)
class TLSConfig:
    cert: Path
    key: Path


def parse_identity(
    ident: Section,
    base: Path,
    *,
    tls: TLSConfig | None,
    environ: Mapping[str, str] | None = None,
) -> IdentityConfig:
    """The `identity` section; `tls` is the parsed `tls` section (None when absent)."""
    env = os.environ if environ is None else environ
    trust_domain = _trust_domain(ident.text("trust_domain"), ident.at("trust_domain"))
    bundle = ident.path("x509_bundle", base, None)
    federation: dict[str, Path | None] = {}
    where = ident.at("federation")
    for name, source in ident.string_map("federation", {}).items():
        td = _trust_domain(name, f"{where}.{name}")
        if td == trust_domain:
            raise ConfigError(
                f"{where}.{name}: this is identity.trust_domain itself; its bundle is "
                "identity.x509_bundle (or the Workload API's)"
            )
        if td in federation:
            raise ConfigError(f"{where}.{name}: trust domain {td!r} is listed twice")
        if source == WORKLOAD_API:
            federation[td] = None
        else:
            path = (base / source).resolve()
            if not path.is_file():
                raise ConfigError(
                    f"{where}.{name}: file not found: {path} (a PEM bundle, or {WORKLOAD_API})"
                )
            federation[td] = path

    jwt = parse_jwt(ident.section("jwt"), base, trust_domain) if ident.has("jwt") else None
    jwt_from_agent = [i for i in (jwt.issuers if jwt else ()) if i.source == "workload_api"]

    needs_agent = (
        tls is None or bundle is None or None in federation.values() or bool(jwt_from_agent)
    )
    endpoint: str | None = None
    if ident.has("workload_api"):
        endpoint = _endpoint(ident.text("workload_api"), ident.at("workload_api"))
    elif needs_agent and env.get(SPIFFE_ENDPOINT_SOCKET):
        endpoint = _endpoint(
            env[SPIFFE_ENDPOINT_SOCKET], f"{SPIFFE_ENDPOINT_SOCKET} (environment variable)"
        )
    if endpoint is None:
        if tls is None:
            raise ConfigError(
                "tls: required: the broker's certificate and key (tls.cert, tls.key), unless "
                "identity.workload_api gives it an X.509-SVID from a SPIFFE Workload API"
            )
        if bundle is None:
            raise ConfigError(
                f"{ident.at('x509_bundle')}: required: the trust bundle for client X.509-SVIDs, "
                "unless identity.workload_api gives it from a SPIFFE Workload API"
            )
        for td, source in federation.items():
            if source is None:
                raise ConfigError(
                    f"{where}.{td}: {WORKLOAD_API} needs identity.workload_api (or the "
                    f"{SPIFFE_ENDPOINT_SOCKET} environment variable)"
                )
        for issuer in jwt_from_agent:
            raise ConfigError(
                f"{issuer.where}.jwks: {WORKLOAD_API} needs identity.workload_api (or the "
                f"{SPIFFE_ENDPOINT_SOCKET} environment variable)"
            )
    identity = IdentityConfig(trust_domain, bundle, endpoint, MappingProxyType(federation), jwt=jwt)
    ident.finish()
    return identity


def parse_tls(tls_section: Section, base: Path) -> TLSConfig:
    tls = TLSConfig(tls_section.path("cert", base), tls_section.path("key", base))
    tls_section.finish()
    return tls


def _trust_domain(value: str, where: str) -> str:
    try:
        return parse_trust_domain(value).name
    except SpiffeIdError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _endpoint(value: str, where: str) -> str:
    """A Workload API address py-spiffe can dial: ``unix:///absolute/path`` (or unix:/path)."""
    parsed = urlparse(value)
    if parsed.scheme != "unix":
        raise ConfigError(
            f"{where}: must be unix:///path/to/agent.sock (the Workload API is reached over a "
            f"unix socket), got {value!r}"
        )
    if parsed.netloc or parsed.query or parsed.fragment or not parsed.path.startswith("/"):
        raise ConfigError(f"{where}: must be unix:///absolute/path, got {value!r}")
    return f"unix://{parsed.path}"
