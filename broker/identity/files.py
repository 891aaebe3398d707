"""Identity material from files: ``tls.cert``/``tls.key``, ``identity.x509_bundle`` and the
federated bundle files, read, checked, and watched for change.

What cert-manager, spiffe-helper or a CSI driver writes is replaced on disk while the broker
runs, usually by a rename (a new inode), sometimes in place (a new mtime), and the certificate
and key are two files written one after the other. `FileWatch` notices either by comparing
each file's (device, inode, size, mtime) with what it read last; `read_svid` and
`read_bundle` parse and check a new pair or bundle (the key matches the certificate), and
`broker.identity.material` has OpenSSL load it too before anything uses it, so a half-written
or mismatched file is reported and the current material stays in service.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes

from broker.errors import ConfigError

from .trust import SIGNING_KEYS, Bundle, Svid, spiffe_id_of

# A certificate, key or bundle file larger than this is not one (a bundle of a few hundred
# CA certificates is well under it).
MAX_FILE_BYTES = 1024 * 1024

# What identifies one version of a file on disk.
Stat = tuple[int, int, int, int] | None


def file_stat(path: Path) -> Stat:
    """(device, inode, size, mtime_ns) of `path`, following symlinks (Kubernetes secret
    volumes swap a ``..data`` symlink); None when it cannot be read right now."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _read(path: Path, where: str) -> bytes:
    try:
        with path.open("rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read {path}: {exc.strerror}") from None
    if len(data) > MAX_FILE_BYTES:
        raise ConfigError(f"{where}: {path} is larger than {MAX_FILE_BYTES} bytes")
    return data


def read_svid(cert: Path, key: Path, where: str = "tls") -> Svid:
    """The certificate chain in `cert` and the private key in `key`, checked as a pair.
    Raises `ConfigError` naming what is wrong."""
    cert_pem, key_pem = _read(cert, f"{where}.cert"), _read(key, f"{where}.key")
    return parse_svid(cert_pem, key_pem, f"file:{cert}", where)


def parse_svid(cert_pem: bytes, key_pem: bytes, source: str, where: str = "tls") -> Svid:
    """A certificate chain (PEM, leaf first) and its private key (PEM), checked as a pair."""
    try:
        chain = tuple(x509.load_pem_x509_certificates(cert_pem))
    except ValueError:
        raise ConfigError(
            f"{where}.cert: cannot load certificate/key pair: no PEM certificate in it (or a "
            "malformed one)"
        ) from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        why = "it is encrypted" if isinstance(exc, TypeError) else "no PEM private key in it"
        raise ConfigError(f"{where}.key: cannot load certificate/key pair: {why}") from None
    if not isinstance(key, SIGNING_KEYS):
        raise ConfigError(
            f"{where}.key: cannot load certificate/key pair: unsupported key type "
            f"{type(key).__name__}"
        )
    if _public(key) != _public_of(chain[0]):
        raise ConfigError(
            f"{where}.key: cannot load certificate/key pair: the key is not the one of the "
            f"certificate in {where}.cert"
        )
    return Svid(chain, key, source, spiffe_id_of(chain[0]))


def read_bundle(trust_domain: str, path: Path, where: str) -> Bundle:
    """The X.509 authorities (PEM certificates) in `path`. Raises `ConfigError`."""
    return parse_bundle(trust_domain, _read(path, where), f"file:{path}", where)


def parse_bundle(trust_domain: str, pem: bytes, source: str, where: str) -> Bundle:
    try:
        authorities = tuple(x509.load_pem_x509_certificates(pem))
    except ValueError:
        raise ConfigError(
            f"{where}: no PEM certificate in the bundle (or a malformed one)"
        ) from None
    return Bundle(trust_domain, authorities, source)


@dataclass
class FileWatch:
    """The files of one piece of material and their `Stat` when last read."""

    paths: tuple[Path, ...]
    seen: tuple[Stat, ...] = ()

    def current(self) -> tuple[Stat, ...]:
        return tuple(file_stat(p) for p in self.paths)

    def changed(self) -> bool:
        return self.current() != self.seen


def watches(
    cert: Path | None, key: Path | None, bundles: Mapping[str, Path]
) -> dict[str, FileWatch]:
    """One watch per piece: ``svid`` for the pair, the trust domain's name for a bundle."""
    found: dict[str, FileWatch] = {}
    if cert is not None and key is not None:
        found["svid"] = FileWatch((cert, key))
    for td, path in bundles.items():
        found[td] = FileWatch((path,))
    return found


def _public(key: CertificateIssuerPrivateKeyTypes) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _public_of(cert: x509.Certificate) -> bytes:
    return cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
