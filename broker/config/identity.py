"""The `identity` and `tls` sections: the trust domain, its bundle, and the broker's own
serving certificate."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from broker.errors import ConfigError
from broker.spiffeid import SpiffeIdError, parse_trust_domain

from .section import Section


@dataclass(frozen=True, slots=True)
class IdentityConfig:
    trust_domain: str
    x509_bundle: Path


@dataclass(frozen=True, slots=True)
class TLSConfig:
    cert: Path
    key: Path


def parse_identity(ident: Section, base: Path) -> IdentityConfig:
    trust_domain = ident.text("trust_domain")
    try:
        trust_domain = parse_trust_domain(trust_domain).name
    except SpiffeIdError as exc:
        raise ConfigError(f"identity.trust_domain: {exc}") from None
    identity = IdentityConfig(trust_domain, ident.path("x509_bundle", base))
    ident.finish()
    return identity


def parse_tls(tls_section: Section, base: Path) -> TLSConfig:
    tls = TLSConfig(tls_section.path("cert", base), tls_section.path("key", base))
    tls_section.finish()
    return tls
