#!/bin/sh
# Build the driver matrix's Go, Node.js and Java clients (tests/compat/{go,node,java}) once
# into ~/.cache/sidekey/compat-<hash>/, where <hash> covers their sources, lock files and the
# toolchains' versions: a second `make test` finds them and builds nothing. One Go module
# (pgx, go-sql-driver/mysql, go-redis, net/http), one npm install (pg, undici), one Maven
# project (pgjdbc, HttpClient). Prints the directory on stdout, progress on stderr.
# Measured build times are in tests/compat/README.md. Override the place with SIDEKEY_CACHE.
set -eu

cd "$(dirname "$0")/.."
SRC=$PWD/tests/compat
for tool in go node npm java mvn sha256sum; do
    command -v "$tool" >/dev/null || { echo "build-compat: needs $tool on PATH" >&2; exit 1; }
done
HASH=$( (
    cat "$SRC/go/go.mod" "$SRC/go/go.sum" "$SRC/go/main.go" \
        "$SRC/node/package.json" "$SRC/node/package-lock.json" "$SRC/node/compat.mjs" \
        "$SRC/java/pom.xml" "$SRC/java/src/main/java/compat/Compat.java"
    go version; node --version; java -version 2>&1
) | sha256sum | cut -c1-12)
PREFIX=${SIDEKEY_CACHE:-$HOME/.cache/sidekey}/compat-$HASH
if [ -f "$PREFIX/.built" ]; then
    echo "$PREFIX"
    exit 0
fi
TMP=$PREFIX.tmp.$$
trap 'rm -rf "$TMP"' EXIT
mkdir -p "$TMP/node"
echo "build-compat: building the driver matrix's clients into $PREFIX (once)" >&2
t0=$(date +%s)
GOFLAGS="-modcacherw -buildvcs=false" nice -n 10 go build -C "$SRC/go" -trimpath \
    -o "$TMP/compat-go" . >&2
t1=$(date +%s)
cp "$SRC/node/package.json" "$SRC/node/package-lock.json" "$SRC/node/compat.mjs" "$TMP/node/"
nice -n 10 npm ci --prefix "$TMP/node" --no-audit --no-fund --loglevel=error >&2
t2=$(date +%s)
cp -r "$SRC/java" "$TMP/java"
nice -n 10 mvn -B -q -f "$TMP/java/pom.xml" package >&2
t3=$(date +%s)
echo "build-compat: go $((t1 - t0)) s, npm $((t2 - t1)) s, maven $((t3 - t2)) s" >&2
touch "$TMP/.built"
rm -rf "$PREFIX"
mv "$TMP" "$PREFIX"
trap - EXIT
echo "$PREFIX"
