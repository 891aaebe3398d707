"""The client half of SCRAM-SHA-256 (RFC 5802/7677) as PostgreSQL speaks it, with a key cache.

scramp 1.5's `ScramClient` runs PBKDF2 inside `get_client_final()` and takes no precomputed
keys, so every connection would pay the full key derivation (4096 iterations of HMAC-SHA-256
by default, about 2 ms of CPU; much more where operators raise `scram_iterations`). The keys
depend only on (password, salt, iterations), and a PostgreSQL role's salt and iteration count
stay the same until its password changes, so we derive them once per credential and reuse
them: steady-state connections do three HMACs. scramp still supplies SASLprep, and the tests
check this client against scramp's server.

Sans-IO: messages in, messages out. No channel binding: PostgreSQL may offer
SCRAM-SHA-256-PLUS over TLS, and we pick plain SCRAM-SHA-256 (the gs2 header ``n,,``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from collections import OrderedDict
from dataclasses import dataclass

from scramp.utils import ScramException, saslprep

MECHANISM = "SCRAM-SHA-256"
# gs2 header "n,,": the client does not support channel binding. PostgreSQL ignores the
# SCRAM user name (it takes the StartupMessage's), so it is sent empty, as libpq does.
GS2_HEADER = "n,,"
# 18 random bytes = 24 base64 characters: the nonce length libpq uses (SCRAM_RAW_NONCE_LEN).
CLIENT_NONCE_BYTES = 18
# Derived key sets kept: one per (credential, salt, iterations) in use. A busy broker has one
# per identity with a live lease; beyond this the least recently used are forgotten.
MAX_CACHED_KEYS = 4096
# A server asking for fewer iterations than RFC 7677's minimum is broken or hostile (it would
# make a captured exchange cheap to brute-force).
MIN_ITERATIONS = 4096
# An iteration count this high would pin a CPU core for seconds per derivation: refuse it
# rather than let a hostile upstream stall the event loop.
MAX_ITERATIONS = 1_000_000


class ScramError(Exception):
    """The server's SCRAM messages are malformed, or it failed to prove it knows the key."""


@dataclass(frozen=True, slots=True)
class _Keys:
    client_key: bytes
    stored_key: bytes
    server_key: bytes


class ScramKeyCache:
    """Derived SCRAM keys by (password fingerprint, salt, iterations), least recently used out.

    The cache key holds an HMAC of the password under a per-process random key, never the
    password, so nothing in the key can be brute-forced offline if memory is dumped. (The
    derived keys are password-equivalent for that salt, like the password the process holds
    anyway while the lease is alive.)
    """

    def __init__(self, max_entries: int = MAX_CACHED_KEYS) -> None:
        self._max = max_entries
        self._fingerprint_key = secrets.token_bytes(32)
        self._keys: OrderedDict[tuple[bytes, bytes, int], _Keys] = OrderedDict()
        # SASLprep'd passwords by fingerprint of the raw one: scramp's saslprep is pure Python,
        # ~170 us for a 24-character password under load, against ~2 us for the fingerprint.
        self._normalized: OrderedDict[bytes, bytes] = OrderedDict()
        # Derivations performed (cache misses), for tests and benchmarks.
        self.derivations = 0

    def __len__(self) -> int:
        return len(self._keys)

    def normalized(self, password: str) -> bytes:
        """`normalize_password(password)`, remembered per password."""
        fingerprint = hmac.digest(
            self._fingerprint_key, password.encode("utf-8", "surrogatepass"), "sha256"
        )
        found = self._normalized.get(fingerprint)
        if found is not None:
            self._normalized.move_to_end(fingerprint)
            return found
        prepared = normalize_password(password)
        self._normalized[fingerprint] = prepared
        if len(self._normalized) > self._max:
            self._normalized.popitem(last=False)
        return prepared

    def keys_for(self, password: bytes, salt: bytes, iterations: int) -> _Keys:
        fingerprint = hmac.digest(self._fingerprint_key, password, "sha256")
        cache_key = (fingerprint, salt, iterations)
        found = self._keys.get(cache_key)
        if found is not None:
            self._keys.move_to_end(cache_key)
            return found
        salted = hashlib.pbkdf2_hmac("sha256", password, salt, iterations)
        client_key = hmac.digest(salted, b"Client Key", "sha256")
        keys = _Keys(
            client_key=client_key,
            stored_key=hashlib.sha256(client_key).digest(),
            server_key=hmac.digest(salted, b"Server Key", "sha256"),
        )
        self.derivations += 1
        self._keys[cache_key] = keys
        if len(self._keys) > self._max:
            self._keys.popitem(last=False)
        return keys


