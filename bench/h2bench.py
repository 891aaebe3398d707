"""The HTTP/2 rows' server and load generators (bench/scenarios.py: grpc-unary, h2-multiplex).

    python -m bench.h2bench serve --plain-port P --tls-port T --cert c --key k --ca ca --token X
    python -m bench.h2bench grpc --port P --cert c --key k --ca ca --connections 2 \
        --streams 16 --start-at T --duration D [--header 'authorization: Bearer X']
    python -m bench.h2bench h2 --port P ... --connections 1 --streams 32 ...

``serve`` is a grpcio (``grpc.aio``) server with one unary method on raw bytes
(``/bench.Echo/Unary``), answering UNAUTHENTICATED without the expected ``authorization``
metadata: cleartext HTTP/2 on the plain port (what the broker forwards to, prior knowledge)
and mTLS on the TLS port (the direct baseline, the client sending the token itself).

``grpc`` keeps ``--streams`` unary calls in flight on each of ``--connections`` channels
(each its own TCP connection); ``h2`` keeps ``--streams`` GET requests in flight on each of
``--connections`` HTTP/2 connections, driven by the sans-IO h2 library. Both print one JSON
report in bench/loadgen.py's shape (ok, errors, non2xx, hist of latencies in its buckets).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter
from pathlib import Path

import grpc
import h2.config
import h2.connection
import h2.events

from bench.loadgen import bucket, client_context

METHOD = "/bench.Echo/Unary"
PAYLOAD = b"x" * 64


async def serve(args: argparse.Namespace) -> None:
    expected = f"Bearer {args.token}"

    async def unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        for key, value in context.invocation_metadata() or ():
            if key == "authorization" and value == expected:
                return request
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "no credential")
        raise AssertionError("abort returns never")

    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "bench.Echo", {"Unary": grpc.unary_unary_rpc_method_handler(unary)}
            ),
        )
    )
    server.add_insecure_port(f"127.0.0.1:{args.plain_port}")
    creds = grpc.ssl_server_credentials(
        [(Path(args.key).read_bytes(), Path(args.cert).read_bytes())],
        root_certificates=Path(args.ca).read_bytes(),
        require_client_auth=True,
    )
    server.add_secure_port(f"127.0.0.1:{args.tls_port}", creds)
    await server.start()
    await server.wait_for_termination()


def _metadata(args: argparse.Namespace) -> tuple[tuple[str, str], ...]:
    out = []
    for header in args.header:
        name, _, value = header.partition(":")
        out.append((name.strip().lower(), value.strip()))
    return tuple(out)


async def grpc_load(args: argparse.Namespace) -> dict[str, object]:
    creds = grpc.ssl_channel_credentials(
        Path(args.ca).read_bytes(), Path(args.key).read_bytes(), Path(args.cert).read_bytes()
    )
    # A subchannel pool per channel: otherwise grpc shares one TCP connection among them.
    channels = [
        grpc.aio.secure_channel(
            f"localhost:{args.port}", creds, options=(("grpc.use_local_subchannel_pool", 1),)
        )
        for _ in range(args.connections)
    ]
    metadata = _metadata(args)
    ok = errors = 0
    codes: Counter[str] = Counter()
    hist: Counter[int] = Counter()
    for channel in channels:
        await channel.channel_ready()
    await asyncio.sleep(max(0.0, args.start_at - time.time()))
    start = time.perf_counter_ns()
    end = start + int(args.duration * 1e9)

    async def caller(channel: grpc.aio.Channel) -> None:
        nonlocal ok, errors
        call = channel.unary_unary(METHOD)
        while True:
            sent = time.perf_counter_ns()
            if sent >= end:
                return
            try:
                await call(PAYLOAD, metadata=metadata, timeout=10)
            except grpc.aio.AioRpcError as exc:
                codes[exc.code().name] += 1
                errors += 1
                continue
            now = time.perf_counter_ns()
            if now <= end:
                ok += 1
                hist[bucket((now - sent) // 1000)] += 1

    await asyncio.gather(*(caller(c) for c in channels for _ in range(args.streams)))
    late = max(0.0, (time.perf_counter_ns() - start) / 1e9 - args.duration)
    for channel in channels:
        await channel.close()
    return {
        "mode": "grpc", "ok": ok, "non2xx": 0, "errors": errors, "statuses": dict(codes),
        "seconds": args.duration, "started_late": late, "hist": dict(hist),
    }  # fmt: skip


class _H2Client(asyncio.Protocol):
    """One HTTP/2 connection keeping `streams` GETs in flight until the window ends."""

    def __init__(self, args: argparse.Namespace, end: list[int], report: dict[str, int]) -> None:
        self.args = args
        self.end = end
        self.report = report
        self.hist: Counter[int] = Counter()
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.transport: asyncio.Transport | None = None
        self.sent: dict[int, int] = {}
        self.status: dict[int, bytes] = {}
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.headers = [
            (b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"localhost"),
            (b":path", args.path.encode()),
            *((n.strip().lower().encode(), v.strip().encode())
              for n, _, v in (h.partition(":") for h in args.header)),
        ]  # fmt: skip

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.conn.initiate_connection()
        transport.write(self.conn.data_to_send())  # type: ignore[attr-defined]

    def start(self) -> None:
        for _ in range(self.args.streams):
            self.send()
        self.flush()

    def send(self) -> None:
        stream_id = self.conn.get_next_available_stream_id()
        self.sent[stream_id] = time.perf_counter_ns()
        self.conn.send_headers(stream_id, self.headers, end_stream=True)

    def flush(self) -> None:
        if self.transport is not None:
            self.transport.write(self.conn.data_to_send())

    def data_received(self, data: bytes) -> None:
        for event in self.conn.receive_data(data):
            if isinstance(event, h2.events.RemoteSettingsChanged) and not self.ready.done():
                self.ready.set_result(None)
            elif isinstance(event, h2.events.ResponseReceived):
                self.status[event.stream_id or 0] = dict(event.headers or ()).get(b":status", b"")
            elif isinstance(event, h2.events.DataReceived):
                self.conn.acknowledge_received_data(
                    event.flow_controlled_length or 0, event.stream_id or 0
                )
            elif isinstance(event, h2.events.StreamEnded):
                self._done(event.stream_id or 0)
            elif isinstance(event, h2.events.StreamReset):
                self.report["errors"] += 1
                self.sent.pop(event.stream_id or 0, None)
                self._next()
        self.flush()

    def _done(self, stream_id: int) -> None:
        now = time.perf_counter_ns()
        sent = self.sent.pop(stream_id, now)
        status = self.status.pop(stream_id, b"")
        if self.end[0] and now <= self.end[0]:
            if status.startswith(b"2"):
                self.report["ok"] += 1
                self.hist[bucket((now - sent) // 1000)] += 1
            else:
                self.report["non2xx"] += 1
        self._next()

    def _next(self) -> None:
        if not self.end[0] or time.perf_counter_ns() < self.end[0]:
            self.send()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.end[0] and time.perf_counter_ns() < self.end[0]:
            self.report["errors"] += 1


async def h2_load(args: argparse.Namespace) -> dict[str, object]:
    loop = asyncio.get_running_loop()
    ctx = client_context(args)
    ctx.set_alpn_protocols(["h2"])
    end = [0]
    report = {"ok": 0, "non2xx": 0, "errors": 0}
    clients: list[_H2Client] = []
    for _ in range(args.connections):
        _, proto = await loop.create_connection(
            lambda: _H2Client(args, end, report), args.host, args.port, ssl=ctx,
            server_hostname="localhost",
        )  # fmt: skip
        await asyncio.wait_for(proto.ready, 10)
        clients.append(proto)
    await asyncio.sleep(max(0.0, args.start_at - time.time()))
    start = time.perf_counter_ns()
    end[0] = start + int(args.duration * 1e9)
    for client in clients:
        client.start()
    await asyncio.sleep(args.duration)
    late = max(0.0, (time.perf_counter_ns() - start) / 1e9 - args.duration)
    hist: Counter[int] = Counter()
    for client in clients:
        hist.update(client.hist)
        if client.transport is not None:
            client.transport.abort()
    return {
        "mode": "h2", **report, "statuses": {}, "seconds": args.duration,
        "started_late": late, "hist": dict(hist),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("mode", choices=["serve", "grpc", "h2"])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--plain-port", type=int, default=0)
    parser.add_argument("--tls-port", type=int, default=0)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--ca", required=True)
    parser.add_argument("--token", default="")
    parser.add_argument("--connections", type=int, default=1)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--path", default="/")
    parser.add_argument("--header", action="append", default=[], help="'Name: value'")
    parser.add_argument("--start-at", type=float, default=0.0, help="time.time() to start")
    parser.add_argument("--duration", type=float, default=0.0)
    args = parser.parse_args()
    if args.mode == "serve":
        asyncio.run(serve(args))
        return
    if args.mode == "grpc":
        # grpc.aio drives its own completion queue from asyncio's loop (uvloop not supported).
        report = asyncio.run(grpc_load(args))
    else:
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            report = runner.run(h2_load(args))
    json.dump(report, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
