#!/usr/bin/env bash
# Create or reuse the project virtualenv in .venv. Idempotent: reinstalls only when
# pyproject.toml or constraints.txt changed since the last successful install.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
py="${PYTHON:-python3}"
stamp="$venv/.memguard-installed"
want="$(cat "$root/pyproject.toml" "$root/constraints.txt" | sha256sum | cut -d' ' -f1)"

if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating $venv"
  "$py" -m venv "$venv"
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing memguard and its dependencies (first run: several minutes)"
  # torch first and alone, so the resolver never picks another build for a dependent.
  "$venv/bin/pip" install -q -c "$root/constraints.txt" torch torchvision
  "$venv/bin/pip" install -q -c "$root/constraints.txt" -e "$root[test]"
  echo "$want" > "$stamp"
else
  echo "[setup] environment up to date ($venv)"
fi
