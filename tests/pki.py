"""Test PKI: a development CA, the broker's serving SVID, and client SVIDs good and broken.

Use the session-scoped `pki` fixture (register this module with
``pytest_plugins = ["tests.pki"]`` in the root conftest) and the `client_ssl_context` /
`server_ssl_context` helpers. Every certificate is minted at test time into a temporary
directory; no private key is ever committed.
"""

from __future__ import annotations

import hashlib
import re
import ssl
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from broker.identity.ca import IssuedFiles, init_ca, issue, issue_certificate, load_ca, write_issued

TRUST_DOMAIN = "example.org"
SERVER_ID = f"spiffe://{TRUST_DOMAIN}/sidekey"
DEFAULT_CLIENT_ID = f"spiffe://{TRUST_DOMAIN}/ns/prod/sa/orders"
FOREIGN_CLIENT_ID = "spiffe://evil.org/ns/prod/sa/orders"
# Host names the broker's serving certificate is valid for: every loopback spelling.
SERVER_DNS = ("localhost",)
SERVER_IPS = ("127.0.0.1", "::1")


class Pki:
    """A development CA in a temporary directory plus the SVIDs tests need, issued lazily.

    Every method returns `IssuedFiles` (cert, key, bundle) that curl, Python's ssl and libpq
    load as they are. The bundle of every issued set is this CA's bundle, so a client
    presenting a broken certificate still verifies the broker's server certificate.
    """

    def __init__(self, root: Path, trust_domain: str = TRUST_DOMAIN) -> None:
        self.root = root
        self.trust_domain = trust_domain
        self.dir = root / "ca"
        self.bundle = init_ca(self.dir, trust_domain)
        self.ca_cert, self.ca_key = load_ca(self.dir)
        self._out = root / "issued"
        self._cache: dict[tuple[str, str], IssuedFiles] = {}
        self._other_ca: Path | None = None
        # SERVER_ID and DEFAULT_CLIENT_ID, in this CA's trust domain.
        self.server_id = SERVER_ID.replace(TRUST_DOMAIN, trust_domain, 1)
        self.default_client_id = DEFAULT_CLIENT_ID.replace(TRUST_DOMAIN, trust_domain, 1)
        self.server = issue(
            self.dir, self.server_id, self._out / "server", dns=SERVER_DNS, ips=SERVER_IPS
        )

    def client(self, spiffe_id: str | None = None) -> IssuedFiles:
        """A valid client X.509-SVID for `spiffe_id` (default: ``ns/prod/sa/orders`` of this
        CA's trust domain) from this CA (cached per ID)."""
        sid = spiffe_id or self.default_client_id
        return self._cached("client", sid, lambda prefix: issue(self.dir, sid, prefix))

    def other_ca_client(self, spiffe_id: str = DEFAULT_CLIENT_ID) -> IssuedFiles:
        """A client SVID from a second CA with the *same* trust domain name: untrusted chain.

        The bundle in the result is still this (trusted) CA's, so the client can verify the
        broker; only its own certificate fails verification.
        """
        if self._other_ca is None:
            self._other_ca = self.root / "other-ca"
            init_ca(self._other_ca, self.trust_domain)
        other = self._other_ca

        def make(prefix: Path) -> IssuedFiles:
            cert, key = issue_certificate(*load_ca(other), uri_sans=[spiffe_id])
            return write_issued(cert, key, prefix, self.bundle.read_bytes())

        return self._cached("other-ca", spiffe_id, make)

    def foreign_domain_client(self, spiffe_id: str = FOREIGN_CLIENT_ID) -> IssuedFiles:
        """A certificate that chains to this CA but names a SPIFFE ID of another trust domain."""
        return self.mint("foreign", uri_sans=[spiffe_id])

    def two_uri_client(self) -> IssuedFiles:
        """A certificate with two SPIFFE IDs as URI SANs (an SVID must have exactly one)."""
        return self.mint(
            "two-uri",
            uri_sans=[DEFAULT_CLIENT_ID, f"spiffe://{self.trust_domain}/ns/prod/sa/admin"],
        )

    def ca_flag_client(self) -> IssuedFiles:
        """A leaf that claims CA:true (an SVID leaf must not be a CA)."""
        return self.mint("ca-flag", uri_sans=[DEFAULT_CLIENT_ID], is_ca=True)

    def expired_client(self, spiffe_id: str = DEFAULT_CLIENT_ID) -> IssuedFiles:
        """A client SVID whose validity ended an hour ago."""
        start = datetime.now(UTC) - timedelta(days=1)
        return self.mint(
            "expired", uri_sans=[spiffe_id], not_before=start, valid_for=timedelta(hours=23)
        )

    def mint(self, name: str, **kwargs: Any) -> IssuedFiles:
        """Issue from this CA with `issue_certificate`'s switches; written as ``name``.

        For certificates no other method covers; the result is cached by `name`.
        """

        def make(prefix: Path) -> IssuedFiles:
            cert, key = issue_certificate(self.ca_cert, self.ca_key, **kwargs)
            return write_issued(cert, key, prefix, self.bundle.read_bytes())

        return self._cached("mint", name, make)

    def _cached(self, kind: str, label: str, make: Callable[[Path], IssuedFiles]) -> IssuedFiles:
        cache_key = (kind, label)
        if cache_key not in self._cache:
            # Readable and unique: a slug of the label plus a short hash of it.
            slug = re.sub(r"[^A-Za-z0-9]+", "-", label).strip("-")[-40:]
            digest = hashlib.sha256(label.encode()).hexdigest()[:8]
            files = make(self._out / kind / f"{slug}-{digest}")
            self._cache[cache_key] = files
        return self._cache[cache_key]


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """One development CA per test session, with the broker's serving SVID issued."""
    return Pki(tmp_path_factory.mktemp("pki"))


def client_ssl_context(pki: Pki, issued: IssuedFiles | None = None) -> ssl.SSLContext:
    """A client context that verifies the server against `pki.bundle` (host names checked)
    and presents `issued` as its client certificate, if given."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki.bundle))
    # Python 3.13's default; set here so 3.11 runs catch what 3.13 would reject.
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    # Names must come from SANs: a CN fallback would hide a serving certificate without them.
    ctx.hostname_checks_common_name = False
    if issued is not None:
        ctx.load_cert_chain(issued.cert, issued.key)
    return ctx


def server_ssl_context(
    pki: Pki, issued: IssuedFiles | None = None, *, require_client_cert: bool = True
) -> ssl.SSLContext:
    """A server context serving `issued` (default: `pki.server`) that verifies client
    certificates against `pki.bundle`, requiring one unless `require_client_cert` is false."""
    served = issued if issued is not None else pki.server
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki.bundle))
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    ctx.load_cert_chain(served.cert, served.key)
    return ctx
