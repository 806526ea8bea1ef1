"""Configs of the SigLIP-MoE model: transformers' SigLIP configs plus per-tower Mixture-of-Experts fields.

A tower config with an empty `moe_layers` (and `moe_head` False) describes exactly the dense SigLIP tower, so
every dense SigLIP checkpoint has a SigLIP-MoE config that reproduces it.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import (
    PretrainedConfig,
    SiglipConfig,
    SiglipTextConfig,
    SiglipVisionConfig,
)

from ..moe_config import MoEFields


def check_moe_head(config: PretrainedConfig) -> None:
    """ValueError for a `moe_head` that is not a bool, or that asks for a MoE head on a tower without one."""
    if not isinstance(config.moe_head, bool):
        raise TypeError(f"moe_head must be true or false, got {config.moe_head!r}")
    if config.moe_head and not config.vision_use_head:
        raise ValueError("moe_head=True needs the attention-pooling head (vision_use_head=True): there is no head "
                         "MLP to make MoE; set moe_head=False or vision_use_head=True")


@strict
class SiglipMoEVisionConfig(MoEFields, SiglipVisionConfig):
    r"""SigLIP vision tower config with the MoE fields of `MoEFields`.

    moe_head (`bool`, defaults to False): the attention-pooling head's MLP is a MoE layer too (routing one token per
        image, the pooled probe); False keeps it dense, as the MoE layers of the encoder do not need it to be MoE.
    """

    model_type = "siglip_moe_vision_model"
    base_config_key = "vision_config"

    moe_head: bool = False

    def validate_moe_head(self) -> None:
        """Run by `@strict` after init: `check_moe_head`."""
        check_moe_head(self)

    @property
    def is_moe(self) -> bool:
        return len(self.moe_layers) > 0 or self.moe_head


@strict
class SiglipMoETextConfig(MoEFields, SiglipTextConfig):
    """SigLIP text tower config with the MoE fields of `MoEFields`.

    Padding tokens (attention_mask == 0, or equal to `pad_token_id` when no mask is given) are routed but excluded
    from the auxiliary losses.
    """

    model_type = "siglip_moe_text_model"
    base_config_key = "text_config"


@strict
class SiglipMoEConfig(SiglipConfig):
    r"""A SigLIP-MoE: a `SiglipConfig` whose tower configs carry MoE fields.

    text_config / vision_config: `SiglipMoETextConfig` / `SiglipMoEVisionConfig` (or their dicts).
    output_router_logits (`bool`, defaults to False): True makes router logits the default of
        `SiglipMoEModel.forward` for both towers; False leaves it to each tower config's own field.
    """

    model_type = "siglip_moe"
    sub_configs_defaults = {
        "vision_config": SiglipMoEVisionConfig,
        "text_config": SiglipMoETextConfig,
    }

    output_router_logits: bool = False

    @classmethod
    def from_siglip_config(cls, siglip: SiglipConfig, vision_moe: dict | None = None,
                           text_moe: dict | None = None) -> SiglipMoEConfig:
        """The SigLIP-MoE config of a dense `SiglipConfig`, with MoE fields per tower (dense where None)."""
        return cls(
            text_config={**tower_dict(siglip.text_config), **(text_moe or {})},
            vision_config={**tower_dict(siglip.vision_config), **(vision_moe or {})},
            initializer_factor=siglip.initializer_factor,
        )


def tower_dict(tower: PretrainedConfig) -> dict:
    """A tower config's fields, without what names its class or origin (so another config class can take them)."""
    d = tower.to_dict()
    for key in ("model_type", "transformers_version", "architectures", "_name_or_path"):
        d.pop(key, None)
    return d
