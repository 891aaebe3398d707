"""A small SPIFFE certificate authority for development and tests. NOT for production.

It keeps an unencrypted ECDSA root key in a file next to its certificate and issues
X.509-SVIDs straight from that root, with no revocation, no audit and no key protection.
Production deployments get their SVIDs from SPIRE (or another real SPIFFE issuer) and point
``identity.x509_bundle`` at that issuer's trust bundle.

Layout of a CA directory (``sidekey ca init``)::

    ca.pem       self-signed root: CA:true, keyCertSign+cRLSign, URI SAN spiffe://<trust domain>
    ca-key.pem   its private key (PKCS#8 PEM, mode 0600)
    bundle.pem   the trust bundle for ``identity.x509_bundle`` (the root certificate)

``sidekey ca issue`` writes ``PREFIX.pem`` (the leaf alone: the root is the only issuer, and
every verifier is given the bundle), ``PREFIX-key.pem`` (PKCS#8 PEM, mode 0600, as libpq
demands) and ``PREFIX-bundle.pem`` (a copy of the bundle). Those files load unchanged with
``curl --cert/--key/--cacert``, Python's ``SSLContext.load_cert_chain`` and libpq's
``sslcert``/``sslkey``/``sslrootcert``.

`issue_certificate` is the single place certificates are built; tests use it directly to mint
certificates that break the SVID rules on purpose (two URI SANs, a CA flag on a leaf, ...).
"""

from __future__ import annotations

import ipaddress
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from spiffe import TrustDomain
from spiffe.errors import PySpiffeError

from broker.errors import ConfigError
from broker.spiffeid import SpiffeIdError, parse_spiffe_id

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

CA_CERT_FILE = "ca.pem"
CA_KEY_FILE = "ca-key.pem"
BUNDLE_FILE = "bundle.pem"

# A dev root outlives any checkout it is made for; rotating it is a manual `ca init` anyway.
CA_VALIDITY = timedelta(days=3650)
# SVIDs are short-lived by design (SPIRE's default is 1h); a day spares developers reissuing
# mid-session while still exercising expiry.
DEFAULT_LEAF_DAYS = 1
# Backdate notBefore so a peer whose clock is a little behind accepts a fresh certificate.
CLOCK_SKEW = timedelta(minutes=5)
# X.520 upper bound (ub-common-name) for a CN/O value; cryptography rejects longer ones.
MAX_NAME_ATTRIBUTE_LENGTH = 64
# Private keys must not be readable by group/other: libpq refuses such an sslkey outright.
KEY_FILE_MODE = 0o600
# Certificates and bundles are public; anything that verifies with them may read them.
CERT_FILE_MODE = 0o644
# The CA directory holds the root key.
CA_DIR_MODE = 0o700

# P-256: what SPIRE issues by default, and accepted by every TLS stack we meet.
_CURVE = ec.SECP256R1()
# An LDH hostname label or a leading wildcard label; IDNs must be given as A-labels (xn--).
_DNS_NAME = re.compile(
    r"^(\*\.)?([A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\.)*"
    r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\.?$"
)
_ORGANIZATION = "Sidekey development CA"


@dataclass(frozen=True, slots=True)
class IssuedFiles:
    """The files `issue` wrote: leaf certificate, its private key, and the trust bundle."""

    cert: Path
    key: Path
    bundle: Path


def init_ca(directory: Path, trust_domain: str) -> Path:
    """Create a new development CA for `trust_domain` in `directory`; return the bundle path.

    Writes ``ca.pem``, ``ca-key.pem`` (mode 0600) and ``bundle.pem``. Creates the directory if
    missing and refuses to overwrite an existing CA. Raises `ConfigError`.
    """
    td = _trust_domain(trust_domain)
    cert_path, key_path, bundle_path = _ca_paths(directory)
    existing = [p.name for p in (cert_path, key_path, bundle_path) if p.exists()]
    if existing:
        raise ConfigError(
            f"{directory}: a CA already exists here ({', '.join(existing)}); refusing to "
            "overwrite it. Remove the directory first to start a new CA."
        )
    try:
        directory.mkdir(mode=CA_DIR_MODE, parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{directory}: cannot create the CA directory: {exc}") from None

    key = ec.generate_private_key(_CURVE)
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, _ORGANIZATION),
            x509.NameAttribute(NameOID.COMMON_NAME, td[:MAX_NAME_ATTRIBUTE_LENGTH]),
        ]
    )
    now = datetime.now(UTC)
    cert = _build(
        subject=name,
        public_key=key.public_key(),
        issuer=name,
        issuer_key=key,
        not_before=now - CLOCK_SKEW,
        not_after=now + CA_VALIDITY,
        extensions=[
            # pathLen 0: this root signs leaves only, so a leaf that wrongly claims CA:true
            # still cannot issue certificates that chain here.
            (x509.BasicConstraints(ca=True, path_length=0), True),
            (_key_usage(key_cert_sign=True, crl_sign=True), True),
            (
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(f"spiffe://{td}")]),
                False,
            ),
        ],
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    # Key first and exclusively: if two inits race, exactly one of them wins.
    _write(key_path, _key_pem(key), KEY_FILE_MODE, exclusive=True)
    _write(cert_path, cert_pem, CERT_FILE_MODE, exclusive=True)
    _write(bundle_path, cert_pem, CERT_FILE_MODE, exclusive=True)
    return bundle_path


