#!/usr/bin/env bash
# LLaVA-1.5 stage 1 (projector only, LLM and tower frozen) with LLaVA's flags, e.g.
#   bash scripts/pretrain_projector.sh --model_name_or_path lmsys/vicuna-7b-v1.5 --vision_tower clip-moe-dir \
#       --data_path blip_laion_cc_sbu_558k.json --image_folder images --output_dir checkpoints/llava-clip-moe-pretrain
# With no flags: the embedded default on the CPU (digit grids, a small CLIP-MoE, a tiny Llama) in runs/llava-default.
# LLaVA-1.5's own flag list (scripts/v1_5/pretrain.sh after its `deepspeed llava/train/train_mem.py`) runs as is.
# Sets itself up first; all arguments go to `python -m mllm_bridge.train pretrain` (see its --help).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
exec "${CLIP_MOE_VENV:-$root/.venv}/bin/python" -m mllm_bridge.train pretrain "$@"
