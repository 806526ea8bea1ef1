"""LLaVA / lmms-eval integration: LLaVA builds the CLIP-MoE tower, LLaVA checkpoints get checked and re-pointed.

Importing this package stays cheap (no torch, no transformers) because the start-up .pth file imports
it in every interpreter; heavier modules are imported where used:

- `llava_hook`: LLaVA's `build_vision_tower` returns `encoder.CLIPMoEVisionTower` for CLIP-MoE directories.
- `tower_info`, `llava_config`, `checks`, `swap_tower`: `python -m mllm_bridge check | swap-tower`.
- `llava_model`: a LLaVA model around a tower, assembled as LLaVA's stage 1 assembles it.
- `tiny_lm`: a tiny Llama and an offline-trained tokenizer, for tests and demos without downloads.
- `train`: LLaVA-1.5 stage 1 / stage 2 training (`python -m mllm_bridge.train pretrain | finetune`).
- `lmms_eval_model` (registered by `lmms_eval_plugin`; `llava_loading`, `expert_usage`, `lmms_requests`): the
  lmms-eval model `llava_clipmoe`; `eval_lmms`, `lmms_task_data`, `lmms_tasks/`: `python -m mllm_bridge eval-lmms |
  make-lmms-task | init-llava`.
"""

from .llava.hook import install_llava_hook

__all__ = ["install_llava_hook"]
