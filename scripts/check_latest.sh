#!/usr/bin/env bash
# The suite on the newest releases: a throw-away environment resolved from pyproject's ranges alone (no lock, and
# no machine-wide pip constraint), the whole test suite in it, then a table of every version that differs from
# requirements.lock and the tests that failed. Exit status: pytest's.
# Usage: bash scripts/check_latest.sh [--keep] [pytest args]   (--keep leaves the environment, its path is printed)
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
keep=0
if [[ "${1:-}" == "--keep" ]]; then keep=1; shift; fi
work="$(mktemp -d "${TMPDIR:-/tmp}/clip-moe-latest.XXXXXX")"
[[ $keep == 1 ]] || trap 'rm -rf "$work"' EXIT
venv="$work/venv"
# Exported for the suite too: tests that run the README's commands (which set themselves up) must use this
# environment as it is, not rebuild it from the lock.
export CLIP_MOE_VENV="$venv" CLIP_MOE_UNLOCKED=1
echo "[check_latest] newest releases into $venv" >&2
PIP_CONSTRAINT=/dev/null bash "$root/scripts/setup.sh" 2>&1 | tee "$work/setup.log" >&2
if [[ ${PIPESTATUS[0]} != 0 ]]; then
  # Why, in one line: no index answers at all, pip's resolver found a conflict, or something else (lockfile.py).
  echo "error: $(python3 "$root/scripts/lockfile.py" why-setup-failed "$work/setup.log")" >&2
  exit 1
fi
(cd "$root" && "$venv/bin/python" -m pytest -q -p no:cacheprovider -rfE "$@") 2>&1 | tee "$work/pytest.log"
rc=${PIPESTATUS[0]}
echo
echo "## Versions that differ from requirements.lock"
python3 "$root/scripts/lockfile.py" diff --python "$venv/bin/python"
echo
echo "## Result on the newest releases"
failed="$(grep -E '^(FAILED|ERROR) ' "$work/pytest.log" || true)"
tail -1 "$work/pytest.log"
if [[ -n "$failed" ]]; then echo "$failed"; else echo "no test failed"; fi
[[ $keep == 1 ]] && echo "environment kept: $venv"
exit "$rc"
