"""What each `python -m upcycle` command does (argument parsing lives in cli.py)."""

from __future__ import annotations

import argparse
import json
import logging
import math

import torch
from tqdm import tqdm
from transformers import CLIPConfig, CLIPModel

from encoder import CLIPMoEModel
from encoder.convert.dense import default_image_processor, open_dense_clip
from encoder.model_card import summary_lines
from encoder.save import write_model_extras
from encoder.tensor_stream import return_large_frees_to_os
from encoder.utils.errors import NonFiniteValues, UserError
from encoder.utils.files import atomic_output_dir, check_output_dir

from .eval.function_check import max_output_diff
from .recipes.assemble import check_expert_counts, moe_config_for
from .recipes.sparse import layerwise_output_diff, write_sparse_upcycled

logger = logging.getLogger(__name__)


def parse_towers(text: str) -> tuple[str, ...]:
    towers = tuple(t.strip() for t in text.split(",") if t.strip())
    if not towers or any(t not in ("vision", "text") for t in towers):
        raise UserError(f"--towers {text!r} not understood: use vision, text or vision,text")
    return towers


def run_sparse(args: argparse.Namespace) -> int:
    """Stream the sparse-upcycled base into --out (see `write_sparse_upcycled`), check it against the base
    layer-wise from the written files, then add preprocessing and the card and move the directory into place.

    Peak memory stays near one tensor for a transformers CLIP directory with safetensors weights; other bases
    (open_clip, hub ids, .bin weights) are loaded into memory first and then streamed out the same way.
    """
    check_output_dir(args.out, args.overwrite)
    check_expert_counts(args.num_experts, args.top_k)
    towers = parse_towers(args.towers)
    return_large_frees_to_os()
    base = open_dense_clip(args.base)
    try:
        config = moe_config_for(base.config, args.num_experts, args.top_k, args.moe_layers, towers)
        with atomic_output_dir(args.out, args.overwrite) as tmp:
            model = write_sparse_upcycled(base, config, tmp, args.seed, progress=_progress)
            diff = layerwise_output_diff(base, tmp)
            not_finite = [name for name, value in diff.items() if not math.isfinite(value)]
            if not_finite:  # nothing is written: the atomic directory is dropped
                raise NonFiniteValues(f"the base {base.source} computes NaN or inf ({', '.join(not_finite[:3])}), so "
                                      "its weights hold non-finite values; upcycle a finite checkpoint")
            card = {
                "base": base.source,
                "recipe": f"sparse upcycling (CLIP-UP): {args.num_experts} experts copied from the dense MLP, "
                f"top-{args.top_k}, new routers (seed {args.seed}); not yet trained",
                "metrics": {"max |MoE - dense| at initialisation": f"{max(diff.values()):.2e}"},
                "details": {"moe_layers": args.moe_layers, "towers": list(towers), "seed": args.seed},
            }
            write_model_extras(tmp, model, base.image_processor, base.tokenizer, card)
    finally:
        base.close()
    print_summary(model, diff, args.out)
    return 0


def _progress(names):
    return tqdm(names, desc="writing tensors", unit="tensor", disable=None)


def print_summary(model, diff: dict, out) -> None:
    print(f"CLIP-MoE written to {out}")
    print("\n".join(summary_lines(model)))
    worst = max(diff.values())
    verdict = "identical to the dense model" if worst <= 1e-5 else "DIFFERS from the dense model"
    print(f"  dense-vs-MoE check: max abs diff {worst:.2e} over embeddings and hidden states ({verdict})")


def run_demo(args: argparse.Namespace) -> int:
    """Build a small dense CLIP, sparse-upcycle it via the `sparse` command, check it on real digit images."""
    out = check_output_dir(args.out, overwrite=True)  # a working directory: its outputs are replaced
    base_dir, moe_dir = out / "dense-clip", out / "clip-moe"
    torch.manual_seed(0)
    base = CLIPModel(small_clip_config()).eval()
    with atomic_output_dir(base_dir, overwrite=True) as tmp:
        base.save_pretrained(tmp)
        default_image_processor(base.config.vision_config.image_size).save_pretrained(tmp)
    print(f"built a small dense CLIP ({sum(p.numel() for p in base.parameters()):,} parameters) in {base_dir}")

    ns = argparse.Namespace(base=str(base_dir), out=str(moe_dir), num_experts=4, top_k=2, moe_layers="all",
                            towers="vision,text", seed=0, overwrite=True)
    run_sparse(ns)
    moe = CLIPMoEModel.from_pretrained(moe_dir).eval()
    diff = max_output_diff(base, moe, digit_inputs(base))
    print("check on 16 real handwritten digits (scikit-learn) after reloading from disk:")
    print(json.dumps({k: float(f"{v:.3e}") for k, v in diff.items()}, indent=2))
    if max(diff.values()) > 1e-5:
        raise SystemExit("the upcycled model does not reproduce the dense model")
    return 0


def small_clip_config() -> CLIPConfig:
    return CLIPConfig(
        text_config=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                         vocab_size=1000, max_position_embeddings=32, eos_token_id=999, bos_token_id=998,
                         pad_token_id=0),
        vision_config=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=32,
    )


def digit_inputs(model: CLIPModel, n: int = 16) -> dict[str, torch.Tensor]:
    """n handwritten digits (8x8, upscaled) with captions 'the digit <d>' as word-level token ids."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    size = model.config.vision_config.image_size
    images = torch.tensor(digits.images[:n], dtype=torch.float32)[:, None] / 16.0
    pixels = torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear").repeat(1, 3, 1, 1)
    t = model.config.text_config
    ids = torch.tensor([[t.bos_token_id, 1, 2, 3 + int(d), t.eos_token_id] for d in digits.target[:n]])
    return {"pixel_values": (pixels - 0.5) / 0.25, "input_ids": ids}


def run_init_base(args: argparse.Namespace) -> int:
    from .data import read_pairs
    from .experiments.small_base import init_small_clip

    check_output_dir(args.out, args.overwrite)
    captions = [p.caption for p in read_pairs(args.captions, skip_missing=True)]
    model = init_small_clip(args.out, captions, args.width, args.layers, args.heads, args.image_size,
                            args.patch_size, args.max_length, args.seed, args.overwrite)
    print(f"small CLIP ({sum(p.numel() for p in model.parameters()):,} parameters, vocabulary "
          f"{model.config.text_config.vocab_size}) written to {args.out}")
    return 0
