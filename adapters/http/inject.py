"""How the credential goes into a forwarded request: the injection step of the HTTP adapter.

The adapter builds the request it will send upstream (method, target, the client's headers
less the hop-by-hop ones and those in `Injector.drop`, the body) as an `Outgoing`, and hands
it with the credential to the service's injector, which adds what the credential proves:

- `HeaderInjector` (``inject: {headers: {Authorization: "Bearer {token}"}}``): header
  templates over the credential's fields;
- `adapters.http.sigv4.SigV4Injector` (``inject: {aws_sigv4: {service: s3, ...}}``): an AWS
  Signature Version 4 over the request, made with the keys in the credential.

An injector never logs or raises a value: `InjectRefused` names the field or the setting to
fix, and `Outgoing.secrets` lists the values that must never travel back toward the client
(the adapter drops a response header that echoes one).
"""

from __future__ import annotations

import abc
import re
import string
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

from adapters.http.hygiene import FORWARDING_HEADERS
from broker.config import Section
from broker.credentials import Credential
from broker.errors import ConfigError

# A credential field value shorter than this is not scrubbed from response headers: short
# values match unrelated headers by chance, and real tokens and passwords are longer.
MIN_SCRUB_VALUE_LENGTH = 8

# RFC 9110 section 7.6.1: connection-specific headers, meaningful for one hop only.
HOP_BY_HOP_HEADERS = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "Proxy-Connection",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
    )
)
# Headers the broker sets for the upstream hop itself; injecting them would break framing or
# routing, so config may not name them.
NOT_INJECTABLE = HOP_BY_HOP_HEADERS | FORWARDING_HEADERS | {"host", "content-length", "expect"}
# An HTTP header name (RFC 9110 section 5.1: a token).
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


@dataclass(slots=True)
class Outgoing:
    """The request about to go upstream, for an injector to complete.

    `target` is origin-form with the upstream's base path; `headers` exclude Host,
    Content-Length and Transfer-Encoding (the upstream client sets those for its hop).
    `body` is the client's body as it streams in (None without one); an injector that must
    read it replaces it with what it read.
    """

    method: str
    target: str
    headers: list[tuple[str, str]]
    body: AsyncIterator[bytes] | None
    content_length: int | None
    secrets: tuple[str, ...] = ()


class InjectRefused(Exception):
    """The request cannot be completed with this credential or setting: answered `status`
    by the broker (503 when the credential lacks what the config asks of it)."""

    def __init__(self, status: int, message: str, kind: str = "template") -> None:
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


class Injector(abc.ABC):
    """Puts a service's credential into each forwarded request. One per service."""

    # Header names (lower case) a client's copy of which is never forwarded: the injector
    # sets them, and the client must not smuggle its own in beside them.
    drop: frozenset[str] = frozenset()

    @abc.abstractmethod
    async def apply(self, credential: Credential, out: Outgoing) -> None:
        """Complete `out` with `credential`; raise `InjectRefused` if it cannot be done."""


# --------------------------------------------------------------------------- header templates


@dataclass(frozen=True, slots=True)
class HeaderTemplate:
    """One injected header: its name and a template over the credential's fields."""

    name: str
    template: str
    fields: tuple[str, ...]


class HeaderInjector(Injector):
    """``inject.headers``: each template rendered from the credential's fields."""

    def __init__(self, headers: tuple[HeaderTemplate, ...]) -> None:
        self.headers = headers
        self.drop = frozenset(h.name.lower() for h in headers)
        # The last credential and the headers rendered from it: rendering and checking the
        # templates cost ~3 us per request, and a cached credential is the same object
        # until it is refreshed.
        self._rendered: tuple[Credential, list[tuple[str, str]], tuple[str, ...]] | None = None

    async def apply(self, credential: Credential, out: Outgoing) -> None:
        values, secrets = self.render(credential)
        out.headers += values
        out.secrets += secrets

    def render(self, credential: Credential) -> tuple[list[tuple[str, str]], tuple[str, ...]]:
        """The rendered headers and the values in them worth scrubbing from responses."""
        rendered = self._rendered
        if rendered is not None and rendered[0] is credential:
            return rendered[1], rendered[2]
        values: list[tuple[str, str]] = []
        used: list[str] = []
        for header in self.headers:
            for field_name in header.fields:
                value = field_value(credential, field_name)
                if value is None:
                    raise InjectRefused(503, f"credential has no field {field_name}")
                used.append(value)
            values.append((header.name, header.template.format_map(credential.fields)))
        secrets = tuple(v for v in used if len(v) >= MIN_SCRUB_VALUE_LENGTH)
        self._rendered = (credential, values, secrets)
        return values, secrets


def field_value(credential: Credential, name: str) -> str | None:
    """The credential's field `name` if it can go into a header; None if it is missing.
    Raises InjectRefused for a value a header cannot carry (CR, LF, NUL)."""
    if name not in credential.fields:
        return None
    value = credential.fields[name]
    if not isinstance(value, str) or any(c in value for c in "\r\n\0"):
        raise InjectRefused(503, f"credential field {name} is not a valid header value")
    return value


def parse_headers(inject: Section, *, required: bool) -> HeaderInjector | None:
    """``inject.headers``: None when absent and not `required`; raises located ConfigErrors."""
    where = inject.at("headers")
    if not required and not inject.has("headers"):
        inject.raw("headers", None)
        return None
    raw_headers: Mapping[str, str] = inject.string_map("headers")
    if not raw_headers:
        raise ConfigError(f"{where}: name at least one header to inject the credential into")
    headers = tuple(
        _parse_template(name, template, f"{where}.{name}") for name, template in raw_headers.items()
    )
    seen: set[str] = set()
    for header in headers:
        if header.name.lower() in seen:
            raise ConfigError(f"{where}.{header.name}: named twice (header names ignore case)")
        seen.add(header.name.lower())
    return HeaderInjector(headers)


def _parse_template(name: str, template: str, where: str) -> HeaderTemplate:
    if not _TOKEN.match(name):
        raise ConfigError(f"{where}: not a valid HTTP header name")
    if name.lower() in NOT_INJECTABLE:
        raise ConfigError(f"{where}: the broker sets this header itself; it cannot be injected")
    if any(c in template for c in "\r\n\0"):
        raise ConfigError(f"{where}: a header value cannot contain CR, LF or NUL")
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ConfigError(f"{where}: not a valid template: {exc}") from None
    fields: list[str] = []
    for _literal, field_name, spec, conversion in parts:
        if field_name is None:
            continue
        # Only plain {field}: attribute, index, conversion and format spec syntax would let a
        # template reach beyond the string values of the secret's fields.
        if not field_name.isidentifier() or spec or conversion:
            raise ConfigError(
                f"{where}: template fields must be plain names like {{token}}, got "
                f"{{{field_name}{'!' + conversion if conversion else ''}"
                f"{':' + spec if spec else ''}}}"
            )
        fields.append(field_name)
    return HeaderTemplate(name, template, tuple(dict.fromkeys(fields)))
