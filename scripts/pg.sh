#!/usr/bin/env bash
# PostgreSQL server binaries for the shared-registry tests (issue 15): Debian's `postgresql` package.
# Idempotent: does nothing when initdb, pg_ctl and postgres are already there. The tests start their
# own throwaway server from these binaries (guard/index/pg_local.py); they skip, saying why, without them.
set -euo pipefail
have_pg() {
  for d in /usr/lib/postgresql/*/bin; do
    [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ] && [ -x "$d/postgres" ] && return 0
  done
  return 1
}
if have_pg; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "[pg] installing the PostgreSQL server (apt-get install postgresql)"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql; } \
    >/dev/null 2>&1 || echo "[pg] PostgreSQL install failed: the PostgreSQL registry tests will be skipped"
else
  echo "[pg] no PostgreSQL server binaries and no root apt-get: the PostgreSQL registry tests will be skipped"
fi
have_pg || true
