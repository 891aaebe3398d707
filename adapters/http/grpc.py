"""The broker's own answers to a gRPC call, in gRPC's terms.

A gRPC client reads the status of a call from ``grpc-status`` and ``grpc-message``, not from
the HTTP status (which it maps coarsely, and without the broker's explanation). So when the
broker itself refuses a call (identity, policy, credential, upstream failure), the answer is
gRPC's "trailers-only" response (PROTOCOL-HTTP2.md): HTTP 200, content-type application/grpc,
and the status in the one HEADERS frame, with the same words the broker gives an HTTP client.
"""

from __future__ import annotations

from multidict import MultiMapping

# The broker's HTTP status -> the gRPC code that says the same (doc/statuscodes.md, and
# doc/http-grpc-status-mapping.md for the ones gRPC maps itself).
_CODES = {
    400: 13,  # INTERNAL: the request could not be forwarded as sent
    401: 16,  # UNAUTHENTICATED
    403: 7,  # PERMISSION_DENIED
    404: 12,  # UNIMPLEMENTED
    405: 12,  # UNIMPLEMENTED
    429: 8,  # RESOURCE_EXHAUSTED
    431: 8,  # RESOURCE_EXHAUSTED: header fields over the broker's limits
    502: 14,  # UNAVAILABLE
    503: 14,  # UNAVAILABLE: no credential right now, connection limit
    504: 4,  # DEADLINE_EXCEEDED: the upstream did not answer in time
}
_UNKNOWN = 2


def is_grpc(headers: MultiMapping[str]) -> bool:
    """Whether a request is a gRPC call (content-type application/grpc, +proto, +json...)."""
    return headers.get("content-type", "").startswith("application/grpc")


def status_code(http_status: int) -> int:
    return _CODES.get(http_status, _UNKNOWN)


def encode_message(text: str) -> str:
    """``grpc-message`` percent-encoding: UTF-8, every byte outside printable ASCII and '%'
    as %XX."""
    out: list[str] = []
    for byte in text.encode("utf-8"):
        if 0x20 <= byte <= 0x7E and byte != 0x25:
            out.append(chr(byte))
        else:
            out.append(f"%{byte:02X}")
    return "".join(out)


def refusal_fields(http_status: int, message: str) -> list[tuple[str, str]]:
    """The header fields of a trailers-only gRPC answer carrying the broker's refusal."""
    return [
        ("content-type", "application/grpc"),
        ("grpc-status", str(status_code(http_status))),
        ("grpc-message", encode_message(f"sidekey: {message}")),
    ]
