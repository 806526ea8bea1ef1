"""Where a dense CLIP's weights go in a CLIP-MoE: each tower's prefix and the FFN tensors each expert copies.

A CLIP-MoE keeps transformers' CLIP parameter names; a MoE layer's `mlp.fc1` / `mlp.fc2` become the stacked expert
tensors below (one [E, ...] tensor each) and a new `mlp.router.weight`. Every other key is the dense key unchanged.
"""

from __future__ import annotations

from ..family import WeightMap

TOWER_PREFIX = {"vision": "vision_model", "text": "text_model"}
FFN_TO_EXPERT = {
    "fc1.weight": "up_proj",
    "fc1.bias": "up_proj_bias",
    "fc2.weight": "down_proj",
    "fc2.bias": "down_proj_bias",
}

WEIGHT_MAP = WeightMap(tower_prefix=TOWER_PREFIX, ffn_to_expert=FFN_TO_EXPERT)
