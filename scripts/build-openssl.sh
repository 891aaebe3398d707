#!/bin/sh
# Build OpenSSL 3.5 (Debian 13's release) as shared libraries under .cache/, for
# `make bench-openssl`: the same benchmark with every process on OpenSSL 3.5 instead of
# Debian 12's 3.0. Nothing in the broker needs it; it answers "what would a newer OpenSSL
# change" with figures. The source is Debian's own tarball, checked against the SHA-256 in
# trixie's signed Sources index. Took 3 minutes on 2 cores here, once.
set -eu

VERSION=3.5.7
SHA256=a8c0d28a529ca480f9f36cf5792e2cd21984552a3c8e4aa11a24aa31aeac98e8
URL=http://deb.debian.org/debian/pool/main/o/openssl/openssl_$VERSION.orig.tar.gz

cd "$(dirname "$0")/.."
PREFIX=$(pwd)/.cache/openssl-$VERSION
if [ -f "$PREFIX/lib/libssl.so.3" ]; then
    echo "build-openssl: $PREFIX is built"
    exit 0
fi
WORK=$(pwd)/.cache/openssl-build
rm -rf "$WORK"
mkdir -p "$WORK"
echo "build-openssl: downloading $URL"
curl -fsS --max-time 600 -o "$WORK/src.tar.gz" "$URL"
echo "$SHA256  $WORK/src.tar.gz" | sha256sum -c --quiet
tar xzf "$WORK/src.tar.gz" -C "$WORK"
cd "$WORK/openssl-$VERSION"
# The system's configuration and CA directory, so the libraries behave as Debian's would.
echo "build-openssl: configuring and building (a few minutes; log in $WORK/build.log)"
./Configure --prefix="$PREFIX" --libdir=lib --openssldir=/usr/lib/ssl \
    shared no-tests no-docs >"$WORK/build.log" 2>&1
make -j"$(nproc)" >>"$WORK/build.log" 2>&1
make install_sw >>"$WORK/build.log" 2>&1
rm -rf "$WORK"
echo "build-openssl: installed in $PREFIX"
