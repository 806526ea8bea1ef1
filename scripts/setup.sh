#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv with the toolkit (editable) and the MLLM stack.
# Re-runs only when pyproject.toml or this script changed since the last successful set-up.
# Usage: bash scripts/setup.sh
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${CLIP_MOE_VENV:-$root/.venv}"
stamp="$venv/.clip-moe-setup"
want="$(cat "$root/pyproject.toml" "$root/setup.py" "$root/scripts/setup.sh" | sha256sum | cut -d' ' -f1)"

if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  exit 0
fi

echo "[setup] preparing $venv (first run takes a few minutes)" >&2
[[ -x "$venv/bin/python" ]] || python3 -m venv "$venv"
pip_quiet() {
  # pip warns once per package about local index folders it cannot use; keep real errors visible.
  "$venv/bin/python" -m pip install -q --disable-pip-version-check "$@" 2> >(grep -v "^WARNING: Location" >&2)
}
pip_quiet -e "$root[dev,mllm]"
# llava-torch pins torch==2.0.1 / transformers==4.36.2; its modeling code works with ours, so no deps.
pip_quiet --no-deps llava-torch==1.2.2.post1 shortuuid
echo "$want" > "$stamp"
echo "[setup] done" >&2
