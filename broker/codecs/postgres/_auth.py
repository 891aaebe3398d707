"""Pure helpers for authenticating to an upstream server. SCRAM is left to ``scramp``."""

import hashlib

from ._constants import MD5_SALT_LENGTH


def _md5_hex(data: bytes) -> bytes:
    # MD5 is what the protocol's "md5" method prescribes; nothing here chooses it.
    return hashlib.md5(data, usedforsecurity=False).hexdigest().encode("ascii")


def md5_password(user: str, password: str, salt: bytes) -> bytes:
    """The PasswordMessage payload answering AuthenticationMD5Password(salt).

    ``"md5" + hex(md5(hex(md5(password + user)) + salt))``, as libpq computes it.
    """
    if len(salt) != MD5_SALT_LENGTH:
        raise ValueError(f"salt must be {MD5_SALT_LENGTH} bytes, got {len(salt)}")
    inner = _md5_hex(password.encode("utf-8") + user.encode("utf-8"))
    return b"md5" + _md5_hex(inner + salt)