def normalize_password(password: str) -> bytes:
    """SASLprep the password, falling back to the raw bytes as PostgreSQL does
    (pg_saslprep: a password that is not valid for SASLprep is used as it is)."""
    try:
        prepared: str = saslprep(password)
    except ScramException:
        prepared = password
    return prepared.encode("utf-8")


class ScramClient:
    """One SCRAM-SHA-256 exchange: `client_first()`, `client_final(server_first)`,
    `verify_server_final(server_final)`."""

    def __init__(
        self, password: str, cache: ScramKeyCache, *, username: str = "", nonce: str | None = None
    ) -> None:
        self._password = cache.normalized(password)
        self._cache = cache
        self._nonce = nonce or base64.b64encode(secrets.token_bytes(CLIENT_NONCE_BYTES)).decode()
        # RFC 5802 escapes ',' and '=' in the saslname.
        name = username.replace("=", "=3D").replace(",", "=2C")
        self._client_first_bare = f"n={name},r={self._nonce}"
        self._server_signature: bytes | None = None

    def client_first(self) -> bytes:
        return (GS2_HEADER + self._client_first_bare).encode()

    def client_final(self, server_first: bytes) -> bytes:
        try:
            text = server_first.decode("utf-8")
        except UnicodeDecodeError:
            raise ScramError("server-first-message is not UTF-8") from None
        attrs = _attributes(text)
        if "e" in attrs:
            raise ScramError(f"server reported SCRAM error {attrs['e']!r}")
        nonce, salt_b64, iterations_text = attrs.get("r"), attrs.get("s"), attrs.get("i")
        if nonce is None or salt_b64 is None or iterations_text is None:
            raise ScramError("server-first-message lacks r, s or i")
        if not nonce.startswith(self._nonce) or len(nonce) <= len(self._nonce):
            raise ScramError("server nonce does not extend the client nonce")
        try:
            salt = base64.b64decode(salt_b64, validate=True)
        except (binascii.Error, ValueError):
            raise ScramError("server salt is not valid base64") from None
        if not iterations_text.isdigit():
            raise ScramError("server iteration count is not a number")
        iterations = int(iterations_text)
        if not MIN_ITERATIONS <= iterations <= MAX_ITERATIONS:
            raise ScramError(
                f"server iteration count {iterations} outside {MIN_ITERATIONS}-{MAX_ITERATIONS}"
            )
        keys = self._cache.keys_for(self._password, salt, iterations)
        channel_binding = base64.b64encode(GS2_HEADER.encode()).decode()
        without_proof = f"c={channel_binding},r={nonce}"
        auth_message = f"{self._client_first_bare},{text},{without_proof}".encode()
        client_signature = hmac.digest(keys.stored_key, auth_message, "sha256")
        proof = bytes(a ^ b for a, b in zip(keys.client_key, client_signature, strict=True))
        self._server_signature = hmac.digest(keys.server_key, auth_message, "sha256")
        return f"{without_proof},p={base64.b64encode(proof).decode()}".encode()

    def verify_server_final(self, server_final: bytes) -> None:
        """Raise unless the server proved it knows the password's server key."""
        if self._server_signature is None:
            raise ScramError("server-final-message before client-final-message")
        attrs = _attributes(server_final.decode("utf-8", "replace"))
        if "e" in attrs:
            raise ScramError(f"server reported SCRAM error {attrs['e']!r}")
        try:
            signature = base64.b64decode(attrs.get("v", ""), validate=True)
        except (binascii.Error, ValueError):
            raise ScramError("server signature is not valid base64") from None
        if not hmac.compare_digest(signature, self._server_signature):
            raise ScramError("server signature does not match: the upstream is not who it claims")


def _attributes(text: str) -> dict[str, str]:
    attrs: dict[str, str] = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        if sep and len(name) == 1 and name not in attrs:
            attrs[name] = value
    return attrs
