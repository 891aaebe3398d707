#!/bin/sh
# Install checkov (the chart's policy scan in `make test`) into a venv of its own under
# ~/.cache/sidekey/checkov-<version>/: checkov pins packaging<24 and pytest needs >=24, so it
# cannot share the project's .venv. Skipped when it is installed (the .installed stamp is
# written last, so an interrupted install is redone).
set -eu

VERSION=3.3.30
PYTHON=${PYTHON:-python3}
PREFIX=${SIDEKEY_CACHE:-$HOME/.cache/sidekey}/checkov-$VERSION
if [ -f "$PREFIX/.installed" ]; then
    exit 0
fi
echo "install-checkov: installing checkov $VERSION into $PREFIX (once)"
rm -rf "$PREFIX"
"$PYTHON" -m venv "$PREFIX"
"$PREFIX/bin/pip" install --quiet --disable-pip-version-check "checkov==$VERSION"
"$PREFIX/bin/checkov" --version
touch "$PREFIX/.installed"
