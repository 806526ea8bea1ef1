"""What `python -m upcycle sparse`, `sparse-demo` and `init-base` do, each given its config (the parsers are
generated from the configs in cli.py)."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass

import torch
from tqdm import tqdm
from transformers import CLIPConfig, CLIPModel

from encoder import CLIPMoEModel
from encoder.convert.dense import default_image_processor, open_dense_clip
from encoder.model_card import summary_lines
from encoder.save import write_model_extras
from encoder.tensor_stream import return_large_frees_to_os
from encoder.utils.errors import NonFiniteValues
from encoder.utils.files import atomic_output_dir, check_output_dir
from encoder.utils.options import option, switch

from .eval.function_check import max_output_diff
from .recipes.assemble import check_expert_counts, moe_config_for
from .recipes.sparse import layerwise_output_diff, write_sparse_upcycled
from .recipes.sparse_config import SparseConfig

logger = logging.getLogger(__name__)


def run_sparse(cfg: SparseConfig) -> int:
    """Stream the sparse-upcycled base into --out (see `write_sparse_upcycled`), check it against the base
    layer-wise from the written files, then add preprocessing and the card and move the directory into place.

    Peak memory stays near one tensor for a transformers CLIP directory with safetensors weights; other bases
    (open_clip, hub ids, .bin weights) are loaded into memory first and then streamed out the same way.
    """
    check_output_dir(cfg.out, cfg.overwrite)
    check_expert_counts(cfg.num_experts, cfg.top_k)
    towers = cfg.towers
    return_large_frees_to_os()
    base = open_dense_clip(cfg.base)
    try:
        config = moe_config_for(base.config, cfg.num_experts, cfg.top_k, cfg.moe_layers, towers)
        with atomic_output_dir(cfg.out, cfg.overwrite) as tmp:
            model = write_sparse_upcycled(base, config, tmp, cfg.seed, progress=_progress)
            diff = layerwise_output_diff(base, tmp)
            not_finite = [name for name, value in diff.items() if not math.isfinite(value)]
            if not_finite:  # nothing is written: the atomic directory is dropped
                raise NonFiniteValues(f"the base {base.source} computes NaN or inf ({', '.join(not_finite[:3])}), so "
                                      "its weights hold non-finite values; upcycle a finite checkpoint")
            card = {
                "base": base.source,
                "recipe": f"sparse upcycling (CLIP-UP): {cfg.num_experts} experts copied from the dense MLP, "
                f"top-{cfg.top_k}, new routers (seed {cfg.seed}); not yet trained",
                "metrics": {"max |MoE - dense| at initialisation": f"{max(diff.values()):.2e}"},
                "details": {"moe_layers": cfg.moe_layers, "towers": list(towers), "seed": cfg.seed},
            }
            write_model_extras(tmp, model, base.image_processor, base.tokenizer, card)
    finally:
        base.close()
    print_summary(model, diff, cfg.out)
    return 0


def _progress(names):
    return tqdm(names, desc="writing tensors", unit="tensor", disable=None)


def print_summary(model, diff: dict, out) -> None:
    print(f"CLIP-MoE written to {out}")
    print("\n".join(summary_lines(model)))
    worst = max(diff.values())
    verdict = "identical to the dense model" if worst <= 1e-5 else "DIFFERS from the dense model"
    print(f"  dense-vs-MoE check: max abs diff {worst:.2e} over embeddings and hidden states ({verdict})")


@dataclass
class SparseDemoConfig:
    """build a small CLIP, sparse-upcycle it, check function preservation

    Builds a small dense CLIP, sparse-upcycles it through the same code as `upcycle sparse`, prints the summary
    and checks that the CLIP-MoE reproduces the dense model on real images (scikit-learn's handwritten digits).
    """

    out: str = option("--out", "working directory", "runs/sparse-demo")


def run_demo(cfg: SparseDemoConfig) -> int:
    """Build a small dense CLIP, sparse-upcycle it via the `sparse` command, check it on real digit images."""
    out = check_output_dir(cfg.out, overwrite=True)  # a working directory: its outputs are replaced
    base_dir, moe_dir = out / "dense-clip", out / "clip-moe"
    torch.manual_seed(0)
    base = CLIPModel(small_clip_config()).eval()
    with atomic_output_dir(base_dir, overwrite=True) as tmp:
        base.save_pretrained(tmp)
        default_image_processor(base.config.vision_config.image_size).save_pretrained(tmp)
    print(f"built a small dense CLIP ({sum(p.numel() for p in base.parameters()):,} parameters) in {base_dir}")

    run_sparse(SparseConfig(base=str(base_dir), out=str(moe_dir), overwrite=True))
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


@dataclass
class InitBaseConfig:
    """write a small randomly initialised CLIP with a tokenizer fitted to captions

    Writes a small dense CLIP (transformers layout, image processor, word-level tokenizer built from the data's
    captions) to train from scratch with `upcycle train --trainable all`: the base of the embedded demo. Real
    runs start from a real CLIP instead.
    """

    captions: str = option("--captions", "image-caption data file whose captions define the vocabulary")
    out: str = option("--out", "output CLIP directory")
    width: int = option("--width", "hidden size of both towers", 64)
    layers: int = option("--layers", "layers per tower", 4)
    heads: int = option("--heads", "attention heads", 4)
    image_size: int = option("--image-size", "model input size in pixels", 32)
    patch_size: int = option("--patch-size", "ViT patch size", 8)
    max_length: int = option("--max-length", "text context in tokens", 32)
    seed: int = option("--seed", "initialisation seed", 0)
    overwrite: bool = switch("--overwrite", "replace --out if it exists")


def run_init_base(cfg: InitBaseConfig) -> int:
    from .data import read_pairs
    from .experiments.small_base import init_small_clip

    check_output_dir(cfg.out, cfg.overwrite)
    captions = [p.caption for p in read_pairs(cfg.captions, skip_missing=True)]
    model = init_small_clip(cfg.out, captions, cfg.width, cfg.layers, cfg.heads, cfg.image_size,
                            cfg.patch_size, cfg.max_length, cfg.seed, cfg.overwrite)
    print(f"small CLIP ({sum(p.numel() for p in model.parameters()):,} parameters, vocabulary "
          f"{model.config.text_config.vocab_size}) written to {cfg.out}")
    return 0
