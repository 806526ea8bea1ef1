"""Building a MoE model (CLIP-MoE, SigLIP-MoE, ...) from dense models of its family: the base supplies every
weight, expert sources supply the FFNs.

Sparse upcycling uses the base as every expert source; DMU uses one fine-tuned model per expert.
Every dense key is consumed and every MoE key filled, and the result is loaded with strict=True.
Which dense key goes where is the family's weight map (`encoder.family.WeightMap`), applied by the one mechanism
of `encoder.upcycling`; the config classes come from the family registry.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from transformers import PretrainedConfig, PreTrainedModel

from encoder.family import family_of
from encoder.upcycling import (
    dense_to_moe_state_dict,
    moe_config_from_dense,
    new_routers,
    weight_map_of,
)
from encoder.utils.errors import UserError

__all__ = ["assemble_clip_moe", "check_expert_counts", "moe_config_for", "new_routers", "resolve_moe_layers",
           "weight_map_of"]

TOWERS = ("vision", "text")


def resolve_moe_layers(spec: str | Sequence[int], num_layers: int) -> list[int]:
    """'all', 'even', 'odd', 'last:N', 'none', '0,2,5' or a list of indices -> sorted layer indices."""
    if isinstance(spec, str):
        text = spec.strip().lower()
        if text == "all":
            return list(range(num_layers))
        if text == "none":
            return []
        if text == "even":
            return list(range(0, num_layers, 2))
        if text == "odd":
            return list(range(1, num_layers, 2))
        if text.startswith("last:"):
            n = _int(text[5:], spec)
            if not 1 <= n <= num_layers:
                raise UserError(f"moe layers {spec!r}: N must be between 1 and {num_layers} (the tower's layers)")
            return list(range(num_layers - n, num_layers))
        indices = [_int(part, spec) for part in text.split(",") if part.strip()]
    else:
        indices = [int(i) for i in spec]
    bad = [i for i in indices if not 0 <= i < num_layers]
    if bad:
        raise UserError(f"moe layer index {bad[0]} out of range: the tower has layers 0..{num_layers - 1}")
    return sorted(set(indices))


def _int(text: str, spec) -> int:
    try:
        return int(text)
    except ValueError:
        raise UserError(
            f"moe layers {spec!r} not understood: use all, even, odd, last:N, none or comma-separated indices"
        ) from None


def check_expert_counts(num_experts: int, top_k: int) -> None:
    if num_experts < 1:
        raise UserError(f"num_experts must be >= 1, got {num_experts}")
    if not 1 <= top_k <= num_experts:
        raise UserError(f"top_k must be between 1 and num_experts ({num_experts}), got {top_k}")


def moe_config_for(
    base: PreTrainedModel | PretrainedConfig,
    num_experts: int,
    top_k: int,
    moe_layers: str | Sequence[int] = "all",
    towers: Sequence[str] = ("vision", "text"),
    moe_head: bool = False,
    **moe_fields,
) -> PretrainedConfig:
    """The MoE config (the base's family's: `CLIPMoEConfig` for a CLIP) of the dense full model `base` (a model or
    just its config) with MoE layers in the chosen towers; arguments checked as user input.

    moe_head: make the vision tower's pooling-head MLP MoE too (SigLIP's attention-pooling head); only set on the
    config when True, so the configs of families without a head are what they always were.
    """
    dense_config = base if isinstance(base, PretrainedConfig) else base.config
    match = family_of(dense_config)
    if match.is_moe or match.kind != "model":
        what = match.label if match.kind == "model" else f"{match.label} {match.kind} tower"
        raise UserError(f"the base is a {what}; give a dense {match.family.label(False)} with both towers")
    check_expert_counts(num_experts, top_k)
    unknown = [t for t in towers if t not in TOWERS]
    if unknown or not towers:
        raise UserError(f"towers {list(towers)} not understood: use vision, text or vision,text")
    if moe_head and "vision" not in match.family.weight_map.head_mlp:
        raise UserError(f"moe_head: a {match.family.label(False)} has no pooling-head MLP to make MoE; drop --moe-head")
    if moe_head and "vision" not in towers:
        raise UserError("moe_head makes the vision tower's pooling-head MLP MoE, but the towers leave the vision tower "
                        "dense; add vision to --towers or drop --moe-head")
    per_tower = {}
    for tower in TOWERS:
        cfg = getattr(dense_config, f"{tower}_config")
        layers = resolve_moe_layers(moe_layers, cfg.num_hidden_layers) if tower in towers else []
        per_tower[tower] = dict(num_experts=num_experts, top_k=top_k, moe_layers=layers, **moe_fields)
    if moe_head:
        if not getattr(dense_config.vision_config, "vision_use_head", True):
            raise UserError("moe_head asks for the vision tower's pooling-head MLP as a MoE layer, but the base has "
                            "no pooling head (vision_use_head false); drop --moe-head")
        per_tower["vision"]["moe_head"] = True
    return moe_config_from_dense(dense_config, vision_moe=per_tower["vision"], text_moe=per_tower["text"])


@torch.no_grad()
def assemble_clip_moe(
    base: PreTrainedModel,
    config: PretrainedConfig,
    expert_sources: Sequence[PreTrainedModel | Mapping[str, torch.Tensor]] | None = None,
    seed: int = 0,
) -> PreTrainedModel:
    """The MoE model of `config` (its family's: a `CLIPMoEModel` for a CLIP-MoE config) whose MoE-MLP expert e is
    `expert_sources[e]`'s FFN (default: the base's) at that MLP.

    An expert source is a dense model of the base's family or a state dict holding at least its FFN tensors (e.g.
    a DMU stage's). All other weights come from `base`; routers are new (`encoder.upcycling.new_routers`, `seed`).
    """
    sources = None
    if expert_sources is not None:
        sources = [s if isinstance(s, Mapping) else s.state_dict() for s in expert_sources]
    target = dense_to_moe_state_dict(base.state_dict(), config, seed, sources)
    match = family_of(config)
    model = match.family.moe_models["model"](config)
    missing = set(model.state_dict()) - set(target)
    unexpected = set(target) - set(model.state_dict())
    if missing or unexpected:
        raise ValueError(f"the dense {match.family.label(False)} does not fit the {match.label} config: missing "
                         f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    model.load_state_dict(target, strict=True)
    return model.to(next(base.parameters()).dtype).eval()
