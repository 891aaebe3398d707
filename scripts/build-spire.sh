#!/bin/sh
# Build SPIRE's server and agent (the tests' real SPIFFE Workload API, SVID rotation and
# JWT-SVIDs) from the Go module proxy into ~/.cache/sidekey/spire-VERSION/bin, outside the
# repository. Skipped when both binaries are there, so only a new machine pays for it:
# 10m43s on 2 cores here, with an empty module and build cache. Needs the machine's Go.
#
# The build is Go's ordinary tool mechanism in a scratch module: `go get -tool` records
# spire's commands (and pins every dependency by spire's own go.sum), `go install` builds
# them. Override the place with SIDEKEY_CACHE (the tests read the same variable).
set -eu

VERSION=${SPIRE_VERSION:-1.13.3}
CACHE=${SIDEKEY_CACHE:-$HOME/.cache/sidekey}
PREFIX=$CACHE/spire-$VERSION
if [ -x "$PREFIX/bin/spire-server" ] && [ -x "$PREFIX/bin/spire-agent" ]; then
    echo "build-spire: $PREFIX/bin is built"
    exit 0
fi
if ! command -v go >/dev/null 2>&1; then
    echo "build-spire: no go command on PATH: install Go (1.24 or newer) first" >&2
    exit 1
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/sidekey-spire-build.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
cd "$WORK"
echo "build-spire: building spire-server and spire-agent v$VERSION with $(go version)"
echo "build-spire: about 11 minutes on 2 cores from an empty Go cache; log in $WORK/build.log"
go mod init sidekey.invalid/spire-build >"$WORK/build.log" 2>&1
go get -tool "github.com/spiffe/spire/cmd/spire-agent@v$VERSION" >>"$WORK/build.log" 2>&1
go get -tool "github.com/spiffe/spire/cmd/spire-server@v$VERSION" >>"$WORK/build.log" 2>&1
# Into a fresh directory renamed at the end: an interrupted build never looks finished.
mkdir -p "$CACHE"
rm -rf "$PREFIX.tmp"
if ! GOBIN="$PREFIX.tmp/bin" nice -n 10 go install \
    github.com/spiffe/spire/cmd/spire-agent github.com/spiffe/spire/cmd/spire-server \
    >>"$WORK/build.log" 2>&1; then
    tail -n 30 "$WORK/build.log" >&2
    echo "build-spire: the build failed (the last lines of its log are above)" >&2
    exit 1
fi
rm -rf "$PREFIX"
mv "$PREFIX.tmp" "$PREFIX"
echo "build-spire: installed in $PREFIX/bin"
