"""Dense -> MoE for any family, by the names of its `WeightMap`: which MLPs become MoE, their new routers, and the
MoE state dict whose experts copy the dense (or given) FFNs.

One mechanism for every family and both paths: the in-memory upcycling of `encoder.siglip.weight_map` and the
recipes of `upcycle.recipes` (in memory and streamed to disk) take their MoE MLPs and routers from here, so the
same config and seed give the same routers whichever path wrote the model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn
from transformers import PretrainedConfig

from .family import WeightMap, family_of

TOWERS = ("vision", "text")
# Routers are drawn from N(0, the tower's initializer_range); SigLIP configs carry none, so they get CLIP's 0.02.
ROUTER_INIT_STD = 0.02


def moe_towers(config: PretrainedConfig) -> list[tuple[str, PretrainedConfig, str]]:
    """(tower name, tower MoE config, state-dict prefix of its keys) of a full MoE config's two towers (vision first),
    or of one tower's config alone (prefix '')."""
    match = family_of(config)
    if match.kind == "model":
        return [(tower, getattr(config, f"{tower}_config"), f"{match.family.weight_map.tower_prefix[tower]}.")
                for tower in TOWERS]
    return [(match.kind, config, "")]


def weight_map_of(config: PretrainedConfig) -> WeightMap:
    """The dense<->MoE weight map of the family of the MoE `config`."""
    return family_of(config).family.weight_map


def moe_mlps(config: PretrainedConfig) -> list[tuple[str, PretrainedConfig, str]]:
    """(tower, tower config, MLP prefix '...mlp.') of every MoE MLP of `config`, tower by tower in `moe_towers` order,
    each tower's layers in order and then its pooling head's MLP (`WeightMap.moe_mlps`)."""
    weight_map = weight_map_of(config)
    return [(tower, cfg, mlp) for tower, cfg, prefix in moe_towers(config)
            for mlp in weight_map.moe_mlps(tower, cfg, prefix)]


def new_routers(config: PretrainedConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every MoE MLP's new router weight [E, width] (fp32), keyed by its state-dict name.

    One generator per tower (seed for the vision tower or a tower alone, seed + 1 for the text tower), drawn MLP by
    MLP in `moe_mlps` order from N(0, initializer_range), so every path that upcycles the same config with the same
    seed draws the very same routers.
    """
    routers = {}
    for i, (tower, cfg, prefix) in enumerate(moe_towers(config)):
        gen = torch.Generator().manual_seed(seed + i)
        std = getattr(cfg, "initializer_range", ROUTER_INIT_STD)
        for mlp in weight_map_of(config).moe_mlps(tower, cfg, prefix):
            router = torch.empty(cfg.num_experts, cfg.hidden_size)
            routers[f"{mlp}router.weight"] = router.normal_(0.0, std, generator=gen)
    return routers


def expert_sources_of(config: PretrainedConfig) -> dict[str, tuple[str, int]]:
    """{expert stack key: (the dense FFN key each expert copies, number of experts)} of every MoE MLP of `config`."""
    weight_map = weight_map_of(config)
    return {f"{mlp}experts.{expert}": (mlp + dense, cfg.num_experts)
            for _, cfg, mlp in moe_mlps(config) for dense, expert in weight_map.ffn_to_expert.items()}


def dense_to_moe_state_dict(dense: Mapping[str, torch.Tensor], config: PretrainedConfig, seed: int = 0,
                            expert_sources: Sequence[Mapping[str, torch.Tensor]] | None = None,
                            ) -> dict[str, torch.Tensor]:
    """The MoE state dict of `config` (a family's full MoE config or one tower's) from the dense model's state dict
    (same kind): every MoE MLP's expert e copies `expert_sources[e]`'s FFN (default: the dense MLP itself), every
    other tensor is the dense one (not copied), routers are new (`new_routers`). Every dense key is used.

    Raises ValueError naming the missing dense tensor when `dense` (or an expert source) lacks an MLP the config
    makes MoE, or when the number of expert sources is not the number of experts.
    """
    moe: dict[str, torch.Tensor] = {}
    used = set()
    for expert_key, (key, num_experts) in expert_sources_of(config).items():
        if key not in dense:
            raise ValueError(f"the dense state dict has no {key}: it is not the model this MoE config was made from "
                             "(a full model for a full config, a tower for a tower config)")
        if expert_sources is None:
            moe[expert_key] = torch.stack([dense[key]] * num_experts)
        else:
            if len(expert_sources) != num_experts:
                raise ValueError(f"{len(expert_sources)} expert sources for {num_experts} experts at {expert_key}")
            missing = [i for i, source in enumerate(expert_sources) if key not in source]
            if missing:
                raise ValueError(f"expert source {missing[0]} lacks {key}: it is not an FFN state of this base")
            moe[expert_key] = torch.stack([source[key] for source in expert_sources])
        used.add(key)
    moe.update(new_routers(config, seed))
    moe.update((key, value) for key, value in dense.items() if key not in used)
    return moe


def moe_config_from_dense(dense_config: PretrainedConfig, vision_moe: dict | None = None,
                          text_moe: dict | None = None) -> PretrainedConfig:
    """The MoE config of a dense config of any registered family (`Family.moe_config_from_dense`), with MoE fields
    per tower (a tower given None stays dense). UnknownFamily (a UserError) for a config of no family; ValueError for
    a MoE config or a family that cannot upcycle."""
    match = family_of(dense_config)
    if match.is_moe:
        raise ValueError(f"{type(dense_config).__name__} is already a {match.label} config")
    if match.family.moe_config_from_dense is None:
        raise ValueError(f"the {match.family.label(False)} family has no dense -> MoE config map")
    return match.family.moe_config_from_dense(dense_config, vision_moe, text_moe)


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


def sparse_upcycle(dense_model: nn.Module, vision_moe: dict | None = None, text_moe: dict | None = None,
                   seed: int = 0) -> nn.Module:
    """The MoE model of a dense full / vision / text model of any family, in memory: the same kind, MoE fields per
    tower (e.g. `vision_moe=dict(num_experts=4, top_k=2, moe_layers=[0, 1])`; a tower given None stays dense),
    experts copied from the dense MLPs, new routers drawn with `seed`. Computes what the dense model computes."""
    config = moe_config_from_dense(dense_model.config, vision_moe, text_moe)
    model_class = family_of(config).family.moe_models[family_of(config).kind]
    return load_upcycled(model_class(config), dense_model, seed)
