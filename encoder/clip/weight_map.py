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


def moe_config_of(dense_config, vision_moe: dict | None = None, text_moe: dict | None = None):
    """The CLIP-MoE config of a dense `CLIPConfig` (`CLIPMoEConfig.from_clip_config`) or of one tower's config, with
    MoE fields per tower (a tower given None stays dense)."""
    from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig

    from .configuration import CLIPMoEConfig, CLIPMoETextConfig, CLIPMoEVisionConfig

    if isinstance(dense_config, CLIPConfig):
        return CLIPMoEConfig.from_clip_config(dense_config, vision_moe=vision_moe, text_moe=text_moe)
    for dense_class, moe_class, fields in ((CLIPVisionConfig, CLIPMoEVisionConfig, vision_moe),
                                           (CLIPTextConfig, CLIPMoETextConfig, text_moe)):
        if isinstance(dense_config, dense_class):
            tower = {k: v for k, v in dense_config.to_dict().items()
                     if k not in ("model_type", "transformers_version", "architectures", "_name_or_path")}
            return moe_class(**{**tower, **(fields or {})})
    raise TypeError(f"{type(dense_config).__name__} is not a dense CLIP config (CLIPConfig or a tower's)")
