#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv with exactly the versions of requirements.lock (the ones the
# suite passed with), then the toolkit itself (editable). Re-runs only when the lock, pyproject.toml, setup.py,
# the start-up .pth or this script changed since the last successful set-up (`--stamp` prints that record).
# Usage: bash scripts/setup.sh
#   CLIP_MOE_VENV=DIR      the environment (default: .venv in the checkout)
#   CLIP_MOE_PYTHON=PY     the interpreter that creates it (default: python3; must match the lock's Python)
#   CLIP_MOE_LOCK=FILE     another lock file (default: requirements.lock)
#   CLIP_MOE_UNLOCKED=1    resolve the newest versions pyproject's ranges allow instead of the lock
#                          (scripts/check_latest.sh; then scripts/lock.sh writes a new lock if the suite passes)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${CLIP_MOE_VENV:-$root/.venv}"
python="${CLIP_MOE_PYTHON:-python3}"
lock="${CLIP_MOE_LOCK:-$root/requirements.lock}"
unlocked="${CLIP_MOE_UNLOCKED:-0}"
stamp="$venv/.clip-moe-setup"
want="$( (cat "$root/pyproject.toml" "$root/setup.py" "$root/mllm_bridge/mllm_bridge_llava_hook.pth" "$root/scripts/setup.sh"; [[ "$unlocked" == 1 ]] \
  && echo unlocked || cat "$lock") 2>/dev/null | sha256sum | cut -d' ' -f1)"

if [[ "${1:-}" == "--stamp" ]]; then  # what a finished set-up records (tests fake an environment with it)
  echo "$want"; exit 0
fi
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  exit 0
fi

if [[ "$unlocked" != 1 ]]; then
  # Before anything is written: the lock must fit the interpreter (an existing environment's, or the one given)
  # and pin every requirement of pyproject.toml within its range (it is installed without resolving anything).
  target="$python"; [[ -x "$venv/bin/python" ]] && target="$venv/bin/python"
  python3 "$root/scripts/lockfile.py" check --python "$target" --lock "$lock" --pyproject "$root/pyproject.toml" \
    || exit 1
fi

echo "[setup] preparing $venv (first run takes a few minutes)" >&2
[[ -x "$venv/bin/python" ]] || "$python" -m venv "$venv"
pip_quiet() {
  # pip warns once per package about local index folders it cannot use; keep real errors visible.
  "$venv/bin/python" -m pip install -q --disable-pip-version-check "$@" 2> >(grep -v "^WARNING: Location" >&2)
}
rm -f "$stamp"  # a set-up that fails half-way must not be taken for done
if [[ "$unlocked" == 1 ]]; then
  # The extras and the packages installed without dependencies are lockfile.py's (SETUP_EXTRAS, NO_DEPS).
  pip_quiet --upgrade --upgrade-strategy eager -e "$root[$(python3 "$root/scripts/lockfile.py" setup-extras)]"
  # llava-torch pins torch==2.0.1 / transformers==4.36.2; its modeling code works with ours, so no deps.
  # shellcheck disable=SC2046  # one word per package
  pip_quiet --upgrade --no-deps $(python3 "$root/scripts/lockfile.py" no-deps)
else
  # The lock is complete (every transitive package, llava-torch included), so nothing is resolved here.
  pip_quiet --no-deps -r "$lock"
  pip_quiet --no-deps -e "$root"
fi
# Installed without resolving (the lock, or llava-torch): only a consistent environment is stamped done. pip
# check's complaints about llava-torch's own pins are expected and left out (lockfile.py's pip_check_problems).
python3 "$root/scripts/lockfile.py" pip-check --python "$venv/bin/python" || exit 1
echo "$want" > "$stamp"
echo "[setup] done" >&2
