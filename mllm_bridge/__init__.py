"""LLaVA / lmms-eval integration: LLaVA builds the CLIP-MoE tower, LLaVA checkpoints get checked and re-pointed.

Importing this package stays cheap (no torch, no transformers) because the start-up .pth file imports
it in every interpreter; heavier modules are imported where used:

- `llava/`: LLaVA itself. `hook` makes LLaVA's `build_vision_tower` return `encoder.CLIPMoEVisionTower` for
  CLIP-MoE directories (also `compat`: shims for releases that moved under llava-torch); `tower_info`, `config`,
  `checks`, `swap_tower`: `python -m mllm_bridge check | swap-tower`; `model`, `loading`, `init`: a LLaVA model
  around a tower, loaded or initialised as LLaVA does.
- `lmms/`: lmms-eval. `plugin` registers the model `llava_clipmoe` (`model`, with `requests`, `results`,
  `expert_usage`); `run` (with `checkpoints`): `python -m mllm_bridge eval-lmms`; `tasks/`: the digit-grid task YAML.
- `train/`: LLaVA-1.5 stage 1 / stage 2 training (`python -m mllm_bridge.train pretrain | finetune`).
- `embedded/`: the CPU demo and its tiny stand-ins, fenced off from the three above (only their command lines import
  it): `tiny_lm` (a tiny Llama), `training` (the bare training scripts' run, `make-tiny-llm`), `evaluation` (what a
  bare eval-lmms evaluates), `task_data` (`make-lmms-task`).
"""

from .llava.hook import install_llava_hook

__all__ = ["install_llava_hook"]
