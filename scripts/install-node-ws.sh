#!/bin/sh
# Install Node's `ws` (the WebSocket client most Node.js code uses) into
# ~/.cache/sidekey/node-ws-<version>/ for the HTTP adapter's WebSocket tests
# (tests/test_http_websocket.py runs tests/node/ws_client.mjs with it). Nothing in the broker
# needs it. Skipped when it is there, so only the first run on a machine pays (a second or two:
# ws has no dependencies). Override the place with SIDEKEY_CACHE.
set -eu

VERSION=8.23.1
PREFIX=${SIDEKEY_CACHE:-$HOME/.cache/sidekey}/node-ws-$VERSION
if [ -f "$PREFIX/node_modules/ws/package.json" ]; then
    echo "$PREFIX"
    exit 0
fi
command -v npm >/dev/null || { echo "install-node-ws: needs Node.js and npm (Debian's nodejs, npm)" >&2; exit 1; }
echo "install-node-ws: installing ws@$VERSION into $PREFIX (once)" >&2
rm -rf "$PREFIX.tmp"
mkdir -p "$PREFIX.tmp"
printf '{"name": "sidekey-node-ws", "private": true, "type": "module"}\n' > "$PREFIX.tmp/package.json"
npm install --prefix "$PREFIX.tmp" --no-audit --no-fund --ignore-scripts --save-exact \
    "ws@$VERSION" >&2
rm -rf "$PREFIX"
mv "$PREFIX.tmp" "$PREFIX"
echo "$PREFIX"
