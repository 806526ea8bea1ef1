"""The dense SigLIP -> SigLIP-MoE weight map, in memory: sparse upcycling that preserves the dense function.

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

from ..family import WeightMap
from .configuration import (
    SiglipMoEConfig,
    SiglipMoETextConfig,
    SiglipMoEVisionConfig,
    tower_dict,
)
from .modeling import SiglipMoEModel, SiglipMoETextModel, SiglipMoEVisionModel

FFN_TO_EXPERT = {
    "fc1.weight": "up_proj",
    "fc1.bias": "up_proj_bias",
    "fc2.weight": "down_proj",
    "fc2.bias": "down_proj_bias",
}
TOWER_PREFIX = {"vision_config": "vision_model.", "text_config": "text_model."}
# The names of the family layer (`encoder.family`): towers' prefixes and the expert stacks of the encoder layers' MLPs.
# It does not name the attention-pooling head's MLP, which `moe_mlp_prefixes` adds when `moe_head` is True.
WEIGHT_MAP = WeightMap(tower_prefix={"vision": "vision_model", "text": "text_model"}, ffn_to_expert=FFN_TO_EXPERT)
# The CLIP-MoE draws its routers from N(0, CLIP's initializer_range = 0.02); SigLIP configs carry no
# initializer_range, so the SigLIP families use the same 0.02.
ROUTER_INIT_STD = 0.02


def towers(config: PretrainedConfig) -> list[tuple[str, PretrainedConfig]]:
    """(state-dict prefix, tower config) of a full config's two towers (vision first), or ("", config) of a tower's."""
    if all(hasattr(config, key) for key in TOWER_PREFIX):
        return [(prefix, getattr(config, key)) for key, prefix in TOWER_PREFIX.items()]
    return [("", config)]


def moe_mlp_prefixes(tower: PretrainedConfig, prefix: str = "") -> list[str]:
    """The state-dict prefixes ("...layers.L.mlp.") of a tower's MoE MLPs: its `moe_layers`, then the attention-
    pooling head's MLP when the tower has `moe_head` True."""
    prefixes = [f"{prefix}encoder.layers.{layer}.mlp." for layer in tower.moe_layers]
    if getattr(tower, "moe_head", False):
        prefixes.append(f"{prefix}head.mlp.")
    return prefixes


def new_routers(config: PretrainedConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every MoE MLP's new router weight [E, width] (fp32) by state-dict name, from N(0, ROUTER_INIT_STD).

    One generator per tower (seed for the vision tower or a tower alone, seed + 1 for the text tower), drawn MLP by
    MLP in `moe_mlp_prefixes` order, so the same config and seed always give the same routers.
    """
    routers = {}
    for i, (prefix, tower) in enumerate(towers(config)):
        gen = torch.Generator().manual_seed(seed + i)
        for mlp in moe_mlp_prefixes(tower, prefix):
            weight = torch.empty(tower.num_experts, tower.hidden_size)
            routers[f"{mlp}router.weight"] = weight.normal_(0.0, ROUTER_INIT_STD, generator=gen)
    return routers


def dense_to_moe_state_dict(dense: Mapping[str, torch.Tensor], config: PretrainedConfig,
                            seed: int = 0) -> dict[str, torch.Tensor]:
    """The MoE state dict of `config` (a full SigLIP-MoE / SigLIP2-MoE config or one tower's) from the dense
    model's state dict (same model kind: full or that tower): every dense MLP of a MoE layer copied into each
    expert, every other tensor as it is (not copied), new routers (`new_routers`). Every dense key is used.

    Raises ValueError naming the missing dense tensor when `dense` lacks an MLP the config makes MoE.
    """
    moe: dict[str, torch.Tensor] = {}
    used = set()
    for prefix, tower in towers(config):
        for mlp in moe_mlp_prefixes(tower, prefix):
            for dense_name, expert_name in FFN_TO_EXPERT.items():
                key = mlp + dense_name
                if key not in dense:
                    raise ValueError(f"the dense state dict has no {key}: it is not the model this MoE config "
                                     "was made from (a full model for a full config, a tower for a tower config)")
                moe[f"{mlp}experts.{expert_name}"] = torch.stack([dense[key]] * tower.num_experts)
                used.add(key)
    moe.update(new_routers(config, seed))
    moe.update((key, value) for key, value in dense.items() if key not in used)
    return moe


def dense_key_of(moe_key: str) -> str | None:
    """`...mlp.experts.up_proj` -> `...mlp.fc1.weight` (the dense tensor every expert copies); None for a key that
    is not an expert stack (routers included: they have no dense source)."""
    return WEIGHT_MAP.dense_ffn_key(moe_key)


@torch.no_grad()
def load_upcycled(moe_model: nn.Module, dense_model: nn.Module, seed: int = 0) -> nn.Module:
    """Fill `moe_model` (built from its MoE config) from `dense_model` through `dense_to_moe_state_dict`, checked
    key for key and shape for shape (`strict=True`); returned in the dense model's dtype, in eval mode."""
    state = dense_to_moe_state_dict(dense_model.state_dict(), moe_model.config, seed)
    expected = moe_model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"the dense model does not fit the MoE config: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    wrong = [k for k, v in state.items() if v.shape != expected[k].shape]
    if wrong:
        raise ValueError(f"the dense model does not fit the MoE config: {wrong[0]} has shape "
                         f"{tuple(state[wrong[0]].shape)}, the MoE model {tuple(expected[wrong[0]].shape)}")
    moe_model.load_state_dict(state, strict=True)
    return moe_model.to(next(dense_model.parameters()).dtype).eval()


DENSE_TO_MOE_CONFIG = {SiglipConfig: SiglipMoEConfig, SiglipVisionConfig: SiglipMoEVisionConfig,
                       SiglipTextConfig: SiglipMoETextConfig}
MOE_MODEL_CLASS = {SiglipMoEConfig: SiglipMoEModel, SiglipMoEVisionConfig: SiglipMoEVisionModel,
                   SiglipMoETextConfig: SiglipMoETextModel}


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


def sparse_upcycle(dense_model: nn.Module, vision_moe: dict | None = None, text_moe: dict | None = None,
                   seed: int = 0, dense_to_moe: Mapping[type, type] = DENSE_TO_MOE_CONFIG,
                   moe_models: Mapping[type, type] = MOE_MODEL_CLASS) -> nn.Module:
    """The MoE model of a dense full / vision / text model (SigLIP's classes by default): same kind, MoE fields per
    tower (e.g. `vision_moe=dict(num_experts=4, top_k=2, moe_layers=[0, 1])`), experts copied from the dense MLPs,
    new routers drawn with `seed`. Computes what the dense model computes."""
    config = moe_config_of(dense_model.config, vision_moe, text_moe, dense_to_moe)
    return load_upcycled(moe_models[type(config)](config), dense_model, seed)


def sparse_upcycle_siglip(dense_model: nn.Module, vision_moe: dict | None = None, text_moe: dict | None = None,
                          seed: int = 0) -> nn.Module:
    """`sparse_upcycle` of a transformers `SiglipModel` / `SiglipVisionModel` / `SiglipTextModel`."""
    return sparse_upcycle(dense_model, vision_moe, text_moe, seed)
