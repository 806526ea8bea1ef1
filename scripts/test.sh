#!/usr/bin/env bash
# The whole test suite (sets itself up first). Extra arguments go to pytest.
# Usage: bash scripts/test.sh [--fast] [PYTEST ARGS...]
#   --fast   for iteration: leaves out the slow tiers (pyproject.toml's markers engines, end_to_end, compile and
#            slow); the plain command, the README's and CI's, runs every test
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
#   -n 0     (pytest-xdist's flag) runs in this one process instead of two workers
select=()
if [[ "${1:-}" == "--fast" ]]; then
  shift
  select=(-m "not (engines or end_to_end or compile or slow)")
fi
# Two pytest-xdist workers, one per core of the 2-core machines the suite is sized for (measured: 12-14 min vs
# 17 min 56 s in one process); tests/conftest.py groups the multi-process launches (engines) and the memory
# measurement, run one at a time on one worker.
parallel=(-n 2 --dist loadgroup)
bash "$root/scripts/setup.sh"
cd "$root"
exec "${CLIP_MOE_VENV:-$root/.venv}/bin/python" -m pytest "${parallel[@]}" ${select[@]+"${select[@]}"} "$@"