def load_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Read the CA certificate and key that `init_ca` wrote. Raises `ConfigError`."""
    cert_path, key_path, _ = _ca_paths(directory)
    if not cert_path.is_file() or not key_path.is_file():
        raise ConfigError(
            f"{directory}: no CA here (need {CA_CERT_FILE} and {CA_KEY_FILE}); create one "
            "with `sidekey ca init --dir DIR --trust-domain TD`"
        )
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"{directory}: cannot read the CA: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{key_path}: not an EC private key")
    if cert.public_key() != key.public_key():
        raise ConfigError(f"{directory}: {CA_KEY_FILE} is not the key of {CA_CERT_FILE}")
    return cert, key


def ca_trust_domain(ca_cert: x509.Certificate) -> str:
    """The trust domain named by a CA certificate's ``spiffe://<td>`` URI SAN."""
    try:
        san = ca_cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise ConfigError("the CA certificate has no SPIFFE URI SAN") from None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        raise ConfigError(f"the CA certificate must name one trust domain, has {uris}")
    return _trust_domain(uris[0])


def issue(
    directory: Path,
    spiffe_id: str,
    out_prefix: Path,
    *,
    dns: Sequence[str] = (),
    ips: Sequence[str] = (),
    days: int = DEFAULT_LEAF_DAYS,
) -> IssuedFiles:
    """Issue an X.509-SVID for `spiffe_id` from the CA in `directory`.

    Writes ``PREFIX.pem``, ``PREFIX-key.pem`` (mode 0600) and ``PREFIX-bundle.pem``, replacing
    earlier files of the same name (reissuing is rotation). A trailing ``.pem`` on
    `out_prefix` is dropped, so ``--out certs/broker.pem`` works too. `dns` and `ips` add
    SANs for a serving certificate that clients verify by host name (curl, libpq
    ``verify-full``). Raises `ConfigError`.
    """
    ca_cert, ca_key = load_ca(directory)
    td = ca_trust_domain(ca_cert)
    try:
        sid = parse_spiffe_id(spiffe_id)
    except SpiffeIdError as exc:
        raise ConfigError(f"bad SPIFFE ID: {exc}") from None
    if sid.trust_domain.name != td:
        raise ConfigError(
            f"SPIFFE ID {spiffe_id} is outside this CA's trust domain {td!r}; "
            f"use spiffe://{td}/<path>"
        )
    if not sid.path:
        raise ConfigError(
            f"SPIFFE ID {spiffe_id} has no path; a workload ID looks like spiffe://{td}/<path>"
        )
    if days < 1:
        raise ConfigError(f"days: must be at least 1, got {days}")
    for name in dns:
        if not _DNS_NAME.match(name):
            raise ConfigError(f"bad DNS name {name!r} (give an ASCII host name, IDNs as xn--)")
    addresses: list[IPAddress] = []
    for ip in ips:
        try:
            addresses.append(ipaddress.ip_address(ip))
        except ValueError:
            raise ConfigError(f"bad IP address {ip!r}") from None
    valid_for = timedelta(days=days)
    if datetime.now(UTC) + valid_for > ca_cert.not_valid_after_utc:
        raise ConfigError(
            f"days: {days} would outlive the CA (expires {ca_cert.not_valid_after_utc})"
        )

    cert, key = issue_certificate(
        ca_cert, ca_key, uri_sans=[str(sid)], dns=dns, ips=addresses, valid_for=valid_for
    )
    return write_issued(cert, key, out_prefix, _read_bundle(directory))


