"""Saved CLIP-MoE directories are byte-identical to what the code wrote before the model-family layer.

The CLIP family moved into encoder/clip/ (configs, models, weight map, tower rules) and every "is this a
CLIP-MoE" check became `encoder.family`'s. A user's saved directory must not change by a byte: the sha256 of each
file written below is compared with REFERENCE.

How REFERENCE was obtained: this file's `save_all` (it uses only names public both before and after the move:
`encoder.save_clip_moe`, `upcycle.sparse_upcycle`, `upcycle.recipes.sparse.write_sparse_upcycled`,
`encoder.convert.dense.open_dense_clip`, and the conftest builders) was run on a checkout of commit 0928564, the
last commit before the move, with `python tests/encoder/clip/test_saved_bytes.py` there, which prints the table.
Same interpreter and packages as requirements.lock (transformers writes its version into config.json).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch

if __name__ == "__main__":  # run as a script (to print the table): the checkout and its tests/ importable
    sys.path[:0] = [str(Path(__file__).resolve().parents[3]), str(Path(__file__).resolve().parents[2])]
from conftest import save_tiny_clip_moe, save_tiny_dense_clip, tiny_dense_clip  # noqa: E402

FILES = ("config.json", "model.safetensors")


def save_all(root: Path) -> dict[str, Path]:
    """Every kind of CLIP-MoE directory the toolkit writes, from seeded tiny models, by name."""
    from encoder import save_clip_moe
    from encoder.convert.dense import default_image_processor, open_dense_clip
    from upcycle import moe_config_for, sparse_upcycle
    from upcycle.recipes.sparse import write_sparse_upcycled

    dirs = {
        # vision MoE in every layer, experts perturbed apart: the full model and its vision-only export
        "full": save_tiny_clip_moe(root / "full"),
        "vision_only": save_tiny_clip_moe(root / "vision_only", vision_only=True),
    }
    # both towers MoE (text in the even layers), router fields set, and the text tower's own export
    both = sparse_upcycle(tiny_dense_clip(3), num_experts=3, top_k=1, moe_layers="even", seed=5,
                          router_jitter=0.1, capacity_factor=1.5, aux_loss_coef=0.02)
    dirs["both_towers"] = save_clip_moe(both, root / "both_towers", image_processor=default_image_processor(32))
    dirs["text_only"] = save_clip_moe(both.text_model, root / "text_only")
    # the streaming sparse upcycling (tensor by tensor from the dense files, as `upcycle sparse` writes it)
    dense = save_tiny_dense_clip(root / "dense", seed=4)
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
        "config.json": "9452a248654f43b7afb48efaa7cf3fd4690aa30dace31333e23d301948923ac4",
        "model.safetensors": "71d84e2ccc68582770c39841fcf5f7e0735f6c8d40a42e519fc593257b698543",
    },
    "vision_only": {
        "config.json": "3d93e3280d08398c8ffb24ce00efb6e1c0eb173b542c0fb39c1a1e29d4680c3f",
        "model.safetensors": "4f3b160e4ab102003004bfb3690e423e519292760f6eb8b704810ed2f43d590c",
    },
    "both_towers": {
        "config.json": "e8143df2754c2448a772b3bbeca1bd0b41ee0729d1ebf39fce3da8927369b12c",
        "model.safetensors": "e1f042ebea1de37a2779aae06b8ffa54cdfac9c44c697fd8f4592c96053c3a75",
    },
    "text_only": {
        "config.json": "4f32451197584e29750a97a82de247a558b4aa1487f6b6f257de2024dfc0108b",
        "model.safetensors": "4effa9fe7f642126899d16ed40d7d2432f52cdf0dbbd53aa87c25e0a54e23f6f",
    },
    "streamed": {
        "config.json": "508b6a87e028312df36a4ede663d592e6eca21a0f7ea46fe3b9345f64c7003f8",
        "model.safetensors": "6370ec7fa7a9e307114ed4c3945d0243efb03045f2d05e7181fb54fc756c36d9",
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
    assert "vision_model.encoder.layers.3.mlp.router.weight" not in keys  # even layers only: 0 and 2
    assert "vision_model.encoder.layers.2.mlp.router.weight" in keys


if __name__ == "__main__":
    import tempfile

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(digests(save_all(Path(tmp))), indent=4))
