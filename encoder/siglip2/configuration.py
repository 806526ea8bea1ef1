"""Configs of the SigLIP2-MoE model: transformers' SigLIP2 configs plus per-tower Mixture-of-Experts fields.

As for SigLIP: a tower config with an empty `moe_layers` (and `moe_head` False) is exactly the dense SigLIP2 tower.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import Siglip2Config, Siglip2TextConfig, Siglip2VisionConfig

from ..moe_config import MoEFields
from ..siglip.configuration import check_moe_head


@strict
class Siglip2MoEVisionConfig(MoEFields, Siglip2VisionConfig):
    r"""SigLIP2 (naflex) vision tower config with the MoE fields of `MoEFields`.

    moe_head (`bool`, defaults to False): the attention-pooling head's MLP is a MoE layer too; False keeps it dense.

    Padded patches (pixel_attention_mask == 0) are routed but excluded from the auxiliary losses.
    """

    model_type = "siglip2_moe_vision_model"
    base_config_key = "vision_config"

    moe_head: bool = False

    def validate_moe_head(self) -> None:
        """Run by `@strict` after init: `check_moe_head`."""
        check_moe_head(self)

    @property
    def is_moe(self) -> bool:
        return len(self.moe_layers) > 0 or self.moe_head


@strict
class Siglip2MoETextConfig(MoEFields, Siglip2TextConfig):
    """SigLIP2 text tower config with the MoE fields of `MoEFields` (padding as for SigLIP's text tower)."""

    model_type = "siglip2_moe_text_model"
    base_config_key = "text_config"


@strict
class Siglip2MoEConfig(Siglip2Config):
    r"""A SigLIP2-MoE: a `Siglip2Config` whose tower configs carry MoE fields.

    text_config / vision_config: `Siglip2MoETextConfig` / `Siglip2MoEVisionConfig` (or their dicts).
    output_router_logits (`bool`, defaults to False): True makes router logits the default of
        `Siglip2MoEModel.forward` for both towers; False leaves it to each tower config's own field.
    """

    model_type = "siglip2_moe"
    sub_configs_defaults = {
        "vision_config": Siglip2MoEVisionConfig,
        "text_config": Siglip2MoETextConfig,
    }

    output_router_logits: bool = False
