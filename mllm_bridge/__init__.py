"""LLaVA / lmms-eval integration: LLaVA builds the CLIP-MoE tower, LLaVA checkpoints get checked and re-pointed.

Importing this package stays cheap (no torch, no transformers) because the start-up .pth file imports
it in every interpreter; heavier modules are imported where used:

- `llava_hook`: LLaVA's `build_vision_tower` returns `encoder.CLIPMoEVisionTower` for CLIP-MoE directories.
- `tower_info`, `llava_config`, `checks`, `swap_tower`: `python -m mllm_bridge check | swap-tower`.
- `llava_model`: a LLaVA model around a tower, assembled as LLaVA's stage 1 assembles it.
- `tiny_lm`: a tiny Llama and an offline-trained tokenizer, for tests and demos without downloads.
"""

from .llava_hook import install_llava_hook

__all__ = ["install_llava_hook"]
