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
# The repository root must not be on sys.path, where its folders (guard/, kernels/, server/, ...)
# would shadow top-level names such as the PyPI `kernels` that transformers imports: pytest's own
# script (not `python -m pytest`), and PYTHONSAFEPATH for every Python the tests start from here.
# The suite imports what is installed: `memguard` and its subpackages.
export TRITON_INTERPRET="${TRITON_INTERPRET:-1}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONSAFEPATH=1
exec "$root/.venv/bin/pytest" "$@"
