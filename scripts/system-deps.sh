#!/usr/bin/env bash
# Install the Debian packages Sidekey's tests, demo or benchmarks need, if any is missing.
#   base:  PostgreSQL server and clients (psql, pgbench), MariaDB server and clients (mariadb,
#          mysqlslap), Redis server and tools (redis-cli, redis-benchmark), curl, python3-venv,
#          rsyslog (the audit syslog sink's tests start their own rsyslogd)
#          nodejs with its npm (Node clients the tests install into ~/.cache/sidekey: scripts/install-*.sh)
#   bench: base + pgbouncer, nginx-light, wrk, valgrind (make bench-callgrind), sysbench
set -euo pipefail

want=(postgresql postgresql-client mariadb-server mariadb-client redis-server redis-tools
      curl python3-venv rsyslog nodejs)
if [ "${1:-base}" = bench ]; then
  want+=(pgbouncer nginx-light wrk valgrind sysbench)
fi

missing=()
for pkg in "${want[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0

# One apt at a time on a shared machine (several worktrees' `make test` at once).
exec 9>/tmp/sidekey-apt.lock
flock 9
echo "installing Debian packages: ${missing[*]}" >&2
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -q >/dev/null
# Debian's postgresql, mariadb-server and redis-server packages may start servers of their
# own (on their default ports); the tests start throwaway ones on free ports and never touch
# those.
$sudo apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