def issue_certificate(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    *,
    uri_sans: Sequence[str],
    dns: Sequence[str] = (),
    ips: Sequence[IPAddress | str] = (),
    common_name: str | None = None,
    is_ca: bool = False,
    key_cert_sign: bool = False,
    digital_signature: bool = True,
    basic_constraints: bool = True,
    key_usage: bool = True,
    not_before: datetime | None = None,
    valid_for: timedelta = timedelta(days=DEFAULT_LEAF_DAYS),
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Build and sign a leaf certificate with a fresh P-256 key; no SVID rule is enforced.

    The defaults give a valid X.509-SVID for a single SPIFFE ID in `uri_sans`. The keyword
    switches exist so tests can break one rule at a time: several or zero URI SANs, a
    SPIFFE ID from another trust domain, ``is_ca=True``, ``key_cert_sign=True``, no
    digitalSignature, a missing BasicConstraints or KeyUsage extension, or an expired
    validity window (`not_before` in the past with a short `valid_for`). The CN defaults to the
    first DNS name, else the first URI's path.
    """
    key = ec.generate_private_key(_CURVE)
    if common_name is None:
        common_name = dns[0] if dns else _cn_from_uri(uri_sans[0] if uri_sans else "")
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uri_sans]
    names += [x509.DNSName(d) for d in dns]
    names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]

    extensions: list[tuple[x509.ExtensionType, bool]] = []
    if basic_constraints:
        extensions.append((x509.BasicConstraints(ca=is_ca, path_length=None), True))
    if key_usage:
        extensions.append(
            (
                _key_usage(
                    digital_signature=digital_signature,
                    key_agreement=True,
                    key_cert_sign=key_cert_sign,
                ),
                True,
            )
        )
    extensions.append(
        (
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            False,
        )
    )
    if names:
        extensions.append((x509.SubjectAlternativeName(names), False))

    if not_before is None:
        now = datetime.now(UTC)
        start, end = now - CLOCK_SKEW, now + valid_for
    else:
        start, end = not_before, not_before + valid_for
    subject = x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, common_name[:MAX_NAME_ATTRIBUTE_LENGTH])]
    )
    cert = _build(
        subject=subject,
        public_key=key.public_key(),
        issuer=ca_cert.subject,
        issuer_key=ca_key,
        not_before=start,
        not_after=end,
        extensions=extensions,
    )
    return cert, key


def write_issued(
    cert: x509.Certificate,
    key: ec.EllipticCurvePrivateKey,
    out_prefix: Path,
    bundle_pem: bytes,
) -> IssuedFiles:
    """Write a certificate, its key (mode 0600) and a bundle as ``PREFIX{,-key,-bundle}.pem``."""
    if out_prefix.suffix == ".pem":
        out_prefix = out_prefix.with_suffix("")
    files = IssuedFiles(
        cert=out_prefix.with_name(out_prefix.name + ".pem"),
        key=out_prefix.with_name(out_prefix.name + "-key.pem"),
        bundle=out_prefix.with_name(out_prefix.name + "-bundle.pem"),
    )
    try:
        out_prefix.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{out_prefix.parent}: cannot create directory: {exc}") from None
    _write(files.key, _key_pem(key), KEY_FILE_MODE)
    _write(files.cert, cert.public_bytes(serialization.Encoding.PEM), CERT_FILE_MODE)
    _write(files.bundle, bundle_pem, CERT_FILE_MODE)
    return files


def _build(
    *,
    subject: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    issuer: x509.Name,
    issuer_key: ec.EllipticCurvePrivateKey,
    not_before: datetime,
    not_after: datetime,
    extensions: Sequence[tuple[x509.ExtensionType, bool]],
) -> x509.Certificate:
    """The one place a certificate is signed; adds SKI and AKI to every certificate."""
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        # OpenSSL's strict mode (Python 3.13's default context) wants AKI on every certificate.
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
    )
    for ext, critical in extensions:
        builder = builder.add_extension(ext, critical=critical)
    return builder.sign(issuer_key, hashes.SHA256())


def _key_usage(
    *,
    digital_signature: bool = False,
    key_agreement: bool = False,
    key_cert_sign: bool = False,
    crl_sign: bool = False,
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=key_agreement,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _trust_domain(value: str) -> str:
    try:
        td = TrustDomain(value)
    except PySpiffeError as exc:
        raise ConfigError(f"bad trust domain {value!r}: {exc}") from None
    # spiffe lowercases silently; a name that changes under us would not match the config.
    if value not in (td.name, f"spiffe://{td.name}"):
        raise ConfigError(f"bad trust domain {value!r}: write it in lowercase, as {td.name!r}")
    return td.name


def _cn_from_uri(uri: str) -> str:
    # The SPIFFE ID path without its leading slash; the ID itself for a path-less URI.
    path = uri.split("://", 1)[-1].partition("/")[2]
    return path or uri or "sidekey"


def _ca_paths(directory: Path) -> tuple[Path, Path, Path]:
    return directory / CA_CERT_FILE, directory / CA_KEY_FILE, directory / BUNDLE_FILE


def _read_bundle(directory: Path) -> bytes:
    # bundle.pem may grow to hold an old and a new root during a rotation; copy it verbatim.
    bundle = directory / BUNDLE_FILE
    source = bundle if bundle.is_file() else directory / CA_CERT_FILE
    try:
        return source.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read the trust bundle: {exc}") from None


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write(path: Path, data: bytes, mode: int, *, exclusive: bool = False) -> None:
    """Write `path` with exactly `mode`, never exposing a key under wider permissions.

    Non-exclusive writes go through a temporary file in the same directory and a rename, so a
    reader sees either the old file or the new one, never half of it.
    """
    try:
        if exclusive:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), mode)  # the umask may have narrowed it
                f.write(data)
            return
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), mode)
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except FileExistsError:
        raise ConfigError(f"{path}: already exists; refusing to overwrite it") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot write: {exc}") from None
