#!/usr/bin/env bash
# Write requirements.lock from a green environment: runs the whole suite in it first, then pins every package.
# Usage: bash scripts/lock.sh [--no-test] [pytest args]    (the environment: $CLIP_MOE_VENV, default .venv)
# To move the lock forward: CLIP_MOE_UNLOCKED=1 bash scripts/setup.sh (resolves pyproject's ranges), then this.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${CLIP_MOE_VENV:-$root/.venv}"
[[ -x "$venv/bin/python" ]] || { echo "error: no environment at $venv; run bash scripts/setup.sh first" >&2; exit 2; }
if [[ "${1:-}" == "--no-test" ]]; then
  shift
else
  (cd "$root" && "$venv/bin/python" -m pytest -q "$@") || { echo "error: the suite failed; the lock is unchanged" >&2; exit 1; }
fi
exec python3 "$root/scripts/lockfile.py" write --python "$venv/bin/python" --lock "$root/requirements.lock"
