#!/usr/bin/env bash
# The GPU check, one command on one CUDA GPU (a few minutes): the tests marked `cuda`, scripts/bench_moe.py in bf16
# at ViT-L/14-336 shapes, one bf16 step of DMU and of LLaVA stage 1 -> docs/benchmarks/gpu_check.json (device name,
# versions, outcomes, wall times). See scripts/gpu_check.py --help. Runs from any folder.
# Exit status: 0 every part passed, 1 a part failed, 2 no CUDA device is visible, 3 the interpreter cannot run the
# check (not found, or without torch / transformers / ...); 2 and 3 come with one line saying so.
# Usage: bash scripts/gpu_check.sh [--out FILE]       (sets up .venv first, as the other scripts)
#        GPU_CHECK_PYTHON=python3 bash scripts/gpu_check.sh   (a machine without registry access whose Python already
#                                                               has torch, transformers, ...: no set-up, the checkout
#                                                               on PYTHONPATH)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -n "${GPU_CHECK_PYTHON:-}" ]]; then
  py="$GPU_CHECK_PYTHON"
else
  bash "$root/scripts/setup.sh"
  py="${CLIP_MOE_VENV:-$root/.venv}/bin/python"
fi
if ! command -v "$py" >/dev/null 2>&1; then
  echo "error: GPU_CHECK_PYTHON=$py is not an interpreter that can be run; point it at a Python with torch, or leave" \
    "it unset to use the set-up environment" >&2
  exit 3
fi
PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" exec "$py" "$root/scripts/gpu_check.py" "$@"
