"""Configs of the SigLIP2-MoE model: transformers' SigLIP2 configs plus per-tower Mixture-of-Experts fields.

As for SigLIP: a tower config with an empty `moe_layers` (and `moe_head` False) is exactly the dense SigLIP2 tower.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import Siglip2Config, Siglip2TextConfig, Siglip2VisionConfig

from ..moe_composite import MoECompositeFields
from ..moe_config import MoEFields
from ..siglip.configuration import MoEHeadFields


@strict
class Siglip2MoEVisionConfig(MoEHeadFields, Siglip2VisionConfig):
    r"""SigLIP2 (naflex) vision tower config with the MoE fields of `MoEHeadFields` (`moe_head` included).

    Padded patches (pixel_attention_mask == 0) are routed but excluded from the auxiliary losses.
    """

    model_type = "siglip2_moe_vision_model"


@strict
class Siglip2MoETextConfig(MoEFields, Siglip2TextConfig):
    """SigLIP2 text tower config with the MoE fields of `MoEFields` (padding as for SigLIP's text tower)."""

    model_type = "siglip2_moe_text_model"


@strict
class Siglip2MoEConfig(MoECompositeFields, Siglip2Config):
    r"""A SigLIP2-MoE: a `Siglip2Config` whose tower configs carry MoE fields, as `SiglipMoEConfig` for SigLIP."""

    model_type = "siglip2_moe"
    sub_configs_defaults = {
        "vision_config": Siglip2MoEVisionConfig,
        "text_config": Siglip2MoETextConfig,
    }
