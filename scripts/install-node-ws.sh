#!/bin/sh
# Install Node's `ws` (the WebSocket client most Node.js code uses) into
# ~/.cache/sidekey/node-ws-<version>/ for the HTTP adapter's WebSocket tests
# (tests/test_http_websocket.py runs tests/node/ws_client.mjs with it). Only the first run on
# a machine pays (a second or two: ws has no dependencies). Prints the install's directory.
set -eu

VERSION=8.23.1
exec "$(dirname "$0")/install-npm-package.sh" ws "$VERSION" "node-ws-$VERSION"
