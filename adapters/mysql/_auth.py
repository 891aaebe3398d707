"""The client side of MySQL's and MariaDB's password methods: what the broker sends for a
scramble, given the credential's password. Pure functions; nothing here is logged.

- ``mysql_native_password``: SHA1(pw) XOR SHA1(scramble + SHA1(SHA1(pw))).
- ``caching_sha2_password``: SHA256(pw) XOR SHA256(SHA256(SHA256(pw)) + scramble) for the
  fast path; the full path sends the password itself (over TLS), or RSA-OAEP encrypted with
  the server's public key when the connection is plain.
- ``client_ed25519`` (MariaDB): an Ed25519 signature of the scramble whose secret scalar is
  derived from SHA-512 of the password, not of a 32-byte seed: MariaDB's own variant of
  ref10's crypto_sign, so `cryptography`'s Ed25519 (seed-based) cannot produce it; the
  group arithmetic below is RFC 8032's (section 6), ~20 ms of CPU per login.
- ``mysql_clear_password``: the password and a NUL, over TLS only.
"""

from __future__ import annotations

import hashlib

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

NATIVE = "mysql_native_password"
CACHING_SHA2 = "caching_sha2_password"
ED25519 = "client_ed25519"
CLEAR = "mysql_clear_password"
SUPPORTED = (NATIVE, CACHING_SHA2, ED25519, CLEAR)


def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


def native_password(password: str, scramble: bytes) -> bytes:
    if not password:
        return b""
    stage1 = hashlib.sha1(password.encode()).digest()  # noqa: S324 - the protocol's own hash
    stage2 = hashlib.sha1(stage1).digest()  # noqa: S324
    return _xor(stage1, hashlib.sha1(scramble[:20] + stage2).digest())  # noqa: S324


def caching_sha2_password(password: str, scramble: bytes) -> bytes:
    if not password:
        return b""
    p1 = hashlib.sha256(password.encode()).digest()
    p2 = hashlib.sha256(hashlib.sha256(p1).digest() + scramble[:20]).digest()
    return _xor(p1, p2)


def rsa_encrypted_password(password: str, scramble: bytes, public_key_pem: bytes) -> bytes:
    """caching_sha2_password's full authentication without TLS: (password + NUL) XOR the
    scramble (repeated), RSA-OAEP encrypted with the server's key (MySQL 8.0.5+)."""
    key = serialization.load_pem_public_key(public_key_pem)
    if not isinstance(key, rsa.RSAPublicKey):
        raise ValueError("the server's public key is not an RSA key")
    plain = password.encode() + b"\0"
    stretched = (scramble[:20] * (len(plain) // 20 + 1))[: len(plain)]
    return key.encrypt(
        _xor(plain, stretched),
        padding.OAEP(mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None),  # noqa: S303
    )


# --------------------------------------------------------------------------- ed25519

_P = 2**255 - 19
_L = 2**252 + 27742317777372353535851937790883648493
_D = -121665 * pow(121666, _P - 2, _P) % _P
_Point = tuple[int, int, int, int]  # extended homogeneous coordinates (X, Y, Z, T)


def _add(p: _Point, q: _Point) -> _Point:
    a = (p[1] - p[0]) * (q[1] - q[0]) % _P
    b = (p[1] + p[0]) * (q[1] + q[0]) % _P
    c = 2 * p[3] * q[3] * _D % _P
    d = 2 * p[2] * q[2] % _P
    e, f, g, h = b - a, d - c, d + c, b + a
    return e * f % _P, g * h % _P, f * g % _P, e * h % _P


def _mul(s: int, p: _Point) -> _Point:
    q: _Point = (0, 1, 1, 0)
    while s > 0:
        if s & 1:
            q = _add(q, p)
        p = _add(p, p)
        s >>= 1
    return q


def _base() -> _Point:
    y = 4 * pow(5, _P - 2, _P) % _P
    x2 = (y * y - 1) * pow(_D * y * y + 1, _P - 2, _P) % _P
    x = pow(x2, (_P + 3) // 8, _P)
    if (x * x - x2) % _P:
        x = x * pow(2, (_P - 1) // 4, _P) % _P
    if x & 1:
        x = _P - x
    return x, y, 1, x * y % _P


_G = _base()


def _compress(p: _Point) -> bytes:
    z_inv = pow(p[2], _P - 2, _P)
    x, y = p[0] * z_inv % _P, p[1] * z_inv % _P
    return (y | (x & 1) << 255).to_bytes(32, "little")


def ed25519_password(password: str, scramble: bytes) -> bytes:
    """MariaDB's client_ed25519 response: a 64-byte signature of `scramble`."""
    az = hashlib.sha512(password.encode()).digest()
    a = int.from_bytes(az[:32], "little") & ((1 << 254) - 8) | 1 << 254
    r = int.from_bytes(hashlib.sha512(az[32:] + scramble).digest(), "little") % _L
    big_r = _compress(_mul(r, _G))
    big_a = _compress(_mul(a, _G))
    h = int.from_bytes(hashlib.sha512(big_r + big_a + scramble).digest(), "little") % _L
    return big_r + ((r + h * a) % _L).to_bytes(32, "little")


def ed25519_public_key(password: str) -> bytes:
    """The public key MariaDB stores for `password` (for tests and checks)."""
    az = hashlib.sha512(password.encode()).digest()
    a = int.from_bytes(az[:32], "little") & ((1 << 254) - 8) | 1 << 254
    return _compress(_mul(a, _G))
