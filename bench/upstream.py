"""An aiohttp upstream for the HTTP rows: 200 "ok" after `--delay` seconds, 401 without the
expected ``Authorization: Bearer <token>`` header (so a row that forgot to inject fails loudly).
The streaming rows' routes answer without the delay: ``GET /ttfb`` (a small body at once),
``POST /sink`` (reads the body, answers its size) and ``GET /bytes/N`` (N bytes, streamed).

Plain HTTP on ``--plain-port`` (what the broker and nginx proxy to) and HTTPS with required
client certificates on ``--tls-port`` (what the direct baseline talks to).

    python -m bench.upstream --plain-port 8080 --tls-port 8443 --cert c.pem --key k.pem \
        --ca bundle.pem --token T --delay 0.01
"""

from __future__ import annotations

import argparse
import asyncio
import ssl

from aiohttp import web


def make_app(token: str, delay: float) -> web.Application:
    expected = f"Bearer {token}"

    async def handle(request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != expected:
            return web.Response(status=401, text="no credential\n")
        if delay > 0:
            await asyncio.sleep(delay)
        return web.Response(text="ok\n")

    async def ttfb(request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != expected:
            return web.Response(status=401, text="no credential\n")
        return web.Response(text="ok\n")

    async def sink(request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != expected:
            return web.Response(status=401, text="no credential\n")
        size = 0
        async for chunk in request.content.iter_any():
            size += len(chunk)
        return web.Response(text=f"{size}\n")

    async def source(request: web.Request) -> web.StreamResponse:
        if request.headers.get("Authorization") != expected:
            return web.Response(status=401, text="no credential\n")
        size = int(request.match_info["size"])
        response = web.StreamResponse()
        response.content_length = size
        await response.prepare(request)
        block = bytes(256 * 1024)
        while size:
            n = min(size, len(block))
            await response.write(block[:n] if n < len(block) else block)
            size -= n
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/ttfb", ttfb)
    app.router.add_post("/sink", sink)
    app.router.add_get("/bytes/{size:[0-9]+}", source)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


async def serve(args: argparse.Namespace) -> None:
    runner = web.AppRunner(make_app(args.token, args.delay), access_log=None)
    await runner.setup()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=args.ca)
    ctx.load_cert_chain(args.cert, args.key)
    ctx.verify_mode = ssl.CERT_REQUIRED
    await web.TCPSite(runner, "127.0.0.1", args.plain_port, backlog=1024).start()
    await web.TCPSite(runner, "127.0.0.1", args.tls_port, ssl_context=ctx, backlog=1024).start()
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--plain-port", type=int, required=True)
    parser.add_argument("--tls-port", type=int, required=True)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--ca", required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--delay", type=float, default=0.0)
    args = parser.parse_args()
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    with runner:
        runner.run(serve(args))


if __name__ == "__main__":
    main()
