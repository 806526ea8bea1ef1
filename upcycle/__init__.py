"""Producing a CLIP-MoE from a dense CLIP: sparse upcycling and Diversified Multiplet Upcycling (DMU)."""

from .recipes.assemble import assemble_clip_moe, moe_config_for, resolve_moe_layers
from .recipes.sparse import sparse_upcycle

__all__ = ["assemble_clip_moe", "moe_config_for", "resolve_moe_layers", "sparse_upcycle"]
