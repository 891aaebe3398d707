#!/bin/sh
# Install Node's oidc-provider (the OpenID Certified authorization server) into
# ~/.cache/sidekey/oidc-provider-<version>/ for the OAuth2 client-credentials tests
# (tests/oauth_server.py starts it with tests/oauth/provider.mjs). Nothing in the broker needs
# it. Skipped when it is there, so only the first run on a machine pays (a few seconds: npm
# fetches oidc-provider and its handful of dependencies). Override the place with SIDEKEY_CACHE.
set -eu

VERSION=9.13.3
PREFIX=${SIDEKEY_CACHE:-$HOME/.cache/sidekey}/oidc-provider-$VERSION
if [ -f "$PREFIX/node_modules/oidc-provider/package.json" ]; then
    exit 0
fi
command -v npm >/dev/null || { echo "install-oidc-provider: needs Node.js and npm (Debian's nodejs, npm)" >&2; exit 1; }
echo "install-oidc-provider: installing oidc-provider@$VERSION into $PREFIX (once)"
mkdir -p "$PREFIX.tmp"
printf '{"name": "sidekey-oidc-provider", "private": true, "type": "module"}\n' > "$PREFIX.tmp/package.json"
npm install --prefix "$PREFIX.tmp" --no-audit --no-fund --ignore-scripts --save-exact \
    "oidc-provider@$VERSION" >&2
rm -rf "$PREFIX"
mv "$PREFIX.tmp" "$PREFIX"
