"""What the broker refuses or replaces in a client's request before it goes upstream.

Pure functions and constants (no IO), so the adapter's per-request plan stays one readable
walk and each rule has its own tests:

- paths that could climb out of the upstream URL's base path (`climbs`);
- the forwarding headers: a client's X-Forwarded-*, Forwarded and X-Real-IP are never
  forwarded, and the broker states the hop itself (`forwarded_for`, `FORWARDING_HEADERS`);
- TRACE, whose echo would carry the injected credential back to the client.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

# TRACE asks the upstream to echo the request it received, injected credential included,
# back to the client: refused unless the service says allow_trace: true.
TRACE = "TRACE"

# The broker's own account of the hop to the upstream: who connected (the TCP peer), over
# what, asking for which host. An upstream that trusts these for its logs, rate limits or
# access rules must see only what the broker vouches for, so whatever a client sent under
# any X-Forwarded-* name (Envoy's X-Forwarded-Client-Cert too), Forwarded (RFC 7239) or
# X-Real-IP is dropped.
FORWARDING_HEADERS = frozenset({"x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"})
FORWARDED_PREFIX = "x-forwarded-"
FORWARDED_OTHERS = frozenset({"forwarded", "x-real-ip"})

# A path an upstream could resolve as climbing above the service's base path has a "." or
# ".." segment, percent-encoded or not, with "/" or "\" (IIS, Windows) as the separator, or
# before a ";" (Tomcat's path parameters make "/..;/" a "..").
_SEGMENT_SPLIT = re.compile(r"[/\\]")
_DOT_SEGMENTS = (".", "..")
# Percent-decoding rounds looked through: an upstream, or a framework in front of it, may
# decode twice ("%252e" -> "%2e" -> "."); three covers that with one to spare.
MAX_PATH_DECODES = 3


def climbs(target: str) -> bool:
    """Whether the path of origin-form `target` has a segment an upstream could resolve as
    "." or "..", in any spelling `_SEGMENT_SPLIT` and `MAX_PATH_DECODES` cover.

    Refusing rather than normalising: real clients (curl, browsers, aiohttp, httpx) remove
    dot-segments before they send (RFC 3986 section 5.2.4), so only a hand-made request has
    one, and there is no single normalisation every upstream agrees with."""
    path = target.partition("?")[0].partition("#")[0]
    if "." not in path and "%" not in path:
        return False  # most API paths: no dot can appear, however it is decoded
    for _ in range(MAX_PATH_DECODES + 1):
        for segment in _SEGMENT_SPLIT.split(path):
            if segment.partition(";")[0] in _DOT_SEGMENTS:
                return True
        if "%" not in path:
            return False
        decoded = unquote(path, errors="surrogateescape")
        if decoded == path:
            return False
        path = decoded
    return False


def peer_address(peername: object) -> str | None:
    """The IP address in a transport's ``peername`` (X-Forwarded-For); None for a unix
    socket peer, which has none."""
    if isinstance(peername, tuple) and peername and isinstance(peername[0], str):
        return peername[0]
    return None
