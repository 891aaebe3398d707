#!/bin/sh
# Build helm from the Go module proxy into ~/.cache/sidekey/helm-<version>/, for the chart
# checks in `make test` (helm lint, helm template). Nothing in the broker needs it. Skipped
# when the binary is there, so only the first run on a machine pays for it. From empty Go
# module and build caches it took 22m53s on 2 cores shared with seven other builds and test
# runs (load average 8-14), of which 7m23s CPU (6m17s user, 1m06s sys): about 4 minutes on an
# idle 2-core machine, plus fetching ~200 modules. Override the place with SIDEKEY_CACHE.
set -eu

VERSION=v4.3.2
PREFIX=${SIDEKEY_CACHE:-$HOME/.cache/sidekey}/helm-$VERSION
if [ -x "$PREFIX/bin/helm" ]; then
    exit 0
fi
command -v go >/dev/null || { echo "build-helm: needs Go (the go toolchain) on PATH" >&2; exit 1; }
mkdir -p "$PREFIX/bin"
echo "build-helm: building helm.sh/helm/v4 $VERSION into $PREFIX (about 4 min on 2 idle cores, once)"
# helm's own Makefile sets its version at link time; without it `helm version` says "v4.3".
GOBIN="$PREFIX/bin.tmp" GOFLAGS=-buildvcs=false nice -n 10 go install \
    -trimpath -ldflags "-s -w -X helm.sh/helm/v4/internal/version.version=$VERSION" \
    "helm.sh/helm/v4/cmd/helm@$VERSION"
mv "$PREFIX/bin.tmp/helm" "$PREFIX/bin/helm"
rmdir "$PREFIX/bin.tmp"
"$PREFIX/bin/helm" version --short
