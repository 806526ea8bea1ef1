"""The dense SigLIP -> SigLIP-MoE weight map: its names (`WEIGHT_MAP`, the head's MLP included), the MoE config of a
dense config, and in-memory sparse upcycling on the shared mechanism (`encoder.upcycling`).

Every MoE layer's experts are copies of the dense layer's MLP (fc1 -> `up_proj` [E, h, d] / `up_proj_bias` [E, h],
fc2 -> `down_proj` [E, d, h] / `down_proj_bias` [E, d], the CLIP-MoE's layout); every other tensor is the dense one
under the same name; routers are new. With identical experts the renormalised top-k mixture is the dense MLP, so
the upcycled model computes what the dense one computes, whatever the routers say. The same map serves SigLIP2
(its state dicts use the same names).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from transformers import (
    PretrainedConfig,
    SiglipConfig,
    SiglipTextConfig,
    SiglipVisionConfig,
)

from ..upcycling import moe_towers, new_routers, sparse_upcycle
from ..upcycling import dense_to_moe_state_dict as upcycled_state_dict
from ..family import WeightMap
from .configuration import (
    SiglipMoEConfig,
    SiglipMoETextConfig,
    SiglipMoEVisionConfig,
    tower_dict,
)

FFN_TO_EXPERT = {
    "fc1.weight": "up_proj",
    "fc1.bias": "up_proj_bias",
    "fc2.weight": "down_proj",
    "fc2.bias": "down_proj_bias",
}
# The names of the family layer (`encoder.family`): towers' prefixes, the expert stacks of the encoder layers' MLPs,
# and the vision attention-pooling head's MLP, which is MoE when the vision config has `moe_head` True.
WEIGHT_MAP = WeightMap(tower_prefix={"vision": "vision_model", "text": "text_model"}, ffn_to_expert=FFN_TO_EXPERT,
                       head_mlp={"vision": "head.mlp."})


def towers(config: PretrainedConfig) -> list[tuple[str, PretrainedConfig]]:
    """(state-dict prefix, tower config) of a full MoE config's two towers (vision first), or ("", config) of a
    tower's."""
    return [(prefix, tower) for _, tower, prefix in moe_towers(config)]


def dense_to_moe_state_dict(dense: Mapping[str, torch.Tensor], config: PretrainedConfig,
                            seed: int = 0) -> dict[str, torch.Tensor]:
    """The MoE state dict of `config` (a full SigLIP-MoE / SigLIP2-MoE config or one tower's) from the dense
    model's state dict (same kind): `encoder.upcycling.dense_to_moe_state_dict`, the head's MLP included when the
    vision config has `moe_head` True."""
    return upcycled_state_dict(dense, config, seed)


def dense_key_of(moe_key: str) -> str | None:
    """`...mlp.experts.up_proj` -> `...mlp.fc1.weight` (the dense tensor every expert copies); None for a key that
    is not an expert stack (routers included: they have no dense source)."""
    return WEIGHT_MAP.dense_ffn_key(moe_key)


DENSE_TO_MOE_CONFIG = {SiglipConfig: SiglipMoEConfig, SiglipVisionConfig: SiglipMoEVisionConfig,
                       SiglipTextConfig: SiglipMoETextConfig}


def moe_config_of(dense_config: PretrainedConfig, vision_moe: dict | None = None, text_moe: dict | None = None,
                  dense_to_moe: Mapping[type, type] = DENSE_TO_MOE_CONFIG) -> PretrainedConfig:
    """The MoE config of a dense full / vision / text config (`dense_to_moe`: dense config class -> MoE config
    class; SigLIP's by default), with the MoE fields of `MoEFields` per tower (vision_moe / text_moe; a tower left
    None stays dense)."""
    for dense_class, moe_class in dense_to_moe.items():
        if not isinstance(dense_config, dense_class):
            continue
        if hasattr(moe_class, "sub_configs_defaults") and moe_class.sub_configs_defaults:
            return moe_class(text_config={**tower_dict(dense_config.text_config), **(text_moe or {})},
                             vision_config={**tower_dict(dense_config.vision_config), **(vision_moe or {})},
                             initializer_factor=dense_config.initializer_factor)
        fields = vision_moe if moe_class.base_config_key == "vision_config" else text_moe
        return moe_class(**{**tower_dict(dense_config), **(fields or {})})
    names = ", ".join(c.__name__ for c in dense_to_moe)
    raise TypeError(f"{type(dense_config).__name__} is not one of the dense configs this map knows ({names})")


def sparse_upcycle_siglip(dense_model: nn.Module, vision_moe: dict | None = None, text_moe: dict | None = None,
                          seed: int = 0) -> nn.Module:
    """`encoder.upcycling.sparse_upcycle` of a transformers `SiglipModel` / `SiglipVisionModel` / `SiglipTextModel`:
    the SigLIP-MoE of the same kind, computing what the dense model computes."""
    return sparse_upcycle(dense_model, vision_moe, text_moe, seed)
