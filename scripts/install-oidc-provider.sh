#!/bin/sh
# Install Node's oidc-provider (the OpenID Certified authorization server) into
# ~/.cache/sidekey/oidc-provider-<version>/ for the OAuth2 client-credentials tests
# (tests/oauth_server.py starts it with tests/oauth/provider.mjs). Only the first run on a
# machine pays (a few seconds: npm fetches oidc-provider and its handful of dependencies).
set -eu

VERSION=9.13.3
exec "$(dirname "$0")/install-npm-package.sh" oidc-provider "$VERSION" "oidc-provider-$VERSION"
