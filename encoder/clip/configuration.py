"""Configs of the CLIP-MoE model: transformers' CLIP configs plus per-tower Mixture-of-Experts fields.

A tower config with an empty `moe_layers` describes exactly the dense CLIP tower, so every dense CLIP
checkpoint has a CLIP-MoE config that reproduces it.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig

from ..moe_config import MoEFields


@strict
class CLIPMoEVisionConfig(MoEFields, CLIPVisionConfig):
    """CLIP vision tower config with the MoE fields of `MoEFields`."""

    model_type = "clip_moe_vision_model"
    base_config_key = "vision_config"


@strict
class CLIPMoETextConfig(MoEFields, CLIPTextConfig):
    """CLIP text tower config with the MoE fields of `MoEFields`.

    Padding tokens (attention_mask == 0) are routed but excluded from the auxiliary losses.
    """

    model_type = "clip_moe_text_model"
    base_config_key = "text_config"


@strict
class CLIPMoEConfig(CLIPConfig):
    r"""A CLIP-MoE: a `CLIPConfig` whose tower configs carry MoE fields.

    text_config / vision_config: `CLIPMoETextConfig` / `CLIPMoEVisionConfig` (or their dicts).
    output_router_logits (`bool`, defaults to False): True makes router logits the default of
        `CLIPMoEModel.forward` for both towers; False leaves it to each tower config's own field.
    """

    model_type = "clip_moe"
    sub_configs_defaults = {
        "vision_config": CLIPMoEVisionConfig,
        "text_config": CLIPMoETextConfig,
    }

    output_router_logits: bool = False

    @classmethod
    def from_clip_config(cls, clip: CLIPConfig, vision_moe: dict | None = None, text_moe: dict | None = None) -> CLIPMoEConfig:
        """The CLIP-MoE config of a dense `CLIPConfig`, with MoE fields per tower (dense where None)."""
        text = {**_tower_dict(clip.text_config), **(text_moe or {})}
        vision = {**_tower_dict(clip.vision_config), **(vision_moe or {})}
        return cls(
            text_config=text,
            vision_config=vision,
            projection_dim=clip.projection_dim,
            logit_scale_init_value=clip.logit_scale_init_value,
            initializer_factor=clip.initializer_factor,
        )


def _tower_dict(tower) -> dict:
    d = tower.to_dict()
    for key in ("model_type", "transformers_version", "architectures", "_name_or_path"):
        d.pop(key, None)
    return d
