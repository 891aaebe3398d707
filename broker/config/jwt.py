"""The `identity.jwt` section and a service's `jwt` section: who may sign tokens the broker
accepts, and how each token's claims become a SPIFFE ID.

```yaml
identity:
  jwt:
    clock_skew: 30                  # seconds allowed on exp / nbf / iat
    issuers:
      - name: spire                 # JWT-SVIDs: `sub` is the SPIFFE ID
        jwks: workload_api          # keys: the Workload API's JWT bundles
      - name: mesh                  # JWT-SVIDs with keys from a SPIFFE bundle endpoint
        jwks: https://spire.example.org/bundle
        trust_domain: example.org   # the one trust domain these keys speak for
      - name: k8s                   # OIDC: iss must match; keys by discovery
        issuer: https://kubernetes.default.svc
        ca: certs/k8s-ca.pem        # for the https fetches (else the system store)
        spiffe_id: "spiffe://example.org/ns/{kubernetes.io.namespace}/sa/{kubernetes.io.serviceaccount.name}"
      - name: github
        issuer: https://token.actions.githubusercontent.com
        spiffe_id: "spiffe://ci.example.org/gh/{repository}/{ref}"
services:
  - name: orders-api
    client_auth: mtls+jwt
    jwt: {audience: orders-api, header: Authorization}
```

`jwks` is `workload_api`, an http(s) URL (a JWKS or SPIFFE bundle endpoint), or a file (a JWKS
or SPIFFE bundle, relative to the config file). Without `jwks`, `issuer` is an OIDC issuer
and the keys come from its discovery document's `jwks_uri`. An issuer with `spiffe_id` signs
non-SPIFFE tokens (`auth_method: oidc`), and `issuer` is then required; one without signs
JWT-SVIDs (`auth_method: jwt-svid`).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from broker.errors import ConfigError
from broker.spiffeid import SpiffeIdError, parse_spiffe_id, parse_trust_domain

from .section import Section

# What `jwks:` may name besides a URL or a file.
JWKS_WORKLOAD_API = "workload_api"
# Asymmetric JWS algorithms only (RFC 7518, RFC 8037). `none` and the HMACs (HS*) are never
# accepted: an HMAC "verified" with a public key is the classic key-confusion forgery.
ALGORITHMS = (
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA",
)  # fmt: skip
# The SPIFFE JWT-SVID spec allows exactly these (no EdDSA).
JWT_SVID_ALGORITHMS = ALGORITHMS[:9]
# Seconds a token's exp/nbf/iat may be off: clocks of well-run hosts agree within a second;
# 30 s absorbs a VM that was paused or a drifting NTP client without extending a token much.
DEFAULT_CLOCK_SKEW = 30.0
# A skew of minutes lets an expired token live on noticeably: the cap.
MAX_CLOCK_SKEW = 300.0
# How often keys are fetched again with no unknown kid to prompt it. Issuers publish a new key
# well before signing with it (Kubernetes, GitHub, SPIRE: minutes to hours ahead), so five
# minutes picks up a rotation in time and removes a withdrawn key within five minutes.
DEFAULT_REFRESH_SECONDS = 300.0
MIN_REFRESH_SECONDS = 10.0
MAX_REFRESH_SECONDS = 24 * 3600.0
# The header a token comes in when `jwt.header` is not set (RFC 6750 section 2.1).
DEFAULT_TOKEN_HEADER = "Authorization"  # noqa: S105 - a header name
# Placeholders in a spiffe_id template: dotted claim paths ({kubernetes.io.namespace}).
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
_CLAIM_PATH = re.compile(r"^[A-Za-z0-9_:-]+(\.[A-Za-z0-9_:-]+)*$")
# An HTTP header name (RFC 9110 section 5.1: a token).
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
# Headers that carry framing or routing; a token cannot come in them.
_NOT_TOKEN_HEADERS = frozenset(
    {"host", "content-length", "transfer-encoding", "connection", "te", "upgrade", "expect"}
)

KeySource = Literal["workload_api", "url", "file", "discovery"]


@dataclass(frozen=True, slots=True)
class SpiffeIdTemplate:
    """A SPIFFE ID with claim placeholders in its path, parsed and checked at load.

    `parts` alternates literal text and claim paths (a tuple of path segments), starting
    and ending with literal text. The trust domain is always literal: a claim can never
    choose which trust domain a token speaks for.
    """

    text: str
    parts: tuple[str | tuple[str, ...], ...]
    trust_domain: str

    @property
    def claims(self) -> tuple[str, ...]:
        """The dotted claim paths the template reads, in order."""
        return tuple(".".join(p) for p in self.parts if isinstance(p, tuple))


@dataclass(frozen=True, slots=True)
class JwtIssuerConfig:
    """One accepted signer of tokens and where its keys come from."""

    name: str
    index: int
    source: KeySource
    # What `iss` must be (exactly); with source "discovery", also the discovery base URL.
    issuer: str | None
    # source "url": the JWKS / SPIFFE bundle URL; "file": its path.
    jwks_url: str | None
    jwks_file: Path | None
    # None for JWT-SVIDs (`sub` is the SPIFFE ID); else the claims-to-ID mapping.
    spiffe_id: SpiffeIdTemplate | None
    # JWT-SVIDs from a url or file source: the trust domain the keys are for.
    trust_domain: str | None
    algorithms: tuple[str, ...]
    # CA file for the https fetches; None: the system store.
    ca: Path | None
    refresh: float

    @property
    def where(self) -> str:
        return f"identity.jwt.issuers[{self.index}]"

    @property
    def method(self) -> Literal["jwt-svid", "oidc"]:
        return "jwt-svid" if self.spiffe_id is None else "oidc"

    def describe_source(self) -> str:
        """Where the keys come from, for the inventory and logs."""
        if self.source == "workload_api":
            return JWKS_WORKLOAD_API
        if self.source == "file":
            return f"file:{self.jwks_file}"
        if self.source == "url":
            return f"url:{self.jwks_url}"
        return f"discovery:{self.issuer}/.well-known/openid-configuration"


@dataclass(frozen=True, slots=True)
class JwtConfig:
    issuers: tuple[JwtIssuerConfig, ...]
    clock_skew: float = DEFAULT_CLOCK_SKEW

    @property
    def trust_domains(self) -> frozenset[str]:
        """Trust domains whose IDs tokens can prove (workload_api issuers add their
        bundles' domains at run time)."""
        tds = {i.trust_domain for i in self.issuers if i.trust_domain}
        tds |= {i.spiffe_id.trust_domain for i in self.issuers if i.spiffe_id}
        return frozenset(tds)


@dataclass(frozen=True, slots=True)
class ServiceJwtConfig:
    """A service's `jwt` section: what its tokens must be addressed to, and where they come."""

    # `aud` must contain this; default: the service's name.
    audience: str
    # The HTTP header the token comes in (`Bearer <token>`, or the bare token).
    header: str = DEFAULT_TOKEN_HEADER


def parse_jwt(section: Section, base: Path, trust_domain: str) -> JwtConfig:
    clock_skew = section.number("clock_skew", 0, MAX_CLOCK_SKEW, DEFAULT_CLOCK_SKEW)
    issuers = tuple(
        _parse_issuer(s, i, base, trust_domain) for i, s in enumerate(section.sections("issuers"))
    )
    section.finish()
    _check_unambiguous(issuers)
    return JwtConfig(issuers, clock_skew)


def parse_service_jwt(section: Section, service_name: str) -> ServiceJwtConfig:
    audience = section.text("audience", service_name)
    header = section.text("header", DEFAULT_TOKEN_HEADER)
    if not _HEADER_NAME.match(header) or header.lower() in _NOT_TOKEN_HEADERS:
        raise ConfigError(
            f"{section.at('header')}: must be an HTTP header name that carries no framing, "
            f"got {header!r}"
        )
    section.finish()
    return ServiceJwtConfig(audience=audience, header=header)


def _parse_issuer(s: Section, index: int, base: Path, trust_domain: str) -> JwtIssuerConfig:
    name = s.text("name")
    jwks = s.text("jwks", None)
    issuer = s.text("issuer", None)
    if issuer is not None:
        _check_url(issuer, s.at("issuer"), what="an issuer")
    template_text = s.text("spiffe_id", None)
    template = parse_template(template_text, s.at("spiffe_id")) if template_text else None

    jwks_url: str | None = None
    jwks_file: Path | None = None
    source: KeySource
    if jwks is None:
        if issuer is None:
            raise ConfigError(
                f"{s.at('jwks')}: required without an issuer (workload_api, a JWKS URL or a "
                "file); or set issuer: for OIDC discovery"
            )
        source = "discovery"
    elif jwks == JWKS_WORKLOAD_API:
        source = "workload_api"
    elif jwks.startswith(("http://", "https://")):
        _check_url(jwks, s.at("jwks"), what="a JWKS URL")
        source, jwks_url = "url", jwks
    else:
        source, jwks_file = "file", s.path("jwks", base)

    if template is not None and issuer is None:
        # Without an iss check, any token signed by these keys would map, whoever it was for.
        raise ConfigError(
            f"{s.at('issuer')}: required with spiffe_id (the iss claim these tokens carry)"
        )
    if template is not None and source == "workload_api":
        raise ConfigError(
            f"{s.at('spiffe_id')}: tokens verified by the Workload API's bundles are JWT-SVIDs, "
            "whose sub is the SPIFFE ID; remove spiffe_id"
        )
    issuer_td = s.text("trust_domain", None)
    if issuer_td is not None:
        if template is not None or source == "workload_api":
            raise ConfigError(
                f"{s.at('trust_domain')}: only for JWT-SVIDs with keys from a URL or a file "
                "(the Workload API names each bundle's domain; a spiffe_id names its own)"
            )
        issuer_td = _trust_domain(issuer_td, s.at("trust_domain"))
    elif template is None and source != "workload_api":
        issuer_td = trust_domain

    default_algs = ALGORITHMS if template is not None else JWT_SVID_ALGORITHMS
    algorithms = s.strings("algorithms", default_algs)
    for i, alg in enumerate(algorithms):
        if alg not in default_algs:
            raise ConfigError(
                f"{s.at('algorithms')}[{i}]: {alg!r} is not accepted; choose from "
                f"{', '.join(default_algs)} (never none or an HMAC)"
            )
    ca = s.path("ca", base, None)
    if ca is not None and source in ("workload_api", "file"):
        raise ConfigError(f"{s.at('ca')}: only used for keys fetched over https")
    refresh = s.number("refresh", MIN_REFRESH_SECONDS, MAX_REFRESH_SECONDS, DEFAULT_REFRESH_SECONDS)
    s.finish()
    return JwtIssuerConfig(
        name=name,
        index=index,
        source=source,
        issuer=issuer,
        jwks_url=jwks_url,
        jwks_file=jwks_file,
        spiffe_id=template,
        trust_domain=issuer_td,
        algorithms=tuple(dict.fromkeys(algorithms)),
        ca=ca,
        refresh=refresh,
    )


def parse_template(text: str, where: str) -> SpiffeIdTemplate:
    """Parse a `spiffe_id` template; every problem is a located ConfigError."""
    parts: list[str | tuple[str, ...]] = []
    sample: list[str] = []
    pos = 0
    for match in _PLACEHOLDER.finditer(text):
        literal = text[pos : match.start()]
        if "{" in literal or "}" in literal:
            raise ConfigError(f"{where}: unbalanced brace in {text!r}")
        path = match.group(1)
        if not _CLAIM_PATH.match(path):
            raise ConfigError(
                f"{where}: {{{path}}} is not a claim name (letters, digits, _ : -, dotted for "
                "nested claims)"
            )
        parts += [literal, tuple(path.split("."))]
        sample += [literal, "x"]
        pos = match.end()
    tail = text[pos:]
    if "{" in tail or "}" in tail:
        raise ConfigError(f"{where}: unbalanced brace in {text!r}")
    parts.append(tail)
    sample.append(tail)
    if len(parts) == 1:
        raise ConfigError(
            f"{where}: names no claim; one fixed ID for every token of an issuer would not tell "
            "workloads apart (use {claim} placeholders)"
        )
    first = parts[0]
    assert isinstance(first, str)
    # The trust domain must be literal: "spiffe://<td>/" before the first placeholder.
    if not first.startswith("spiffe://") or "/" not in first[len("spiffe://") :]:
        raise ConfigError(
            f"{where}: must start with spiffe://<trust domain>/ before any placeholder, got "
            f"{text!r}"
        )
    try:
        spiffe_id = parse_spiffe_id("".join(sample))
    except SpiffeIdError as exc:
        raise ConfigError(f"{where}: does not make a valid SPIFFE ID: {exc}") from None
    return SpiffeIdTemplate(text, tuple(parts), spiffe_id.trust_domain.name)


def _check_url(value: str, where: str, *, what: str) -> None:
    """https, or http to a loopback address (a dev issuer such as OpenBao in dev mode)."""
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{where}: must be {what} (an https URL), got {value!r}")
    if parts.username or parts.password or parts.query or parts.fragment:
        raise ConfigError(f"{where}: must not carry user info, a query or a fragment")
    if parts.scheme == "http" and not _loopback(parts.hostname):
        # Keys fetched in the clear let anyone on the path sign tokens the broker accepts.
        raise ConfigError(f"{where}: must be https (http only to a loopback address)")


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _trust_domain(value: str, where: str) -> str:
    try:
        return parse_trust_domain(value).name
    except SpiffeIdError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _check_unambiguous(issuers: tuple[JwtIssuerConfig, ...]) -> None:
    """Every token must select at most one issuer: names, iss values, and the trust domains
    of JWT-SVID issuers without an iss are each claimed once."""
    names: dict[str, int] = {}
    iss: dict[str, int] = {}
    domains: dict[str, int] = {}
    workload_api: int | None = None
    for cfg in issuers:
        if cfg.name in names:
            raise ConfigError(
                f"{cfg.where}.name: {cfg.name!r} already used by "
                f"identity.jwt.issuers[{names[cfg.name]}]"
            )
        names[cfg.name] = cfg.index
        if cfg.issuer is not None:
            if cfg.issuer in iss:
                raise ConfigError(
                    f"{cfg.where}.issuer: {cfg.issuer!r} already used by "
                    f"identity.jwt.issuers[{iss[cfg.issuer]}]; a token must select one issuer"
                )
            iss[cfg.issuer] = cfg.index
        elif cfg.source == "workload_api":
            if workload_api is not None:
                raise ConfigError(
                    f"{cfg.where}.jwks: the Workload API is already used by "
                    f"identity.jwt.issuers[{workload_api}]"
                )
            workload_api = cfg.index
        elif cfg.trust_domain is not None:
            if cfg.trust_domain in domains:
                raise ConfigError(
                    f"{cfg.where}.trust_domain: JWT-SVIDs of {cfg.trust_domain!r} are already "
                    f"verified by identity.jwt.issuers[{domains[cfg.trust_domain]}]; set "
                    "issuer: on one of them to tell their tokens apart"
                )
            domains[cfg.trust_domain] = cfg.index
