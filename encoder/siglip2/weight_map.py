"""The dense SigLIP2 -> SigLIP2-MoE weight map: SigLIP's (`encoder.siglip.weight_map`; the state dicts use the same
names), on SigLIP2's config classes; upcycling itself is the shared `encoder.upcycling`."""

from __future__ import annotations

from torch import nn
from transformers import (
    PretrainedConfig,
    Siglip2Config,
    Siglip2TextConfig,
    Siglip2VisionConfig,
)

from ..upcycling import sparse_upcycle
from ..siglip.weight_map import moe_config_of as siglip_moe_config_of
from .configuration import (
    Siglip2MoEConfig,
    Siglip2MoETextConfig,
    Siglip2MoEVisionConfig,
)

DENSE_TO_MOE_CONFIG = {Siglip2Config: Siglip2MoEConfig, Siglip2VisionConfig: Siglip2MoEVisionConfig,
                       Siglip2TextConfig: Siglip2MoETextConfig}


def moe_config_of(dense_config: PretrainedConfig, vision_moe: dict | None = None,
                  text_moe: dict | None = None) -> PretrainedConfig:
    """The SigLIP2-MoE config of a dense `Siglip2Config` / tower config (SigLIP's map on SigLIP2's classes)."""
    return siglip_moe_config_of(dense_config, vision_moe, text_moe, DENSE_TO_MOE_CONFIG)


def sparse_upcycle_siglip2(dense_model: nn.Module, vision_moe: dict | None = None, text_moe: dict | None = None,
                           seed: int = 0) -> nn.Module:
    """`encoder.upcycling.sparse_upcycle` of a transformers `Siglip2Model` / `Siglip2VisionModel` /
    `Siglip2TextModel`: the SigLIP2-MoE of the same kind, computing what the dense model computes."""
    return sparse_upcycle(dense_model, vision_moe, text_moe, seed)
