"""TLS contexts: the broker's mTLS serving context and its upstream client contexts.

Every problem with a file becomes a located ConfigError, so `sidekey check` reports it before
a single connection is accepted.
"""

from __future__ import annotations

import ssl
import tempfile
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.serialization import Encoding

from broker.errors import ConfigError

# TLS 1.2 is the oldest version without known protocol-level breaks; 1.3 is preferred.
MIN_TLS_VERSION = ssl.TLSVersion.TLSv1_2
# TLS 1.3 session tickets the server sends after each full handshake. OpenSSL's default is 2,
# and minting them (resumption secret, then the session, client certificate included,
# encrypted) is a third of a mutual-TLS handshake: server CPU 2.4 -> 1.7 ms per handshake
# without them (in-memory, P-256 SVIDs, OpenSSL 3.0.19, median of 280). Nobody redeems them:
# libpq never resumes a session, and a resumed session would skip the client certificate's
# chain and validity checks, which we want on every connection.
SERVER_SESSION_TICKETS = 0
# Issuers followed from the serving certificate into the trust bundle (OpenSSL's default
# verification depth is 100; real chains are leaf, one or two intermediates, root).
MAX_CHAIN_DEPTH = 8


def server_context(
    cert: Path, key: Path, bundle: Path | None, *, where: str = "tls", alpn: list[str] | None = None
) -> ssl.SSLContext:
    """A serving context. With `bundle`, a client certificate chaining to it is *required*."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = MIN_TLS_VERSION
    ctx.num_tickets = SERVER_SESSION_TICKETS
    try:
        if bundle is None or not _load_with_issuers(ctx, cert, key, bundle):
            ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"{where}.cert: cannot load certificate/key pair: {_why(exc)}") from None
    if bundle is not None:
        try:
            ctx.load_verify_locations(cafile=bundle)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"identity.x509_bundle: cannot load trust bundle: {_why(exc)}"
            ) from None
        ctx.verify_mode = ssl.CERT_REQUIRED
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx


def _load_with_issuers(ctx: ssl.SSLContext, cert: Path, key: Path, bundle: Path) -> bool:
    """Load the serving certificate with its issuers from the bundle (`_with_issuers`).
    False when there is nothing to add or it cannot be done: the caller loads the files as
    they are, and reports any problem with them by their config key."""
    try:
        chained = _with_issuers(cert, bundle)
        if chained is None:
            return False
        # load_cert_chain reads only files: the public certificates go to a private temp
        # dir for the moment it takes; the key is read from where it is.
        with tempfile.TemporaryDirectory(prefix="sidekey-chain-") as tmp:
            path = Path(tmp) / "chain.pem"
            path.write_bytes(chained)
            ctx.load_cert_chain(path, key)
    except (OSError, ValueError, ssl.SSLError):
        # Unreadable or malformed files, or no writable temp dir (a read-only root file
        # system): OpenSSL then builds the chain per handshake, as it always did.
        return False
    return True


def _with_issuers(cert: Path, bundle: Path) -> bytes | None:
    """The serving certificate followed by its issuers from the trust bundle, as PEM: the
    chain OpenSSL would otherwise rebuild from the trust store in every handshake.

    With a certificate file that holds the leaf alone (what `sidekey ca issue` writes, and
    SPIRE when it signs SVIDs with its own root), OpenSSL looks up and verifies the server's
    chain on each handshake and sends the leaf and every certificate it found. Handing it
    the same chain once, at load, sends the same bytes and cost ~0.1 ms less server CPU per
    mutual-TLS handshake: 862 -> 772 us on OpenSSL 3.0.19, 604 -> 514 us on 3.5.7
    (in-memory, P-256, median of 3 x 300). None when the file already carries a chain
    (OpenSSL then builds none) or no issuer is in the bundle.
    """
    certs = x509.load_pem_x509_certificates(cert.read_bytes())
    if len(certs) != 1:
        return None
    pool = x509.load_pem_x509_certificates(bundle.read_bytes())
    chain = [certs[0]]
    while len(chain) <= MAX_CHAIN_DEPTH and chain[-1].issuer != chain[-1].subject:
        issuer = next((c for c in pool if _issued_by(chain[-1], c)), None)
        if issuer is None:
            break
        chain.append(issuer)
    if len(chain) == 1:
        return None
    return b"".join(c.public_bytes(Encoding.PEM) for c in chain)


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    if cert.issuer != issuer.subject:
        return False
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def client_context(
    *, verify: bool = True, ca: Path | None = None, where: str = "upstream.tls"
) -> ssl.SSLContext:
    """A context for connecting upstream: verifies against `ca` or the system store."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = MIN_TLS_VERSION
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    try:
        if ca is not None:
            ctx.load_verify_locations(cafile=ca)
        else:
            ctx.load_default_certs()
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"{where}.ca: cannot load CA file: {_why(exc)}") from None
    return ctx


def _why(exc: Exception) -> str:
    return getattr(exc, "strerror", None) or getattr(exc, "reason", None) or str(exc)
