#!/usr/bin/env bash
# Make sure PostgreSQL server binaries (initdb, pg_ctl, postgres) exist, for the test suite's
# throwaway loopback server (tests/cache_store/pgserver.py). Uses what is installed; otherwise
# installs the distribution's `postgresql` package non-interactively with apt-get.
#   --check   only report; exit 1 if nothing is found (never installs)
# Prints the directory it found. The tests look in the same places (and in $AUTOQUANT_PG_BIN).
set -euo pipefail

find_bin() {
    local dir
    for dir in "${AUTOQUANT_PG_BIN:-}" \
               "$(dirname "$(readlink -f "$(command -v pg_ctl 2>/dev/null || echo /nonexistent)")")" \
               $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -t/ -k4 -V -r) \
               /usr/local/pgsql/bin; do
        if [ -n "$dir" ] && [ -x "$dir/initdb" ] && [ -x "$dir/pg_ctl" ] && [ -x "$dir/postgres" ]; then
            echo "$dir"
            return 0
        fi
    done
    return 1
}

report() {
    echo "ensure_postgres: found PostgreSQL server binaries in $1 ($("$1/postgres" --version))"
}

if dir="$(find_bin)"; then
    report "$dir"
    exit 0
fi
if [ "${1:-}" = "--check" ]; then
    echo "ensure_postgres: no PostgreSQL server binaries found" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure_postgres: no PostgreSQL server binaries and no apt-get: install PostgreSQL" \
         "(initdb, pg_ctl, postgres) and/or set AUTOQUANT_PG_BIN to its bin directory" >&2
    exit 1
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo -n"
fi
echo "ensure_postgres: no server binaries found; installing the postgresql package with apt-get"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends postgresql
if dir="$(find_bin)"; then
    report "$dir"
    exit 0
fi
echo "ensure_postgres: installed postgresql but found no initdb/pg_ctl/postgres" >&2
exit 1
