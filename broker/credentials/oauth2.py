"""OAuth 2.0 client credentials: the broker fetches an access token and hands it out.

`OAuth2Fetcher` is one client-credentials grant (RFC 6749 section 4.4), done by Authlib's
httpx2 client: it reads the client's id and secret (or private key) from the nested source
(OpenBao KV, usually) on every fetch, so a rotated client secret is the next fetch's, proves
the client with ``client_secret_basic``, ``client_secret_post`` or a ``private_key_jwt``
assertion (RFC 7523), and asks for the configured scope and audience. The token endpoint is
the configured `token_url`, or discovered from `issuer` (OpenID Connect Discovery, then RFC
8414's metadata), once and again after a failed fetch.

`OAuth2Source` is a `CachedSource` of those tokens: concurrent requests share one fetch, a
token is served until shortly before its ``expires_in`` (never longer than `ttl`) and
refreshed in the background before that, and when the upstream refuses a token
(`invalidate`) it is dropped so the next request fetches a new one.

Fail closed: every failure is a `CredentialUnavailable` that names the token endpoint and what
went wrong (unreachable, timed out, refused with the server's error code) and never a value:
no client secret, no assertion, no access token.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import ssl
import time
from collections.abc import AsyncIterator, Callable
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

import httpx2
from authlib.integrations.base_client.errors import OAuthError
from authlib.integrations.httpx_client import AsyncOAuth2Client
from authlib.oauth2.rfc7523 import PrivateKeyJWT
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from joserfc.jwk import ECKey, OKPKey, RSAKey

from broker.config import OAuth2Config
from broker.credentials import Credential, CredentialRef
from broker.credentials.cache import CachedSource
from broker.credentials.providers import Fetcher
from broker.errors import CredentialUnavailable
from broker.identity import WorkloadIdentity
from broker.identity.tls import client_context
from broker.observe.metrics import Metrics

log = logging.getLogger("sidekey.credentials")

# A token response is a few hundred bytes (a JWT access token a few KiB); a discovery document
# 1-5 KiB. Anything bigger is not one, and reading it unbounded would let the server's host
# exhaust our memory.
MAX_TOKEN_RESPONSE_BYTES = 64 * 1024
MAX_DISCOVERY_BYTES = 64 * 1024
# A token is dropped this long before its expires_in runs out (a tenth of its life when that
# is shorter), so a request that takes it just before never reaches the upstream with an
# expired token despite clock skew and the request's own time in flight.
EXPIRY_MARGIN_SECONDS = 30.0
EXPIRY_MARGIN_FRACTION = 0.1
# After the upstream refused a token, another refusal drops the next one only after this long:
# an upstream that refuses every token (a wrong audience, say) must not turn each request into
# a token request.
REFUSED_REFETCH_SECONDS = 5.0
# OIDC Discovery 1.0 section 4, then RFC 8414 section 3 for plain OAuth servers.
DISCOVERY_PATHS = ("/.well-known/openid-configuration", "/.well-known/oauth-authorization-server")
# Longest server-supplied text (error, error_description) kept in an error message.
MAX_DESCRIPTION_CHARS = 200


class _TooLarge(Exception):
    """A response body over its size limit."""


class _CappedStream(httpx2.AsyncByteStream):
    def __init__(self, inner: httpx2.AsyncByteStream, limit: int) -> None:
        self._inner, self._limit = inner, limit

    async def __aiter__(self) -> AsyncIterator[bytes]:
        total = 0
        async for chunk in self._inner:
            total += len(chunk)
            if total > self._limit:
                raise _TooLarge(f"larger than {self._limit} bytes")
            yield chunk

    async def aclose(self) -> None:
        await self._inner.aclose()


class _CappedTransport(httpx2.AsyncBaseTransport):
    """httpx2's transport with every response body capped at `limit` bytes."""

    def __init__(self, inner: httpx2.AsyncBaseTransport, limit: int) -> None:
        self._inner, self._limit = inner, limit

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        response = await self._inner.handle_async_request(request)
        length = response.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self._limit:
            await response.aclose()
            raise _TooLarge(f"larger than {self._limit} bytes")
        assert isinstance(response.stream, httpx2.AsyncByteStream)
        return httpx2.Response(
            status_code=response.status_code,
            headers=response.headers,
            stream=_CappedStream(response.stream, self._limit),
            extensions=response.extensions,
            request=request,
        )

    async def aclose(self) -> None:
        await self._inner.aclose()


