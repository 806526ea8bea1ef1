#!/usr/bin/env bash
# The GPU check, one command on one CUDA GPU (a few minutes): the tests marked `cuda`, scripts/bench_moe.py in bf16
# at ViT-L/14-336 shapes, one bf16 step of DMU and of LLaVA stage 1 -> docs/benchmarks/gpu_check.json (device name,
# versions, outcomes, wall times). See scripts/gpu_check.py --help.
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
PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" exec "$py" scripts/gpu_check.py "$@"
