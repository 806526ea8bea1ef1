"""What `python -m upcycle sparse` does, given its config (the parser is generated from SparseConfig in cli.py)."""

from __future__ import annotations

import math

from tqdm import tqdm

from encoder.convert.dense import open_dense_clip
from encoder.model_card import summary_lines
from encoder.save import write_model_extras
from encoder.tensor_stream import return_large_frees_to_os
from encoder.utils.errors import NonFiniteValues
from encoder.utils.files import atomic_output_dir, check_output_dir

from .assemble import check_expert_counts, moe_config_for
from .sparse import layerwise_check, within_rounding, write_sparse_upcycled
from .sparse_config import SparseConfig


def run_sparse(cfg: SparseConfig) -> int:
    """Stream the sparse-upcycled base into --out (see `write_sparse_upcycled`), check it against the base
    layer-wise from the written files, then add preprocessing and the card and move the directory into place.

    Any family's dense base (CLIP, SigLIP, SigLIP2). Peak memory stays near one tensor for a transformers directory
    with safetensors weights; other bases
    (open_clip, hub ids, .bin weights) are loaded into memory first and then streamed out the same way.
    """
    check_output_dir(cfg.out, cfg.overwrite)
    check_expert_counts(cfg.num_experts, cfg.top_k)
    towers = cfg.towers
    return_large_frees_to_os()
    base = open_dense_clip(cfg.base)
    try:
        config = moe_config_for(base.config, cfg.num_experts, cfg.top_k, cfg.moe_layers, towers,
                                moe_head=cfg.moe_head)
        label = base.family.label(True)
        with atomic_output_dir(cfg.out, cfg.overwrite) as tmp:
            model = write_sparse_upcycled(base, config, tmp, cfg.seed, progress=_progress)
            diff, largest = layerwise_check(base, tmp)
            not_finite = [name for name, value in diff.items() if not math.isfinite(value)]
            if not_finite:  # nothing is written: the atomic directory is dropped
                raise NonFiniteValues(f"the base {base.source} computes NaN or inf ({', '.join(not_finite[:3])}), so "
                                      "its weights hold non-finite values; upcycle a finite checkpoint")
            card = {
                "base": base.source,
                "recipe": f"sparse upcycling (CLIP-UP): {cfg.num_experts} experts copied from the dense MLP, "
                f"top-{cfg.top_k}, new routers (seed {cfg.seed}); not yet trained",
                "metrics": {"max |MoE - dense| at initialisation": f"{max(diff.values()):.2e}"},
                "details": {"moe_layers": cfg.moe_layers, "towers": list(towers), "seed": cfg.seed,
                            **({"moe_head": True} if cfg.moe_head else {})},
            }
            write_model_extras(tmp, model, base.image_processor, base.tokenizer, card)
    finally:
        base.close()
    print_summary(model, diff, cfg.out, label, largest)
    return 0


def _progress(names):
    return tqdm(names, desc="writing tensors", unit="tensor", disable=None)


def print_summary(model, diff: dict, out, label: str = "CLIP-MoE", largest: float = 0.0) -> None:
    print(f"{label} written to {out}")
    print("\n".join(summary_lines(model)))
    worst = max(diff.values())
    verdict = "identical to the dense model" if within_rounding(worst, largest) else "DIFFERS from the dense model"
    scale = f", largest |value| {largest:.3g}" if worst > 1e-5 else ""  # said where the verdict depends on it
    print(f"  dense-vs-MoE check: max abs diff {worst:.2e} over embeddings and hidden states{scale} ({verdict})")