class OAuth2Fetcher:
    """One client-credentials grant per call: a `Credential` with the access token."""

    def __init__(
        self,
        config: OAuth2Config,
        client: Fetcher,
        max_lifetime: float,
        *,
        where: str = "oauth2",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self._client = client
        self._max_lifetime = max_lifetime
        self._clock = clock
        # Made even for an http endpoint: discovery may name an https token endpoint.
        self._ssl: ssl.SSLContext = client_context(ca=config.ca, where=where)
        self._token_url = config.token_url  # discovered from config.issuer when None

    def __repr__(self) -> str:
        return f"OAuth2Fetcher({self.config.endpoint})"

    def _http(
        self, limit: int, cls: type[httpx2.AsyncClient] = httpx2.AsyncClient, **kwargs: Any
    ) -> Any:
        """An httpx2 client (or Authlib's subclass) with our timeout, TLS and a response size
        cap of `limit` bytes, no redirects, no proxies or netrc from the environment."""
        transport = httpx2.AsyncHTTPTransport(verify=self._ssl, trust_env=False)
        return cls(
            transport=_CappedTransport(transport, limit),
            timeout=httpx2.Timeout(self.config.timeout),
            follow_redirects=False,
            trust_env=False,
            **kwargs,
        )

    async def __call__(self) -> Credential:
        started = self._clock()
        client = await self._client()
        url = self._token_url or await self._discover()
        where = f"oauth2: token endpoint {url}"
        fields = client.fields
        client_id = fields.get("client_id")
        if not client_id:
            raise CredentialUnavailable(
                f"oauth2: the client credentials at {client.ref.location} have no client_id field"
            )
        method = self.config.auth_method
        secret_field = "private_key" if method == "private_key_jwt" else "client_secret"
        secret = fields.get(secret_field)
        if not secret:
            raise CredentialUnavailable(
                f"oauth2: the client credentials at {client.ref.location} have no "
                f"{secret_field} field (auth_method {method})"
            )
        params: dict[str, str] = {}
        if self.config.audience:
            params["audience"] = self.config.audience
        if self.config.resource:
            params["resource"] = self.config.resource
        key: str | RSAKey | ECKey | OKPKey = secret
        auth: PrivateKeyJWT | None = None
        if method == "private_key_jwt":
            key, alg = _assertion_key(secret, client.ref.location)
            kid = fields.get("kid")
            auth = PrivateKeyJWT(url, alg=alg, headers={"kid": kid} if kid else None)
        async with self._http(
            MAX_TOKEN_RESPONSE_BYTES,
            AsyncOAuth2Client,
            client_id=client_id,
            client_secret=key,
            scope=" ".join(self.config.scope) or None,
            token_endpoint_auth_method=method,
        ) as session:
            if auth is not None:
                session.register_client_auth_method(auth)
            try:
                # httpx2's timeout bounds each read; this bounds the whole exchange, so a
                # server that trickles its answer cannot hold the waiting requests longer.
                async with asyncio.timeout(self.config.timeout):
                    token = await session.fetch_token(
                        url, grant_type="client_credentials", **params
                    )
            except OAuthError as exc:
                self._token_url = self.config.token_url  # discover again next time
                raise CredentialUnavailable(
                    f"{where} refused the client {client_id}: "
                    + (_server_text(exc.error, secret) or "no error code")
                    + _description(exc.description, secret)
                ) from None
            except httpx2.HTTPStatusError as exc:
                self._token_url = self.config.token_url
                raise CredentialUnavailable(
                    f"{where} answered HTTP {exc.response.status_code}"
                ) from None
            except (httpx2.HTTPError, _TooLarge, ValueError, OSError, TimeoutError) as exc:
                self._token_url = self.config.token_url
                raise CredentialUnavailable(
                    f"{where}: {_failure(exc, self.config.timeout)}"
                ) from None
        return self._credential(token, url, started)

    def _credential(self, token: Any, url: str, started: float) -> Credential:
        where = f"oauth2: token endpoint {url}"
        access_token = token.get("access_token") if isinstance(token, dict) else None
        if not isinstance(access_token, str) or not access_token:
            raise CredentialUnavailable(f"{where} answered without an access_token")
        token_type = token.get("token_type")
        if not isinstance(token_type, str) or token_type.lower() != "bearer":
            # RFC 6750 bearer tokens are what an Authorization: Bearer header can carry;
            # a DPoP or MAC token would need a proof the broker does not make.
            raise CredentialUnavailable(
                f"{where} issued a token of type {token_type!r}, not Bearer"
            )
        lifetime = self._max_lifetime
        expires_in = token.get("expires_in")
        if isinstance(expires_in, int | float | str) and not isinstance(expires_in, bool):
            with contextlib.suppress(ValueError):  # not a number: as if absent
                lifetime = min(lifetime, float(expires_in))
        margin = min(EXPIRY_MARGIN_SECONDS, lifetime * EXPIRY_MARGIN_FRACTION)
        # expires_in counts from when the server answered, which is before now by at most the
        # time since the request was sent.
        usable = lifetime - margin - (self._clock() - started)
        values = {"access_token": access_token, "token_type": "Bearer"}
        if isinstance(token.get("scope"), str):
            values["scope"] = token["scope"]
        return Credential(
            fields=MappingProxyType(values),
            ref=CredentialRef("oauth2", url),
            lease_duration=max(usable, 0.0),
        )

    async def _discover(self) -> str:
        issuer = self.config.issuer
        assert issuer is not None, "OAuth2Config has token_url or issuer"
        base = issuer.rstrip("/")
        async with self._http(MAX_DISCOVERY_BYTES) as http:
            for path in DISCOVERY_PATHS:
                url = base + path
                try:
                    async with asyncio.timeout(self.config.timeout):
                        resp = await http.get(url, headers={"Accept": "application/json"})
                    if resp.status_code == 404 and path != DISCOVERY_PATHS[-1]:
                        continue
                    if resp.status_code != 200:
                        raise CredentialUnavailable(
                            f"oauth2: discovery {url} answered HTTP {resp.status_code}"
                        )
                    doc = json.loads(resp.content)
                except (httpx2.HTTPError, _TooLarge, OSError, TimeoutError) as exc:
                    raise CredentialUnavailable(
                        f"oauth2: discovery {url}: {_failure(exc, self.config.timeout)}"
                    ) from None
                except (ValueError, RecursionError):
                    raise CredentialUnavailable(f"oauth2: discovery {url}: not JSON") from None
                if not isinstance(doc, dict):
                    raise CredentialUnavailable(f"oauth2: discovery {url}: not a metadata document")
                # OIDC Discovery 4.3 and RFC 8414 3.3: the document names exactly the issuer.
                if doc.get("issuer") != issuer:
                    raise CredentialUnavailable(
                        f"oauth2: discovery {url} names issuer {doc.get('issuer')!r}, not "
                        f"{issuer!r} (set issuer: to exactly the server's issuer)"
                    )
                token_url = doc.get("token_endpoint")
                if not isinstance(token_url, str) or not _same_security(token_url, issuer):
                    raise CredentialUnavailable(
                        f"oauth2: discovery {url}: token_endpoint is missing or not an "
                        f"{issuer.split(':', 1)[0]} URL"
                    )
                self._token_url = token_url
                return token_url
        raise AssertionError("unreachable: the last discovery path returns or raises")


class OAuth2Source(CachedSource):
    """Access tokens from `OAuth2Fetcher`, cached and shared (see the module docstring)."""

    def __init__(
        self,
        service: str,
        fetcher: OAuth2Fetcher,
        ttl: float,
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(
            service,
            "oauth2",
            fetcher,
            ttl,
            metrics,
            description=f"oauth2 token from {fetcher.config.endpoint}",
            clock=clock,
        )
        self._refetch_after = 0.0

    async def refresh(self, identity: WorkloadIdentity, credential: Credential) -> bool:
        if not self.holds(credential):
            return True  # already replaced: another request saw the refusal first
        now = self._clock()
        if now < self._refetch_after:
            log.warning(
                "upstream refused a fresh access token again; keeping it service=%s (a new one "
                "at most every %gs: check the token's audience and scope)",
                self.service,
                REFUSED_REFETCH_SECONDS,
            )
            return False
        self._refetch_after = now + REFUSED_REFETCH_SECONDS
        self.drop(credential)
        log.info("upstream refused the access token; fetching a new one service=%s", self.service)
        return True

    async def invalidate(self, identity: WorkloadIdentity, credential: Credential) -> None:
        await self.refresh(identity, credential)


def _assertion_key(pem: str, where: str) -> tuple[RSAKey | ECKey | OKPKey, str]:
    """The key a private_key_jwt assertion is signed with, and its JWS algorithm (RFC 7518)."""
    try:
        key = load_pem_private_key(pem.encode(), password=None)
    except (ValueError, TypeError):
        # The parser's text is not quoted: it could carry part of the key.
        raise CredentialUnavailable(
            f"oauth2: private_key at {where} is not an unencrypted PEM private key"
        ) from None
    if isinstance(key, rsa.RSAPrivateKey):
        return RSAKey.import_key(key), "RS256"
    if isinstance(key, ec.EllipticCurvePrivateKey):
        algs = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
        if key.curve.name in algs:
            return ECKey.import_key(key), algs[key.curve.name]
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return OKPKey.import_key(key), "EdDSA"
    raise CredentialUnavailable(
        f"oauth2: private_key at {where} must be RSA, EC P-256/384/521 or Ed25519"
    )


def _description(text: object, secret: str) -> str:
    text = _server_text(text, secret)
    return f" ({text})" if text else ""


def _server_text(text: object, secret: str) -> str:
    """The server's words (its error code or description: whatever it chose to send, up to
    the response cap), on one line and shortened; the secret is never quoted even if it
    echoed it."""
    if not isinstance(text, str):
        return ""
    return " ".join(text.replace(secret, "[redacted]").split())[:MAX_DESCRIPTION_CHARS]


def _failure(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, httpx2.TimeoutException | TimeoutError):
        return f"no answer in {timeout:g}s"
    if isinstance(exc, httpx2.ConnectError | OSError):
        if "CERTIFICATE_VERIFY_FAILED" in str(exc):
            # The server's certificate does not verify: not an outage, a trust setting.
            return "TLS certificate verification failed (set ca: to the CA that issued it)"
        return f"unreachable ({type(exc).__name__})"
    if isinstance(exc, _TooLarge):
        return f"answer {exc}"
    if isinstance(exc, ValueError):
        return "answer is not JSON"
    return f"{type(exc).__name__}"


def _same_security(url: str, issuer: str) -> bool:
    """`url` is https, or http to a loopback host when the issuer is http (a dev server)."""
    parts = urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return True
    if parts.scheme != "http" or not issuer.startswith("http:") or not parts.hostname:
        return False
    if parts.hostname == "localhost":
        return True
    try:
        return ipaddress.ip_address(parts.hostname).is_loopback
    except ValueError:
        return False
