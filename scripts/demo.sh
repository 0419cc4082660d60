#!/usr/bin/env bash
# Set up (idempotent) and run the main job on the embedded default.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
exec "$root/.venv/bin/memguard" demo "$@"   # local guarded server + demo prompts; images in out/demo
