"""Building a CLIP-MoE from dense CLIPs: the base supplies every weight, expert sources supply the FFNs.

Sparse upcycling uses the base as every expert source; DMU uses one fine-tuned CLIP per expert.
Every dense key is consumed and every CLIP-MoE key filled, and the result is loaded with strict=True.
Which dense key goes where is the family's weight map (`encoder.family.WeightMap`, CLIP's in
`encoder.clip.weight_map`), found from the MoE config.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from transformers import CLIPConfig, CLIPModel

from encoder import CLIPMoEConfig, CLIPMoEModel
from encoder.family import WeightMap, family_of
from encoder.utils.errors import UserError

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
    base: CLIPModel | CLIPConfig,
    num_experts: int,
    top_k: int,
    moe_layers: str | Sequence[int] = "all",
    towers: Sequence[str] = ("vision", "text"),
    **moe_fields,
) -> CLIPMoEConfig:
    """The CLIP-MoE config of `base` (a model or just its config) with MoE layers in the chosen towers;
    arguments checked as user input."""
    clip_config = base if isinstance(base, CLIPConfig) else base.config
    check_expert_counts(num_experts, top_k)
    unknown = [t for t in towers if t not in TOWERS]
    if unknown or not towers:
        raise UserError(f"towers {list(towers)} not understood: use vision, text or vision,text")
    per_tower = {}
    for tower in TOWERS:
        cfg = getattr(clip_config, f"{tower}_config")
        layers = resolve_moe_layers(moe_layers, cfg.num_hidden_layers) if tower in towers else []
        per_tower[tower] = dict(num_experts=num_experts, top_k=top_k, moe_layers=layers, **moe_fields)
    return CLIPMoEConfig.from_clip_config(clip_config, vision_moe=per_tower["vision"], text_moe=per_tower["text"])


@torch.no_grad()
def assemble_clip_moe(
    base: CLIPModel,
    config: CLIPMoEConfig,
    expert_sources: Sequence[CLIPModel | Mapping[str, torch.Tensor]] | None = None,
    seed: int = 0,
) -> CLIPMoEModel:
    """A CLIP-MoE whose MoE-layer expert e is `expert_sources[e]`'s FFN (default: the base's) at that layer.

    An expert source is a dense CLIP or a state dict holding at least its FFN tensors (e.g. a DMU stage's).
    All other weights come from `base`; routers are new, drawn from N(0, initializer_range) with `seed`.
    """
    base_sd = base.state_dict()
    weight_map = weight_map_of(config)
    routers = new_routers(config, seed)
    sources = None
    if expert_sources is not None:
        sources = [s if isinstance(s, Mapping) else s.state_dict() for s in expert_sources]
    target = {}
    used = set()
    for tower in TOWERS:
        cfg = getattr(config, f"{tower}_config")
        if sources is not None and cfg.moe_layers and len(sources) != cfg.num_experts:
            raise ValueError(f"{len(sources)} expert sources for {cfg.num_experts} experts in the {tower} tower")
        for layer in cfg.moe_layers:
            for expert_key, key in weight_map.expert_keys(tower, layer).items():
                per_expert = [_ffn(sd, key) for sd in sources] if sources is not None else [base_sd[key]] * cfg.num_experts
                target[expert_key] = torch.stack(per_expert).clone()
                used.add(key)
    target.update(routers)
    for key, value in base_sd.items():
        if key not in used:
            target[key] = value.clone()

    model = family_of(config).family.moe_models["model"](config)
    missing = set(model.state_dict()) - set(target)
    unexpected = set(target) - set(model.state_dict())
    if missing or unexpected:
        raise ValueError(f"dense CLIP does not fit the CLIP-MoE config: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    model.load_state_dict(target, strict=True)
    return model.to(next(base.parameters()).dtype).eval()


def new_routers(config: CLIPMoEConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every MoE layer's new router weight [E, width] (fp32), keyed by its state-dict name.

    Drawn from N(0, initializer_range) by one generator per tower (seed for vision, seed + 1 for text), layer
    by layer in order, so the in-memory and the streaming sparse upcycling draw the very same routers.
    """
    weight_map = weight_map_of(config)
    routers = {}
    for tower in TOWERS:
        cfg = getattr(config, f"{tower}_config")
        gen = torch.Generator().manual_seed(seed + (0 if tower == "vision" else 1))
        for layer in cfg.moe_layers:
            router = torch.empty(cfg.num_experts, cfg.hidden_size)
            routers[weight_map.router_key(tower, layer)] = router.normal_(0.0, cfg.initializer_range, generator=gen)
    return routers


def weight_map_of(config) -> WeightMap:
    """The dense<->MoE weight map of the family of the MoE `config` (a CLIP-MoE's: `encoder.clip.weight_map`)."""
    return family_of(config).family.weight_map


def _ffn(source: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in source:
        raise ValueError(f"expert source lacks {key}: it is not an FFN state of this base")
    return source[key]
