"""Configs of the CLIP-MoE model: transformers' CLIP configs plus per-tower Mixture-of-Experts fields.

A tower config with an empty `moe_layers` describes exactly the dense CLIP tower, so every dense CLIP
checkpoint has a CLIP-MoE config that reproduces it.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig

from ..moe_composite import MoECompositeFields
from ..moe_config import MoEFields


@strict
class CLIPMoEVisionConfig(MoEFields, CLIPVisionConfig):
    """CLIP vision tower config with the MoE fields of `MoEFields`."""

    model_type = "clip_moe_vision_model"


@strict
class CLIPMoETextConfig(MoEFields, CLIPTextConfig):
    """CLIP text tower config with the MoE fields of `MoEFields`.

    Padding tokens (attention_mask == 0) are routed but excluded from the auxiliary losses.
    """

    model_type = "clip_moe_text_model"


@strict
class CLIPMoEConfig(MoECompositeFields, CLIPConfig):
    r"""A CLIP-MoE: a `CLIPConfig` whose tower configs (`CLIPMoETextConfig` / `CLIPMoEVisionConfig`, or their
    dicts) carry MoE fields, plus `MoECompositeFields` (router logits by default in `CLIPMoEModel.forward`)."""

    model_type = "clip_moe"
    sub_configs_defaults = {
        "vision_config": CLIPMoEVisionConfig,
        "text_config": CLIPMoETextConfig,
    }

    @classmethod
    def from_clip_config(cls, clip: CLIPConfig, vision_moe: dict | None = None, text_moe: dict | None = None) -> CLIPMoEConfig:
        """The CLIP-MoE config of a dense `CLIPConfig`, with MoE fields per tower (dense where None)."""
        return cls.from_dense(clip, vision_moe, text_moe, projection_dim=clip.projection_dim,
                              logit_scale_init_value=clip.logit_scale_init_value,
                              initializer_factor=clip.initializer_factor)
