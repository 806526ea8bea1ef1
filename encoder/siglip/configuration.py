"""Configs of the SigLIP-MoE model: transformers' SigLIP configs plus per-tower Mixture-of-Experts fields.

A tower config with an empty `moe_layers` (and `moe_head` False) describes exactly the dense SigLIP tower, so
every dense SigLIP checkpoint has a SigLIP-MoE config that reproduces it.
"""

from __future__ import annotations

from dataclasses import dataclass

from huggingface_hub.dataclasses import strict
from transformers import (
    PretrainedConfig,
    SiglipConfig,
    SiglipTextConfig,
    SiglipVisionConfig,
)

from ..moe_composite import (
    MoECompositeFields,
    tower_dict,  # noqa: F401  (kept importable from here: encoder.siglip.weight_map uses it)
)
from ..moe_config import MoEFields


def check_moe_head(config: PretrainedConfig) -> None:
    """ValueError for a `moe_head` that is not a bool, or that asks for a MoE head on a tower without one."""
    if not isinstance(config.moe_head, bool):
        raise TypeError(f"moe_head must be true or false, got {config.moe_head!r}")
    if config.moe_head and not config.vision_use_head:
        raise ValueError("moe_head=True needs the attention-pooling head (vision_use_head=True): there is no head "
                         "MLP to make MoE; set moe_head=False or vision_use_head=True")


@dataclass(init=False, repr=False, eq=False, kw_only=True)
class MoEHeadFields(MoEFields):
    r"""`MoEFields` plus the option of an attention-pooling head (SigLIP's and SigLIP2's vision towers):

    moe_head (`bool`, defaults to False): the attention-pooling head's MLP is a MoE layer too (routing one token per
        image, the pooled probe); False keeps it dense, as the MoE layers of the encoder do not need it to be MoE.
    """

    moe_head: bool = False

    def validate_moe_head(self) -> None:
        """Run by `@strict` after init: `check_moe_head`."""
        check_moe_head(self)

    @property
    def is_moe(self) -> bool:
        return len(self.moe_layers) > 0 or self.moe_head


@strict
class SiglipMoEVisionConfig(MoEHeadFields, SiglipVisionConfig):
    """SigLIP vision tower config with the MoE fields of `MoEHeadFields` (`moe_head` included)."""

    model_type = "siglip_moe_vision_model"


@strict
class SiglipMoETextConfig(MoEFields, SiglipTextConfig):
    """SigLIP text tower config with the MoE fields of `MoEFields`.

    Padding tokens (attention_mask == 0, or equal to `pad_token_id` when no mask is given) are routed but excluded
    from the auxiliary losses.
    """

    model_type = "siglip_moe_text_model"


@strict
class SiglipMoEConfig(MoECompositeFields, SiglipConfig):
    r"""A SigLIP-MoE: a `SiglipConfig` whose tower configs (`SiglipMoETextConfig` / `SiglipMoEVisionConfig`, or
    their dicts) carry MoE fields, plus `MoECompositeFields` (router logits by default in `SiglipMoEModel.forward`).
    """

    model_type = "siglip_moe"
    sub_configs_defaults = {
        "vision_config": SiglipMoEVisionConfig,
        "text_config": SiglipMoETextConfig,
    }

    @classmethod
    def from_siglip_config(cls, siglip: SiglipConfig, vision_moe: dict | None = None,
                           text_moe: dict | None = None) -> SiglipMoEConfig:
        """The SigLIP-MoE config of a dense `SiglipConfig`, with MoE fields per tower (dense where None)."""
        return cls.from_dense(siglip, vision_moe, text_moe, initializer_factor=siglip.initializer_factor)
