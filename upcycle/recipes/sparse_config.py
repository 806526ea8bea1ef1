"""The settings of `python -m upcycle sparse` (`SparseConfig`), whose base and MoE-layout flags DMU shares."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from encoder.utils.options import option, switch

TOWERS = ("vision", "text")


def parse_towers(text: str) -> tuple[str, ...]:
    """'vision', 'text' or 'vision,text' as a tuple of tower names."""
    towers = tuple(t.strip() for t in text.split(",") if t.strip())
    if not towers or any(t not in TOWERS for t in towers):
        raise argparse.ArgumentTypeError(f"{text!r} not understood: use vision, text or vision,text")
    return towers


@dataclass(frozen=True)
class SparseConfig:
    """sparse-upcycle a dense CLIP or SigLIP (experts = copies of the MLP, new routers)

    Sparse upcycling (CLIP-UP recipe): every expert starts as an exact copy of the dense MLP, routers are new;
    the result computes exactly the dense function.
    """

    base: str = option("--base", "dense base: a transformers CLIP, SigLIP or SigLIP2 directory, a hub id, or "
                       "open_clip:MODEL_NAME[:CHECKPOINT] (CLIP or SigLIP)")
    out: str = option("--out", "output MoE directory (CLIP-MoE, SigLIP-MoE, ...)")
    # the expert counts are checked against each other (check_expert_counts), naming both
    num_experts: int = option("--num-experts", "experts per MoE layer", 4)
    top_k: int = option("--top-k", "experts per token", 2)
    moe_layers: str = option("--moe-layers", "which layers become MoE: all, even, odd, last:N or comma-separated "
                             "indices", "all")
    towers: tuple[str, ...] = option("--towers", "towers to upcycle: vision, text or vision,text", TOWERS,
                                     parse=parse_towers)
    seed: int = option("--seed", "router initialisation seed", 0)
    moe_head: bool = switch("--moe-head", "also make the vision tower's attention-pooling head MLP a MoE layer "
                            "(SigLIP, SigLIP2; kept dense by default)")
    overwrite: bool = switch("--overwrite", "replace --out if it exists")
