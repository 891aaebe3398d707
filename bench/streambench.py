"""The streaming rows' client: first-byte time on fresh connections, and a 1 GB transfer.

A plain blocking client on purpose, with Nagle left on (no TCP_NODELAY), as many simple
clients are: after a TLS 1.3 handshake its request waits in the kernel until the server ACKs
the client's Finished, which a server that sends session tickets does at once (the ACK rides
on them) and one that sends none only after its delayed-ACK timer (~40 ms on Linux).

    python -m bench.streambench ttfb --port P --cert C --key K --ca B --duration 5 [--header H]
    python -m bench.streambench transfer --port P --cert C --key K --ca B --bytes N [--header H]

Prints one JSON object: ttfb: the first-byte times (request written -> first response byte)
and the handshake times in microseconds, one per connection; transfer: seconds and bytes of
the upload (POST /sink) and the download (GET /bytes/N) on one keep-alive connection.
"""

from __future__ import annotations

import argparse
import json
import socket
import ssl
import time

from bench.loadgen import client_context

BLOCK_BYTES = 256 * 1024
# A response head is far smaller; reading this much at once keeps the loop short.
READ_BYTES = 256 * 1024


def _connect(args: argparse.Namespace) -> tuple[ssl.SSLSocket, float]:
    ctx = client_context(args)
    started = time.perf_counter()
    raw = socket.create_connection(("127.0.0.1", args.port))
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 0)  # Nagle on, as said above
    sock = ctx.wrap_socket(raw, server_hostname="localhost")
    return sock, time.perf_counter() - started


def _head(args: argparse.Namespace, request_line: str, extra: str = "") -> bytes:
    headers = "".join(f"{h}\r\n" for h in args.header)
    return f"{request_line}\r\nHost: bench\r\n{headers}{extra}\r\n".encode()


def _read_response(sock: ssl.SSLSocket) -> tuple[int, int]:
    """Read one response with a Content-Length body: (status, body bytes)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(READ_BYTES)
        if not chunk:
            raise ConnectionError("closed before the response head")
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    got = len(rest)
    while got < length:
        chunk = sock.recv(READ_BYTES)
        if not chunk:
            raise ConnectionError("closed mid-body")
        got += len(chunk)
    return status, got


def ttfb(args: argparse.Namespace) -> dict[str, object]:
    first: list[float] = []
    handshakes: list[float] = []
    errors = 0
    request = _head(args, "GET /ttfb HTTP/1.1", "Connection: close\r\n")
    deadline = time.monotonic() + args.duration
    while time.monotonic() < deadline:
        try:
            sock, handshake = _connect(args)
            with sock:
                sent = time.perf_counter()
                sock.sendall(request)
                sock.recv(1)
                first.append((time.perf_counter() - sent) * 1e6)
                handshakes.append(handshake * 1e6)
        except (OSError, ssl.SSLError):
            errors += 1
    return {"first_byte_us": first, "handshake_us": handshakes, "errors": errors}


def transfer(args: argparse.Namespace) -> dict[str, object]:
    size = args.bytes
    block = memoryview(bytes(BLOCK_BYTES))
    sock, _ = _connect(args)
    with sock:
        started = time.perf_counter()
        sock.sendall(_head(args, "POST /sink HTTP/1.1", f"Content-Length: {size}\r\n"))
        left = size
        while left:
            n = min(left, BLOCK_BYTES)
            sock.sendall(block[:n])
            left -= n
        status_up, _ = _read_response(sock)
        upload_s = time.perf_counter() - started
        started = time.perf_counter()
        sock.sendall(_head(args, f"GET /bytes/{size} HTTP/1.1"))
        status_down, got = _read_response(sock)
        download_s = time.perf_counter() - started
    return {
        "upload_s": upload_s,
        "download_s": download_s,
        "bytes": size,
        "downloaded": got,
        "statuses": [status_up, status_down],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("mode", choices=("ttfb", "transfer"))
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--ca", required=True)
    parser.add_argument("--header", action="append", default=[])
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--bytes", type=int, default=1024**3)
    args = parser.parse_args()
    result = ttfb(args) if args.mode == "ttfb" else transfer(args)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
