"""A tiny demo API that insists on a bearer token: the credential Sidekey injects.

Run: python demo/api.py --port 18080 --token-file FILE. It answers /orders with JSON when the
Authorization header carries the token, and 401 otherwise. It never prints the token.
"""

from __future__ import annotations

import argparse
import hmac
from pathlib import Path

from aiohttp import web


def make_app(token: str) -> web.Application:
    expected = f"Bearer {token}".encode()

    async def orders(request: web.Request) -> web.Response:
        got = request.headers.get("Authorization", "").encode()
        if not hmac.compare_digest(got, expected):
            return web.json_response({"error": "missing or wrong API token"}, status=401)
        return web.json_response(
            {
                "orders": [{"id": 1, "item": "espresso"}, {"id": 2, "item": "croissant"}],
                "served_to": request.headers.get("User-Agent", "?"),
            }
        )

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.router.add_get("/orders", orders)
    app.router.add_get("/healthz", healthz)
    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--token-file", type=Path, required=True)
    args = parser.parse_args()
    token = args.token_file.read_text().strip()
    web.run_app(make_app(token), host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
