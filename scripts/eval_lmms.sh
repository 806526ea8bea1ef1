#!/usr/bin/env bash
# Benchmarks LLaVA checkpoints with lmms-eval and writes a markdown table comparing them (sets itself up first).
#   bash scripts/eval_lmms.sh                      # embedded default: digit-grid tasks on the CPU, on the
#                                                  # checkpoints of pretrain_projector.sh / finetune.sh (or an
#                                                  # untrained one), CLIP-MoE tower vs its dense base
#   bash scripts/eval_lmms.sh --checkpoint moe=checkpoints/llava-clip-moe --checkpoint dense=checkpoints/llava \
#       --limit 100 --device cuda --batch-size 8  # LLaVA-1.5's benchmarks (mme, mmbench_en_dev, pope, gqa, ...)
# All arguments go to `python -m mllm_bridge eval-lmms` (see its --help).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
exec "${CLIP_MOE_VENV:-$root/.venv}/bin/python" -m mllm_bridge eval-lmms "$@"
