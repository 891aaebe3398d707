"""A bounded cache of X.509-SVID → identity mappings, so a workload that reconnects does not
pay certificate parsing and the SPIFFE checks on every connection.

`broker.identity.identity_from_der` is a pure function of (certificate DER, trust domains), so
caching its successes changes no outcome: the key is the DER itself (dict lookup hashes it and
compares it byte for byte, so there is no collision to reason about), and an entry is dropped
once the certificate's notAfter has passed. Chain and validity checks are not cached: OpenSSL
runs them in every handshake, before anything here is consulted. Failures are not cached: a
rejected certificate is rare and re-checking it costs one parse.
"""

from __future__ import annotations

from collections import OrderedDict
from datetime import UTC, datetime

from broker.identity.workload import WorkloadIdentity
from broker.identity.x509 import TrustDomains, identity_from_der

# Distinct client certificates remembered. One per workload instance with a live SVID; at
# about 1 KiB per entry (DER key plus identity), the cap bounds the cache near 4 MiB.
MAX_CACHED_SVIDS = 4096


class SvidCache:
    """`identity(der, trust_domain)`: `identity_from_der` with its successes remembered
    (least recently used out, expired certificates never returned)."""

    __slots__ = ("_anchors", "_entries", "_max", "hits", "misses")

    def __init__(self, max_entries: int = MAX_CACHED_SVIDS) -> None:
        self._max = max_entries
        self._entries: OrderedDict[tuple[bytes, TrustDomains], WorkloadIdentity] = OrderedDict()
        # Certificate DER -> the trust anchor OpenSSL verified its chain to in a full
        # handshake: what a resumed TLS session (no chain verified) is identified by.
        self._anchors: OrderedDict[bytes, bytes] = OrderedDict()
        # For tests and benchmarks.
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def identity(self, der: bytes | None, trust_domain: TrustDomains) -> WorkloadIdentity:
        """The identity proven by a chain-verified client certificate; raises IdentityError."""
        if der:
            key = (der, trust_domain)
            found = self._entries.get(key)
            if found is not None:
                if found.expires is None or datetime.now(UTC) < found.expires:
                    self._entries.move_to_end(key)
                    self.hits += 1
                    return found
                del self._entries[key]
        identity = identity_from_der(der, trust_domain)
        self.misses += 1
        assert der  # identity_from_der raised otherwise
        self._entries[(der, trust_domain)] = identity
        if len(self._entries) > self._max:
            self._entries.popitem(last=False)
        return identity

    def remember_anchor(self, der: bytes, anchor: bytes) -> None:
        """Note that a full handshake verified `der`'s chain to the trust anchor `anchor`."""
        self._anchors[der] = anchor
        self._anchors.move_to_end(der)
        if len(self._anchors) > self._max:
            self._anchors.popitem(last=False)

    def anchor(self, der: bytes) -> bytes | None:
        """The trust anchor a full handshake verified `der` to, or None if none did (or it
        has been forgotten since)."""
        found = self._anchors.get(der)
        if found is not None:
            self._anchors.move_to_end(der)
        return found
