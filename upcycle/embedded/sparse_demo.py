"""`python -m upcycle sparse-demo`: a small dense CLIP, sparse-upcycled through `upcycle sparse`'s own code, checked
to reproduce the dense model on real handwritten digits.

The base comes from the demo's own builders (small_base.py: `init_small_clip` with the word-level tokenizer fitted
to the captions "the digit 0" ... "the digit 9"), so the check's captions are tokenised by the tokenizer saved with
the model, as `upcycle eval` would, rather than by hand-written token ids.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
from transformers import CLIPModel, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from encoder import CLIPMoEModel
from encoder.utils.errors import UserError
from encoder.utils.files import check_output_dir
from encoder.utils.options import option

from ..eval.function_check import max_output_diff
from ..recipes.sparse_command import run_sparse
from ..recipes.sparse_config import SparseConfig
from .small_base import init_small_clip

TOLERANCE = 1e-5  # max |MoE - dense| over embeddings and hidden states: float32 rounding, nothing more


def caption(digit: int) -> str:
    return f"the digit {digit}"


@dataclass(frozen=True)
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
    captions = [caption(d) for d in range(10)]
    base = init_small_clip(base_dir, captions, overwrite=True)
    print(f"built a small dense CLIP ({sum(p.numel() for p in base.parameters()):,} parameters) in {base_dir}")

    run_sparse(SparseConfig(base=str(base_dir), out=str(moe_dir), overwrite=True))
    moe = CLIPMoEModel.from_pretrained(moe_dir).eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(base_dir)  # the word-level tokenizer saved with the base
    diff = max_output_diff(base, moe, digit_inputs(base, tokenizer))
    print("check on 16 real handwritten digits (scikit-learn) after reloading from disk:")
    print(json.dumps({k: float(f"{v:.3e}") for k, v in diff.items()}, indent=2))
    worst = max(diff.values())
    if not worst <= TOLERANCE:  # `not <=`: a NaN fails too
        raise UserError(f"the upcycled model in {moe_dir} does not reproduce the dense model on real digits (max "
                        f"abs diff {worst:.2e} > {TOLERANCE:.0e}); sparse upcycling must preserve the function")
    return 0


def digit_inputs(model: CLIPModel, tokenizer: PreTrainedTokenizerBase, n: int = 16) -> dict[str, torch.Tensor]:
    """n handwritten digits (8x8, upscaled) with their captions 'the digit <d>' tokenised by `tokenizer`."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    size = model.config.vision_config.image_size
    images = torch.tensor(digits.images[:n], dtype=torch.float32)[:, None] / 16.0
    pixels = torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear").repeat(1, 3, 1, 1)
    text = tokenizer([caption(int(d)) for d in digits.target[:n]], padding=True, return_tensors="pt")
    return {"pixel_values": (pixels - 0.5) / 0.25, "input_ids": text["input_ids"],
            "attention_mask": text["attention_mask"]}
