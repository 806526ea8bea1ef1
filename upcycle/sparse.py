"""Sparse upcycling (the CLIP-UP recipe): every expert an exact copy of the dense MLP, routers new.

With identical experts and renormalised top-k weights the CLIP-MoE computes exactly the dense function,
so continued training starts from the dense model's quality.
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import CLIPModel

from encoder import CLIPMoEModel
from encoder.dense import load_dense_clip

from .assemble import assemble_clip_moe, moe_config_for


def sparse_upcycle(
    base: CLIPModel | str,
    num_experts: int = 4,
    top_k: int = 2,
    moe_layers: str | Sequence[int] = "all",
    towers: Sequence[str] = ("vision", "text"),
    seed: int = 0,
    **moe_fields,
) -> CLIPMoEModel:
    """Upcycle a dense CLIP (a `CLIPModel`, a directory, a hub id or `open_clip:NAME[:CKPT]`) into a CLIP-MoE.

    moe_layers: "all", "even", "odd", "last:N" or a list of layer indices, applied to each tower in `towers`.
    moe_fields: further MoE config fields (router_jitter, capacity_factor, aux_loss_coef, router_z_loss_coef).
    """
    dense = base if isinstance(base, CLIPModel) else load_dense_clip(base).model
    config = moe_config_for(dense, num_experts, top_k, moe_layers, towers, **moe_fields)
    return assemble_clip_moe(dense, config, seed=seed)
