"""LLaVA-1.5's two training stages as flag defaults: what differs between `pretrain` and `finetune`.

The code path is the same for both; `--tune_mm_mlp_adapter` decides what trains and what is saved, exactly
as in LLaVA. The defaults are those of LLaVA-1.5's `scripts/v1_5/pretrain.sh` and `finetune.sh`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Stage:
    name: str  # the subcommand
    title: str
    description: str
    defaults: dict[str, Any] = field(default_factory=dict)  # flag -> LLaVA-1.5's value for this stage


PRETRAIN = Stage(
    name="pretrain",
    title="stage 1: train the projector on image-caption pairs (LLM and tower frozen)",
    description="LLaVA-1.5 stage 1 (feature alignment): the 'plain' template (<image> + caption), only the "
    "projector trains; the output is config.json + mm_projector.bin for stage 2's --pretrain_mm_mlp_adapter and "
    "for llava's load_pretrained_model(OUTPUT_DIR, model_base=LLM, model_name containing 'llava').",
    defaults=dict(version="plain", tune_mm_mlp_adapter=True, per_device_train_batch_size=32, learning_rate=1e-3,
                  save_steps=24000, image_aspect_ratio="square"),
)

FINETUNE = Stage(
    name="finetune",
    title="stage 2: visual instruction tuning (projector + LLM train; the tower too with "
    "--unfreeze_mm_vision_tower True)",
    description="LLaVA-1.5 stage 2: the 'v1' (Vicuna) template, loss on the assistant answers only, the "
    "projector and the LLM train from stage 1's --pretrain_mm_mlp_adapter; the output is a full LLaVA checkpoint "
    "directory that llava's load_pretrained_model(OUTPUT_DIR, None, name) and lmms-eval's llava model load.",
    defaults=dict(version="v1", tune_mm_mlp_adapter=False, per_device_train_batch_size=16, learning_rate=2e-5,
                  save_steps=50000, image_aspect_ratio="pad"),
)

STAGES = {stage.name: stage for stage in (PRETRAIN, FINETUNE)}
