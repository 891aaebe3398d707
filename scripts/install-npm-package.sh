#!/bin/sh
# Install one npm package at an exact version into ~/.cache/sidekey/<dir>/ (SIDEKEY_CACHE to
# put it elsewhere), once per machine: skipped when it is there. For the tests' Node tools
# (scripts/install-oidc-provider.sh, scripts/install-node-ws.sh); nothing in the broker needs
# them. Prints the install's directory on stdout; npm's output goes to stderr.
#
#     scripts/install-npm-package.sh <package> <version> <dir>
set -eu

PACKAGE=$1
VERSION=$2
PREFIX=${SIDEKEY_CACHE:-$HOME/.cache/sidekey}/$3
if [ -f "$PREFIX/node_modules/$PACKAGE/package.json" ]; then
    echo "$PREFIX"
    exit 0
fi
command -v npm >/dev/null || { echo "install-npm-package: $PACKAGE needs Node.js and npm (Debian's nodejs, npm)" >&2; exit 1; }
echo "install-npm-package: installing $PACKAGE@$VERSION into $PREFIX (once)" >&2
rm -rf "$PREFIX.tmp"
mkdir -p "$PREFIX.tmp"
printf '{"name": "sidekey-%s", "private": true, "type": "module"}\n' "$3" > "$PREFIX.tmp/package.json"
npm install --prefix "$PREFIX.tmp" --no-audit --no-fund --ignore-scripts --save-exact \
    "$PACKAGE@$VERSION" >&2
rm -rf "$PREFIX"
mv "$PREFIX.tmp" "$PREFIX"
echo "$PREFIX"
