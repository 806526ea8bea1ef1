#!/usr/bin/env bash
# The main job on its embedded default (sets itself up first). Extra arguments go to `python -m upcycle demo`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
exec "${CLIP_MOE_VENV:-$root/.venv}/bin/python" -m upcycle demo "$@"
