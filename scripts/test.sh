#!/usr/bin/env bash
# The whole test suite (sets itself up first). Extra arguments go to pytest.
# Usage: bash scripts/test.sh [--fast] [PYTEST ARGS...]
#   --fast   for iteration: leaves out the slow tiers (pyproject.toml's markers engines, end_to_end, compile and
#            slow); the plain command, the README's and CI's, runs every test
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
select=()
if [[ "${1:-}" == "--fast" ]]; then
  shift
  select=(-m "not (engines or end_to_end or compile or slow)")
fi
bash "$root/scripts/setup.sh"
cd "$root"
exec "${CLIP_MOE_VENV:-$root/.venv}/bin/python" -m pytest ${select[@]+"${select[@]}"} "$@"
