#!/usr/bin/env bash
# The whole test suite (sets itself up first). Extra arguments go to pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
cd "$root"
exec "${CLIP_MOE_VENV:-$root/.venv}/bin/python" -m pytest "$@"
