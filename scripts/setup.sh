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
  # A venv that once held transformers>=5.25 keeps its PyPI `kernels` dependency, which our
  # kernels/ package shadows (and which breaks transformers' import of it): remove the orphan.
  if "$venv/bin/pip" show -q kernels >/dev/null 2>&1; then
    echo "[setup] removing the PyPI 'kernels' distribution (its import name is MemGuard's kernels/)"
    "$venv/bin/pip" uninstall -q -y kernels
  fi
  echo "$want" > "$stamp"
else
  echo "[setup] environment up to date ($venv)"
fi
