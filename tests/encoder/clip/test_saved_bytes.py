"""Saved CLIP-MoE directories are byte-identical to what the code wrote before the model-family layer.

The CLIP family moved into encoder/clip/ (configs, models, weight map, tower rules) and every "is this a
CLIP-MoE" check became `encoder.family`'s. A user's saved directory must not change by a byte: the sha256 of each
file written below is compared with REFERENCE.

How REFERENCE was obtained: this file's `save_all` (it uses only names public both before and after the move:
`encoder.save_clip_moe`, `upcycle.sparse_upcycle`, `upcycle.recipes.sparse.write_sparse_upcycled`,
`encoder.convert.dense.open_dense_clip`) was run on a checkout of commit 0928564, the last commit before the move,
with `python tests/encoder/clip/test_saved_bytes.py` there, which prints the table. Same interpreter and packages as
requirements.lock (transformers writes its version into config.json). The tiny models are built here, not by the
shared conftest builders, so that a change to those cannot move the references.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import CLIPConfig, CLIPModel

if __name__ == "__main__":  # run as a script (to print the table): the checkout importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

FILES = ("config.json", "model.safetensors")


def dense_clip(seed: int) -> CLIPModel:
    """A seeded 3-layer, width-32 CLIP over 16x16 images (4 patches) and a 64-token vocabulary."""
    torch.manual_seed(seed)
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2)
    text = dict(tower, vocab_size=64, max_position_embeddings=12, eos_token_id=63, bos_token_id=62, pad_token_id=0)
    return CLIPModel(CLIPConfig(text_config=text, vision_config=dict(tower, image_size=16, patch_size=8),
                                projection_dim=16)).eval()


def save_all(root: Path) -> dict[str, Path]:
    """Every kind of CLIP-MoE directory the toolkit writes, from seeded tiny models, by name."""
    from encoder import save_clip_moe
    from encoder.convert.dense import default_image_processor, open_dense_clip
    from upcycle import moe_config_for, sparse_upcycle
    from upcycle.recipes.sparse import write_sparse_upcycled

    processor = default_image_processor(16)
    # vision MoE in every layer, experts perturbed apart: the full model and its vision-only export
    vision = sparse_upcycle(dense_clip(0), num_experts=4, top_k=2, moe_layers="all", towers=("vision",))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in vision.vision_model.encoder.layers:
            layer.mlp.experts.up_proj.add_(0.1 * torch.randn(layer.mlp.experts.up_proj.shape, generator=g))
    dirs = {"full": save_clip_moe(vision, root / "full", image_processor=processor),
            "vision_only": save_clip_moe(vision.vision_model, root / "vision_only", image_processor=processor)}
    # both towers MoE (the even layers), router fields set, and the text tower's own export
    both = sparse_upcycle(dense_clip(3), num_experts=3, top_k=1, moe_layers="even", seed=5,
                          router_jitter=0.1, capacity_factor=1.5, aux_loss_coef=0.02)
    dirs["both_towers"] = save_clip_moe(both, root / "both_towers", image_processor=processor)
    dirs["text_only"] = save_clip_moe(both.text_model, root / "text_only")
    # the streaming sparse upcycling (tensor by tensor from the dense files, as `upcycle sparse` writes it)
    dense = root / "dense"
    dense_clip(4).save_pretrained(dense)
    processor.save_pretrained(dense)
    source = open_dense_clip(str(dense))
    config = moe_config_for(source.config, 4, 2, "odd")
    streamed = root / "streamed"
    streamed.mkdir()
    write_sparse_upcycled(source, config, streamed, seed=2)
    dirs["streamed"] = streamed
    return dirs


def digests(dirs: dict[str, Path]) -> dict[str, dict[str, str]]:
    return {name: {f: hashlib.sha256((d / f).read_bytes()).hexdigest() for f in FILES} for name, d in dirs.items()}


REFERENCE = {  # sha256 at commit 0928564 (see the module docstring)
    "full": {
        "config.json": "1c0c78816a329ea91ec4933c9e12e87c7a7c0bc9cf387d233062e525a09c07ea",
        "model.safetensors": "4676ef286503eb1fee13ce3f4aae4db90791bef9131379f3ca5ae56eb575aa2f",
    },
    "vision_only": {
        "config.json": "656347ce74115b07239edb33b592af5402037221f72df9b30ae9035fea0ff88a",
        "model.safetensors": "dc4e5bee2b8f9c42d410a4f8e174af84236d18689dc98b9c08f75cf46cf602ee",
    },
    "both_towers": {
        "config.json": "edb3bb6cf8568b807aec18f763a445b6cd3f4666fee59d9e2a382b6918795020",
        "model.safetensors": "5e8c5cf8def390c177f6f93b73822246d85061ca8a0a1fe58969c8dda088f7b5",
    },
    "text_only": {
        "config.json": "1ed06ffc0762ea3aae87e5538d4b29c5d430b513a449578024297f17a65c391e",
        "model.safetensors": "9b605d410d43db62f8d3e0d5ced60cbab1ed26341b82207c12b5195772f2ea5a",
    },
    "streamed": {
        "config.json": "a1e48aafe54225cca18132237736490f622a5b37415a0c124aa57ef2732efad6",
        "model.safetensors": "4f30c72780841eedaca6204d2461e3128e4f2b07fdd7fa3cd4e3708994daca90",
    },
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    return save_all(tmp_path_factory.mktemp("saved"))


def test_saved_files_are_byte_identical_to_before_the_family_layer(saved):
    assert digests(saved) == REFERENCE


def test_reference_covers_both_towers_and_the_model_types(saved):
    """The table is worth its bytes only if the directories differ in what the move touched: each tower's weight
    map and each model_type the family registers for saving (full, vision tower, text tower)."""
    dirs = saved
    types = {name: json.loads((d / "config.json").read_text())["model_type"] for name, d in dirs.items()}
    assert types == {"full": "clip_moe", "vision_only": "clip_moe_vision_model", "both_towers": "clip_moe",
                     "text_only": "clip_moe_text_model", "streamed": "clip_moe"}
    from safetensors import safe_open

    with safe_open(dirs["both_towers"] / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "text_model.encoder.layers.0.mlp.experts.up_proj" in keys
    assert "vision_model.encoder.layers.1.mlp.router.weight" not in keys  # even layers only: 0 and 2
    assert "vision_model.encoder.layers.2.mlp.router.weight" in keys


if __name__ == "__main__":
    import tempfile

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(digests(save_all(Path(tmp))), indent=4))
