#!/usr/bin/env bash
# Install the Debian packages Sidekey's tests, demo or benchmarks need, if any is missing.
#   base:  PostgreSQL server and clients (psql, pgbench), curl, python3-venv
#   bench: base + pgbouncer, nginx-light, wrk, valgrind (make bench-callgrind)
set -euo pipefail

want=(postgresql postgresql-client curl python3-venv)
if [ "${1:-base}" = bench ]; then
  want+=(pgbouncer nginx-light wrk valgrind)
fi

missing=()
for pkg in "${want[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0

echo "installing Debian packages: ${missing[*]}" >&2
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -q >/dev/null
# Debian's postgresql package starts a cluster of its own; the tests start throwaway ones
# and never touch it.
$sudo apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
