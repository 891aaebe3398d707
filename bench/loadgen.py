"""A small load generator that presents a client certificate (wrk and h2load cannot).

Two modes, each one process; the harness starts several with the same ``--start-at`` (a
``time.time()`` value) so they measure the same window, and sums their JSON reports.

``http``: ``--connections`` keep-alive HTTP/1.1 connections over mutual TLS, each with one
request in flight (wrk's model), on a uvloop event loop with a hand-rolled `asyncio.Protocol`
(no HTTP library on the client's hot path). Connections are opened and their handshakes done
before the window starts; only responses that complete inside the window count.

``handshake``: ``--threads`` threads each open a TCP connection, do a full TLS handshake with a
client certificate (no session resumption: a fresh session every time), and close. The
handshake runs in OpenSSL with the GIL released, so the threads overlap. ``resume``: the
same, each thread resuming one TLS 1.3 session (from a ticket it got first) every time.

Latencies go into a histogram (1 us buckets below 1 ms, 10 us below 10 ms, 100 us above)
that merges exactly across processes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import socket
import ssl
import sys
import threading
import time
from collections import Counter
from collections.abc import Mapping

Histogram = Counter[int]


def bucket(us: int) -> int:
    if us < 1_000:
        return us
    if us < 10_000:
        return us - us % 10
    return us - us % 100


def percentile(hist: Mapping[int, int], q: float) -> float | None:
    total = sum(hist.values())
    if not total:
        return None
    rank = q * (total - 1)
    seen = 0
    for value in sorted(hist):
        seen += hist[value]
        if seen > rank:
            return float(value)
    return float(max(hist))


def cpu_seconds() -> float:
    """This process's CPU time so far, every thread, user and kernel."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def client_context(args: argparse.Namespace, tls13_only: bool = False) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=args.ca)
    ctx.load_cert_chain(args.cert, args.key)
    if tls13_only:
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    return ctx


# --------------------------------------------------------------------------- http


