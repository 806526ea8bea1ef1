"""Fault tier, inputs that gave a wrong number without a word: the same image or the same base directory read two
ways by two commands. Training and evaluation must see one image's pixels alike, and every command must read a
model directory's weights from the file transformers' `from_pretrained` reads."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from encoder.utils.errors import UserError


@pytest.fixture
def grey16_png(tmp_path):
    """A 16-bit greyscale PNG whose pixels span 0..65535 (a horizontal ramp)."""
    ramp = np.linspace(0, 65535, 64 * 64).round().astype(np.uint16).reshape(64, 64)
    path = tmp_path / "ramp16.png"
    Image.fromarray(ramp).save(path)
    with Image.open(path) as img:
        assert img.mode in ("I", "I;16"), img.mode  # PIL holds a 16-bit PNG in one of these
    return path


def test_16_bit_greyscale_is_decoded_alike_for_llava_training_and_lmms_eval(grey16_png):
    """lmms-eval hands the model PIL images its data set decoded; they go through training's decoder, not PIL's
    `convert("RGB")` (which clips at 255 and leaves 2 of 256 levels)."""
    from mllm_bridge.lmms.model import _images
    from mllm_bridge.lmms.tasks.digit_grids.utils import doc_to_visual
    from mllm_bridge.train.data import load_rgb

    trained = np.asarray(load_rgb(str(grey16_png)))
    assert trained.shape == (64, 64, 3) and trained.dtype == np.uint8
    assert trained.min() == 0 and trained.max() == 255 and len(np.unique(trained)) == 256  # full dynamic range

    def open_doc(doc):
        return [Image.open(doc["path"])]

    (evaluated,) = _images(open_doc, {"path": grey16_png}, "a-task")
    np.testing.assert_array_equal(np.asarray(evaluated), trained)
    (task_visual,) = doc_to_visual({"image": Image.open(grey16_png)})
    (evaluated,) = _images(lambda doc: [task_visual], {}, "digit_grids_qa")
    np.testing.assert_array_equal(np.asarray(evaluated), trained)


def test_lmms_eval_refuses_an_image_of_unknown_scale_as_training_does(tmp_path):
    from mllm_bridge.lmms.model import _images

    wide = Image.fromarray(np.full((8, 8), 70000, dtype=np.int32), mode="I")
    with pytest.raises(UserError, match="image of task a-task holds I pixels from 70000 to 70000, outside"):
        _images(lambda doc: [wide], {}, "a-task")


# One weight file per directory, the one transformers reads: `upcycle sparse` streams the base's weights itself.

def save_shards(tensors: dict, directory, stem: str = "model") -> None:
    """`tensors` as two safetensors shards and their index, as `save_pretrained` writes a sharded checkpoint."""
    from safetensors.torch import save_file

    names = sorted(tensors)
    shards = {f"{stem}-00001-of-00002.safetensors": names[::2], f"{stem}-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in shards.items():
        save_file({k: tensors[k].contiguous() for k in keys}, directory / shard, metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
    (directory / f"{stem}.safetensors.index.json").write_text(json.dumps(index))


def with_stale_index(directory, other: dict) -> None:
    """model.safetensors stays; an index with other weights beside it (an earlier sharded save)."""
    save_shards(other, directory)


def with_explicit_file(directory, other: dict) -> None:
    """config.json's `transformers_weights` names another file, which from_pretrained reads first."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in other.items()}, directory / "chosen.safetensors", metadata={"format": "pt"})
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "transformers_weights": "chosen.safetensors"}))


@pytest.mark.parametrize("second_set, read_seed", [(with_stale_index, 0), (with_explicit_file, 1)],
                         ids=["file-and-index", "explicit"])
def test_sparse_upcycles_the_weights_from_pretrained_loads(tmp_path, second_set, read_seed):
    """The base holds weights of seed 0 in model.safetensors and of seed 1 elsewhere; transformers reads
    `read_seed`'s, and so must the streaming upcycle."""
    from conftest import save_tiny_dense_clip, tiny_dense_clip
    from transformers import CLIPModel

    from encoder.loading import load_clip
    from upcycle.cli import main

    base = save_tiny_dense_clip(tmp_path / "base", seed=0)
    second_set(base, tiny_dense_clip(seed=1).state_dict())
    loaded = CLIPModel.from_pretrained(base).state_dict()
    name = "vision_model.encoder.layers.0.mlp.fc1.weight"
    assert torch.equal(loaded[name], tiny_dense_clip(seed=read_seed).state_dict()[name])  # transformers' order
    assert main(["sparse", "--base", str(base), "--out", str(tmp_path / "moe")]) == 0
    moe = load_clip(tmp_path / "moe").model.state_dict()
    shared = sorted(set(loaded) & set(moe))
    assert len(shared) > 20
    for name in shared:  # embeddings, attention, norms, projections: copied as they are
        torch.testing.assert_close(moe[name], loaded[name], rtol=0, atol=0, msg=name)
    up = moe["vision_model.encoder.layers.0.mlp.experts.up_proj"]
    fc1 = loaded["vision_model.encoder.layers.0.mlp.fc1.weight"]
    for expert in up:  # every expert a copy of the dense MLP that from_pretrained loads
        assert torch.equal(expert, fc1) or torch.equal(expert, fc1.T)



def test_upcycle_train_refuses_to_resume_over_a_changed_sharded_base(base_clip_dir, grids_dir, tmp_path,
                                                                     monkeypatch, capsys):
    """The run records the digest of the weights from_pretrained reads; a sharded base had none (only
    model.safetensors was hashed), so new shards under the same index were resumed over without a word."""
    import shutil

    from conftest import kill_after_steps
    from safetensors.torch import load_file

    from upcycle.cli import main
    from upcycle.train import ContrastiveTrainer

    base = tmp_path / "base"
    shutil.copytree(base_clip_dir, base)
    tensors = load_file(base / "model.safetensors")
    (base / "model.safetensors").unlink()
    save_shards(tensors, base)
    args = ["train", "--model", str(base), "--train-data", str(grids_dir / "train.json"), "--out",
            str(tmp_path / "out"), "--max-steps", "4", "--batch-size", "16", "--checkpoint-every", "1"]
    kill_after_steps(monkeypatch, ContrastiveTrainer, 2)
    with pytest.raises(KeyboardInterrupt):
        main(args)
    monkeypatch.undo()
    capsys.readouterr()
    save_shards({k: v + 0.01 if v.is_floating_point() else v for k, v in tensors.items()}, base)
    assert main([*args, "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model_sha256" in err[0], err


def test_a_weights_pointer_outside_the_directory_is_one_line(tmp_path, capsys):
    """transformers refuses a `transformers_weights` outside the model directory; the streaming readers did not read
    it at all (they took model.safetensors). Now both refuse, the streaming one in one line."""
    from conftest import save_tiny_dense_clip

    from upcycle.cli import main

    base = save_tiny_dense_clip(tmp_path / "base")
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "transformers_weights": "../model.safetensors"}))
    assert main(["sparse", "--base", str(base), "--out", str(tmp_path / "moe")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "transformers_weights '../model.safetensors' is not a safetensors file or shard index " \
        "inside the model directory" in err[0], err
    assert not (tmp_path / "moe").exists()
