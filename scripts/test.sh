#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite. Triton kernels run in the interpreter on CPU.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
# --- server (issue 6): promtool checks the alert rules and a live scrape (Debian package `prometheus`) ---
if ! command -v promtool >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "[test] installing promtool (apt-get install prometheus)"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus; } \
    >/dev/null 2>&1 || echo "[test] promtool install failed: the promtool tests will be skipped"
fi
# --- end server ---
# --- registry (issue 15): PostgreSQL server binaries for the shared-registry tests ---
bash "$root/scripts/pg.sh"
# --- end registry ---
cd "$root"
export TRITON_INTERPRET="${TRITON_INTERPRET:-1}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec "$root/.venv/bin/python" -m pytest "$@"