def response_length(buf: bytearray) -> int | None:
    """Bytes of the first complete response in `buf` (Content-Length or chunked), or None."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = bytes(buf[:end]).lower()
    at = head.find(b"\r\ncontent-length:")
    if at >= 0:
        stop = head.find(b"\r\n", at + 2)
        total = end + 4 + int(head[at + 17 : stop if stop >= 0 else None])
        return total if len(buf) >= total else None
    if b"\r\ntransfer-encoding: chunked" in head:
        pos = end + 4
        while True:
            line_end = buf.find(b"\r\n", pos)
            if line_end < 0:
                return None
            size = int(bytes(buf[pos:line_end]).split(b";")[0], 16)
            if size == 0:
                trailer_end = buf.find(b"\r\n\r\n", line_end)
                return trailer_end + 4 if trailer_end >= 0 else None
            pos = line_end + 2 + size + 2
            if pos > len(buf):
                return None
    return end + 4


class HttpRun:
    def __init__(self, request: bytes) -> None:
        self.request = request
        self.start = 0
        self.end = 0
        self.ok = 0
        self.non2xx = 0
        self.errors = 0
        self.hist: Histogram = Counter()
        self.statuses: Counter[str] = Counter()
        self.conns: list[HttpClient] = []


class HttpClient(asyncio.Protocol):
    def __init__(self, run: HttpRun) -> None:
        self.run = run
        self.buf = bytearray()
        self.sent_at = 0
        self.transport: asyncio.Transport | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TLS transport is not an asyncio.Transport subclass, but has its methods.
        self.transport = transport  # type: ignore[assignment]

    def send(self) -> None:
        assert self.transport is not None
        self.sent_at = time.perf_counter_ns()
        self.transport.write(self.run.request)

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        length = response_length(buf)
        if length is None:
            return
        now = time.perf_counter_ns()
        run = self.run
        status = bytes(buf[9:12]).decode("ascii", "replace")
        del buf[:length]
        if now <= run.end:
            if status.startswith("2"):
                run.ok += 1
                run.hist[bucket((now - self.sent_at) // 1000)] += 1
            else:
                run.non2xx += 1
                run.statuses[status] += 1
            self.send()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if time.perf_counter_ns() < self.run.end:
            self.run.errors += 1


async def http_main(args: argparse.Namespace) -> dict[str, object]:
    loop = asyncio.get_running_loop()
    ctx = client_context(args)
    headers = "".join(f"{h}\r\n" for h in args.header)
    run = HttpRun(f"GET {args.path} HTTP/1.1\r\nHost: localhost\r\n{headers}\r\n".encode())
    for _ in range(args.connections):
        _, proto = await loop.create_connection(
            lambda: HttpClient(run), args.host, args.port, ssl=ctx, server_hostname="localhost"
        )
        run.conns.append(proto)
    await asyncio.sleep(max(0.0, args.start_at - time.time()))
    run.start = time.perf_counter_ns()
    run.end = run.start + int(args.duration * 1e9)
    cpu_at_start = cpu_seconds()
    for conn in run.conns:
        conn.send()
    while True:
        await asyncio.sleep(0.05)
        if time.perf_counter_ns() >= run.end:
            break
        # A connection the server closed mid-window: replace it, so concurrency stays put.
        for i, conn in enumerate(run.conns):
            if conn.closed:
                try:
                    _, proto = await loop.create_connection(
                        lambda: HttpClient(run),
                        args.host,
                        args.port,
                        ssl=ctx,
                        server_hostname="localhost",
                    )
                except OSError:
                    run.errors += 1
                    continue
                run.conns[i] = proto
                proto.send()
    late = max(0.0, (time.perf_counter_ns() - run.start) / 1e9 - args.duration)
    cpu = cpu_seconds() - cpu_at_start
    for conn in run.conns:
        if conn.transport is not None:
            conn.transport.abort()
    return {
        "mode": "http",
        "ok": run.ok,
        "non2xx": run.non2xx,
        "statuses": dict(run.statuses),
        "errors": run.errors,
        "seconds": args.duration,
        "started_late": late,
        "cpu_seconds": cpu,
        "hist": dict(run.hist),
    }


# --------------------------------------------------------------------------- handshake


def _ticket(args: argparse.Namespace, ctx: ssl.SSLContext) -> ssl.SSLSession:
    """A TLS 1.3 session to resume: a full handshake and one request, whose reply carries
    the server's ticket in with it (Python reads a ticket only along with data)."""
    with (
        socket.create_connection((args.host, args.port), 5) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        tls.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        while tls.recv(65536):
            pass
        session = tls.session
    if session is None or not session.has_ticket:
        raise SystemExit("resume: the server sent no session ticket")
    return session


def handshake_main(args: argparse.Namespace) -> dict[str, object]:
    ctx = client_context(args, tls13_only=True)
    # Probe once outside the window: the certificate is accepted and what was negotiated.
    with (
        socket.create_connection((args.host, args.port), 5) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as probe,
    ):
        negotiated = f"{probe.version()} {probe.cipher()[0]}"  # type: ignore[index]
    start = args.start_at
    end = start + args.duration
    counts = [0] * args.threads
    errors = [0] * args.threads
    hists: list[Histogram] = [Counter() for _ in range(args.threads)]

    resume = args.mode == "resume"
    resumed = [0] * args.threads

    def worker(i: int) -> None:
        hist = hists[i]
        session = _ticket(args, ctx) if resume else None
        time.sleep(max(0.0, start - time.time()))
        while True:
            began = time.time()
            if began >= end:
                return
            try:
                with (
                    socket.create_connection((args.host, args.port), 5) as raw,
                    ctx.wrap_socket(raw, server_hostname="localhost", session=session) as tls,
                ):
                    done = time.time()
                    reused = tls.session_reused
            except OSError:
                errors[i] += 1
                continue
            if done <= end:
                counts[i] += 1
                resumed[i] += reused
                hist[bucket(int((done - began) * 1e6))] += 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(args.threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(args.duration + 30)
    total: Histogram = Counter()
    for h in hists:
        total.update(h)
    return {
        "mode": args.mode,
        "ok": sum(counts),
        "resumed": sum(resumed),
        "non2xx": 0,
        "errors": sum(errors),
        "seconds": args.duration,
        "negotiated": negotiated,
        "hist": dict(total),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("mode", choices=["http", "handshake", "resume"])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--ca", required=True)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--path", default="/")
    parser.add_argument("--header", action="append", default=[], help="'Name: value'")
    parser.add_argument("--start-at", type=float, required=True, help="time.time() to start")
    parser.add_argument("--duration", type=float, required=True)
    args = parser.parse_args()
    if args.mode in ("handshake", "resume"):
        report = handshake_main(args)
    else:
        try:
            import uvloop

            runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
        except ImportError:
            runner = asyncio.Runner()
        with runner:
            report = runner.run(http_main(args))
    json.dump(report, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
