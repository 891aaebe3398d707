"""SPIFFE IDs and trust domain names as the SPIFFE spec writes them, and nothing else.

py-spiffe 0.3 accepts ``SPIFFE://TD.TEST/x`` and lower-cases it to ``spiffe://td.test/x``. The
spec (SPIFFE-ID.md 2.1 and 2.2) allows only lower-case letters, digits, ``.``, ``-`` and
``_`` in a trust domain and the scheme ``spiffe://`` as written, and go-spiffe and SPIRE
refuse anything else. A broker that normalises what a peer presented accepts IDs no issuer
of the trust domain should have signed and compares a different string from the one in the
certificate, so every SPIFFE ID and trust domain the broker reads from a peer or from its
config goes through here: py-spiffe's parser (its path rules), then its canonical form must
be the input itself.

Pure and synchronous; it sits below every other layer so config and identity both use it.
"""

from __future__ import annotations

from spiffe import SpiffeId, TrustDomain
from spiffe.errors import PySpiffeError

# The spec's cap on a SPIFFE ID (SPIFFE-ID.md 2.3: URIs up to 2048 bytes); py-spiffe does
# not check it, and an ID this long in a log line or an error reply is a nuisance.
MAX_SPIFFE_ID_BYTES = 2048
# A trust domain is a DNS-like name: 255 bytes (SPIFFE-ID.md 2.1 refers to RFC 1035's limit).
MAX_TRUST_DOMAIN_BYTES = 255


class SpiffeIdError(ValueError):
    """Not a SPIFFE ID (or trust domain) as the spec writes one; the message says why and
    quotes the input with its control characters escaped."""


def printable(text: str, limit: int = 300) -> str:
    """`text` as it may appear in a log line or an error reply: control characters (NUL, CR,
    LF...) escaped as \\xNN, and cut at `limit` characters."""
    out = "".join(
        c if c.isprintable() else f"\\x{ord(c):02x}" if ord(c) < 256 else f"\\u{ord(c):04x}"
        for c in text[:limit]
    )
    return out + ("..." if len(text) > limit else "")


def parse_spiffe_id(text: str) -> SpiffeId:
    """The SPIFFE ID `text` names; raises `SpiffeIdError` unless it is canonical."""
    if not isinstance(text, str):
        raise SpiffeIdError(f"a SPIFFE ID is a string, got {type(text).__name__}")
    if len(text.encode("utf-8", "surrogatepass")) > MAX_SPIFFE_ID_BYTES:
        raise SpiffeIdError(f"not a valid SPIFFE ID: longer than {MAX_SPIFFE_ID_BYTES} bytes")
    try:
        spiffe_id = SpiffeId(text)
    except PySpiffeError as exc:
        raise SpiffeIdError(_reason(exc, text, "SPIFFE ID")) from None
    if str(spiffe_id) != text:
        raise SpiffeIdError(
            f"not a valid SPIFFE ID: '{printable(text)}': the scheme and trust domain must be "
            f"lower case (spiffe://{spiffe_id.trust_domain.name}/...)"
        )
    return spiffe_id


def parse_trust_domain(text: str) -> TrustDomain:
    """The trust domain `text` names (a bare name, not an ID); raises `SpiffeIdError`."""
    if not isinstance(text, str):
        raise SpiffeIdError(f"a trust domain is a string, got {type(text).__name__}")
    if len(text.encode("utf-8", "surrogatepass")) > MAX_TRUST_DOMAIN_BYTES:
        raise SpiffeIdError(f"not a valid trust domain: longer than {MAX_TRUST_DOMAIN_BYTES} bytes")
    if text.lower().startswith("spiffe:"):
        raise SpiffeIdError(
            f"not a valid trust domain: '{printable(text)}' is a SPIFFE ID; give the name alone"
        )
    try:
        domain = TrustDomain(text)
    except PySpiffeError as exc:
        raise SpiffeIdError(_reason(exc, text, "trust domain")) from None
    if domain.name != text:
        raise SpiffeIdError(
            f"not a valid trust domain: '{printable(text)}': only lower-case letters, digits, "
            f"'.', '-' and '_' are allowed (did you mean {domain.name!r}?)"
        )
    return domain


def _reason(exc: PySpiffeError, text: str, what: str) -> str:
    # py-spiffe's messages quote the input raw ("Invalid SPIFFE ID '<input>': why"); keep the
    # why, and quote the input escaped.
    detail = str(exc).split(f"'{text}': ", 1)[-1]
    return f"not a valid {what}: '{printable(text)}': {printable(detail, 160)}"
