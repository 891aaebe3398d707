"""`credentials: {from: oauth2, ...}`: an OAuth 2.0 client-credentials grant (RFC 6749 4.4).

The broker is the OAuth client. Its client id and secret (or the private key it signs a
`private_key_jwt` assertion with, RFC 7523) come from a nested credential source, usually
OpenBao KV; the access token it gets is the service's credential:

    credentials:
      from: oauth2
      token_url: https://auth.example/oauth2/token    # or issuer: (discovery)
      client: {from: vault-kv, path: saas-client}      # client_id, client_secret | private_key
      scope: orders.read                               # optional; a list or a string
      audience: https://api.example                    # optional; resource: (RFC 8707) too
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from broker.errors import ConfigError

from .jwt import _check_url
from .section import Section

if TYPE_CHECKING:
    from .services import CredentialsConfig

# How the broker proves itself to the token endpoint (RFC 8414 token_endpoint_auth_method
# names). client_secret_basic is the one RFC 6749 2.3.1 says every server must support.
OAUTH2_AUTH_METHODS = ("client_secret_basic", "client_secret_post", "private_key_jwt")
DEFAULT_AUTH_METHOD = "client_secret_basic"
# Providers the client id and secret may come from: a static secret, never a leased one.
CLIENT_PROVIDERS = ("vault-kv", "env", "file")
# A token endpoint answers in milliseconds; one that has not answered in this long is failing,
# and the request waiting for the token gets 503 rather than hanging.
DEFAULT_TOKEN_TIMEOUT_SECONDS = 10.0
MAX_TOKEN_TIMEOUT_SECONDS = 120.0
# A token is never used for longer than this, whatever its expires_in says (and this long when
# the server gives no expires_in, RFC 6749 5.1 makes it optional): the broker's credentials are
# just in time, and an hour is what most servers issue anyway.
DEFAULT_TOKEN_MAX_LIFETIME_SECONDS = 3600.0


@dataclass(frozen=True, slots=True)
class OAuth2Config:
    """Where the access token comes from, and how the broker asks for it."""

    client: CredentialsConfig
    token_url: str | None = None
    issuer: str | None = None
    scope: tuple[str, ...] = ()
    audience: str | None = None
    resource: str | None = None
    auth_method: str = DEFAULT_AUTH_METHOD
    ca: Path | None = None
    timeout: float = DEFAULT_TOKEN_TIMEOUT_SECONDS

    @property
    def endpoint(self) -> str:
        """The token URL, or the issuer it is discovered from (log-safe)."""
        return self.token_url or self.issuer or ""


def parse_oauth2(c: Section, base: Path, client: CredentialsConfig) -> OAuth2Config:
    """The oauth2 keys of a `credentials` section; `client` is its parsed `client` section."""
    if client.provider not in CLIENT_PROVIDERS:
        raise ConfigError(
            f"{c.at('client')}.from: must be one of {', '.join(CLIENT_PROVIDERS)} (where the "
            f"client id and secret are kept), got {client.provider!r}"
        )
    token_url = c.text("token_url", None)
    issuer = c.text("issuer", None)
    if (token_url is None) == (issuer is None):
        raise ConfigError(
            f"{c.at('token_url')}: set token_url, or issuer to discover it from, not "
            + ("both" if token_url else "neither")
        )
    for key, url in (("token_url", token_url), ("issuer", issuer)):
        if url is not None:
            _check_url(url, c.at(key), what="the authorization server's URL")
    scope = tuple(tok for s in c.strings("scope", ()) for tok in s.split())
    for tok in scope:
        # RFC 6749 3.3: a scope token is printable ASCII without space, '"' or '\\'.
        if any(not "\x21" <= ch <= "\x7e" or ch in '"\\' for ch in tok):
            raise ConfigError(f"{c.at('scope')}: not a valid scope token: {tok!r}")
    ca = c.path("ca", base, None)
    if ca is not None and not (token_url or issuer or "").startswith("https:"):
        raise ConfigError(f"{c.at('ca')}: only applies to an https token_url or issuer")
    return OAuth2Config(
        client=client,
        token_url=token_url,
        issuer=issuer,
        scope=scope,
        audience=c.text("audience", None),
        resource=c.text("resource", None),
        auth_method=c.choice("auth_method", OAUTH2_AUTH_METHODS, DEFAULT_AUTH_METHOD),
        ca=ca,
        timeout=c.number("timeout", 0.1, MAX_TOKEN_TIMEOUT_SECONDS, DEFAULT_TOKEN_TIMEOUT_SECONDS),
    )
