#!/usr/bin/env bash
# LLaVA-1.5 stage 2 (visual instruction tuning: projector + LLM, tower frozen) with LLaVA's flags, e.g.
#   bash scripts/finetune.sh --model_name_or_path lmsys/vicuna-7b-v1.5 --vision_tower clip-moe-dir \
#       --pretrain_mm_mlp_adapter checkpoints/llava-clip-moe-pretrain/mm_projector.bin \
#       --data_path llava_v1_5_mix665k.json --image_folder data --output_dir checkpoints/llava-clip-moe
# With no flags: the embedded default on the CPU (digit-grid questions), after the embedded stage 1 if missing.
# LLaVA-1.5's own flag list (scripts/v1_5/finetune.sh after its `deepspeed llava/train/train_mem.py`) runs as is.
# Sets itself up first; all arguments go to `python -m mllm_bridge.train finetune` (see its --help).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
exec "${CLIP_MOE_VENV:-$root/.venv}/bin/python" -m mllm_bridge.train finetune "$@"
