"""`python -m upcycle sparse-demo`: a small dense CLIP, sparse-upcycled through `upcycle sparse`'s own code, checked
to reproduce the dense model on real handwritten digits."""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
from transformers import CLIPConfig, CLIPModel

from encoder import CLIPMoEModel
from encoder.convert.dense import default_image_processor
from encoder.utils.files import atomic_output_dir, check_output_dir
from encoder.utils.options import option

from ..eval.function_check import max_output_diff
from ..recipes.sparse_command import run_sparse
from ..recipes.sparse_config import SparseConfig


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
