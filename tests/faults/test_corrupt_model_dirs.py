"""Fault tier, damaged model directories: every loader of a CLIP-MoE directory (the library's `load_clip`, the
LLaVA tower, the tower reader behind `mllm_bridge check` / `swap-tower` / the lmms-eval plugin, the CLIs) refuses
a damaged one with one line naming the file and the fix, and never returns a model with silently wrong numbers
(transformers re-initialises at random any tensor a config describes that the weights lack)."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import CAPTIONS, REPO_ROOT, save_tiny_clip_moe, save_tiny_dense_clip
from safetensors.torch import load_file, save_file

from encoder.loading import load_clip, require_finite_weights
from encoder.tower import CLIPMoEVisionTower
from encoder.utils.errors import NonFiniteValues, UserError
from mllm_bridge.llava.tower_info import read_tower

REPO = REPO_ROOT
WEIGHTS, CONFIG, PREPROCESSOR = "model.safetensors", "config.json", "preprocessor_config.json"


def save_word_tokenizer(directory: Path) -> None:
    from upcycle.embedded.small_base import build_word_tokenizer

    build_word_tokenizer(CAPTIONS, max_length=16).save_pretrained(directory)


@pytest.fixture(scope="module")
def moe_source(tmp_path_factory) -> Path:
    """The tiny CLIP-MoE of conftest (vision MoE in all 4 layers, top-2 of 4 experts) with a tokenizer."""
    out = save_tiny_clip_moe(tmp_path_factory.mktemp("sound") / "clip-moe")
    save_word_tokenizer(out)
    return out


@pytest.fixture(scope="module")
def dense_source(tmp_path_factory) -> Path:
    out = save_tiny_dense_clip(tmp_path_factory.mktemp("sound") / "clip")
    save_word_tokenizer(out)
    return out


# Corruptions: each edits a copy of the directory and names the file the error must name.

def edit_config(*path, value):
    def edit(d: Path) -> str:
        config = json.loads((d / CONFIG).read_text())
        node = config
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        (d / CONFIG).write_text(json.dumps(config))
        return CONFIG
    return edit


def truncate(d: Path) -> str:
    weights = d / WEIGHTS
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return WEIGHTS


def zero_bytes(d: Path) -> str:
    (d / WEIGHTS).write_bytes(b"")
    return WEIGHTS


def delete_weights(d: Path) -> str:
    (d / WEIGHTS).unlink()
    return WEIGHTS


def shard_missing(d: Path) -> str:
    """Split the weights into two shards with an index, then lose the second shard."""
    tensors = load_file(d / WEIGHTS)
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, d / shard, metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    (d / WEIGHTS).unlink()
    (d / "model-00002-of-00002.safetensors").unlink()
    return "model-00002-of-00002.safetensors"


def write(name: str, text: str):
    def edit(d: Path) -> str:
        (d / name).write_text(text)
        return name
    return edit


def edit_processor(**values):
    def edit(d: Path) -> str:
        config = json.loads((d / PREPROCESSOR).read_text())
        (d / PREPROCESSOR).write_text(json.dumps({**config, **values}))
        return PREPROCESSOR
    return edit


V = "vision_config"
# (id, corruption, what the one line must say besides the file)
TOWER_FAULTS = [
    ("truncated", truncate, "truncated"),
    ("zero-byte", zero_bytes, "not a safetensors file"),
    ("no-weights", delete_weights, "is missing"),
    ("missing-shard", shard_missing, "names the shard"),
    ("num-experts-0", edit_config(V, "num_experts", value=0), "num_experts must be >= 1"),
    ("num-experts-negative", edit_config(V, "num_experts", value=-2), "num_experts must be >= 1"),
    ("num-experts-more-than-weights", edit_config(V, "num_experts", value=8),
     "vision_config.num_experts is 8 but model.safetensors has 4 experts"),
    ("num-experts-fewer-than-weights", edit_config(V, "num_experts", value=3),
     "vision_config.num_experts is 3 but model.safetensors has 4 experts"),
    ("num-experts-string", edit_config(V, "num_experts", value="4"), "num_experts must be an integer, got '4'"),
    ("top-k-0", edit_config(V, "top_k", value=0), "top_k must be between 1 and num_experts (4), got 0"),
    ("top-k-above-experts", edit_config(V, "top_k", value=5), "top_k must be between 1 and num_experts (4), got 5"),
    ("top-k-string", edit_config(V, "top_k", value="2"), "top_k must be an integer"),
    ("top-k-float", edit_config(V, "top_k", value=2.0), "top_k must be an integer"),
    ("moe-layers-out-of-range", edit_config(V, "moe_layers", value=[0, 1, 2, 3, 4]), "moe_layers [4] out of range"),
    ("moe-layers-duplicated", edit_config(V, "moe_layers", value=[0, 1, 1, 2, 3]), "moe_layers has duplicates"),
    ("moe-layers-fewer-than-weights", edit_config(V, "moe_layers", value=[0, 1]),
     "vision_config.moe_layers is [0, 1] but model.safetensors has MoE layers [0, 1, 2, 3]"),
    ("moe-layers-string", edit_config(V, "moe_layers", value="0,1,2,3"), "moe_layers must be a list of layer indices"),
    ("width-string", edit_config(V, "hidden_size", value="32"), "hidden_size"),
    ("width-not-the-weights", edit_config(V, "intermediate_size", value=48), "has shape"),
    ("text-top-k-0", edit_config("text_config", "top_k", value=0), "text_config: top_k must be between"),
    ("config-not-json", write(CONFIG, '{"model_type": "clip_moe",'), "is not valid JSON"),
    ("processor-not-json", write(PREPROCESSOR, "{nope"), "is not valid JSON"),
    ("processor-std-0", edit_processor(image_std=[0.0, 0.26, 0.27]), "image_std [0.0, 0.26, 0.27] has a value <= 0"),
    ("processor-mean-string", edit_processor(image_mean="0.5"), "image_mean is '0.5', not 3 finite numbers"),
    # Values only the forward reads: NaN passes every `<` check, and each failed at the first forward or gave NaN.
    ("capacity-factor-nan", edit_config(V, "capacity_factor", value=float("nan")),
     "capacity_factor must be a finite number > 0 or null (dropless), got nan"),
    ("capacity-factor-inf", edit_config(V, "capacity_factor", value=float("inf")),
     "capacity_factor must be a finite number > 0 or null (dropless), got inf"),
    ("router-jitter-nan", edit_config(V, "router_jitter", value=float("nan")), "router_jitter must be in [0, 1)"),
    ("router-jitter-inf", edit_config(V, "router_jitter", value=float("inf")), "router_jitter must be in [0, 1)"),
    ("router-jitter-1", edit_config(V, "router_jitter", value=1.0), "router_jitter must be in [0, 1)"),
    ("aux-loss-coef-nan", edit_config(V, "aux_loss_coef", value=float("nan")),
     "aux_loss_coef must be a finite number >= 0 (a loss weight), got nan"),
    ("z-loss-coef-negative", edit_config(V, "router_z_loss_coef", value=-1.0),
     "router_z_loss_coef must be a finite number >= 0"),
    ("hidden-act-unknown", edit_config(V, "hidden_act", value="quick_gelu2"),
     "hidden_act 'quick_gelu2' is not an activation transformers knows"),
    ("layer-norm-eps-nan", edit_config(V, "layer_norm_eps", value=float("nan")),
     "layer_norm_eps must be a finite number > 0, got nan"),
    ("layer-norm-eps-negative", edit_config(V, "layer_norm_eps", value=-1e-5), "layer_norm_eps must be a finite"),
    ("attention-dropout-nan", edit_config(V, "attention_dropout", value=float("nan")),
     "attention_dropout must be a number in [0, 1), got nan"),
]
# What only the full model reads: the text tower's layout and the tokenizer (the LLaVA tower loads neither).
FULL_MODEL_FAULTS = [
    ("text-moe-layers-not-the-weights", edit_config("text_config", "moe_layers", value=[0, 1]),
     "text_config.moe_layers is [0, 1] but model.safetensors has MoE layers []"),
    ("tokenizer-not-json", write("tokenizer.json", '{"version": "1.0", "model": '), "is not valid JSON"),
    ("tokenizer-wrong-content", write("tokenizer.json", '{"version": "1.0"}'), "tokenizer"),
    ("tokenizer-config-not-an-object", write("tokenizer_config.json", "[1, 2]"), "not an object"),
    ("text-hidden-act-unknown", edit_config("text_config", "hidden_act", value="relu3"),
     "text_config: hidden_act 'relu3' is not an activation"),
    ("text-eos-outside-the-vocabulary", edit_config("text_config", "eos_token_id", value=100),
     "text_config: eos_token_id must be a token id below vocab_size (100)"),
]


def corrupted(tmp_path: Path, source: Path, corruption) -> tuple[Path, str]:
    directory = tmp_path / source.name
    shutil.copytree(source, directory)
    return directory, corruption(directory)


def assert_one_line(err: Exception, directory: Path, file: str, expected: str) -> None:
    message = str(err)
    assert "\n" not in message, message
    assert file in message and str(directory) in message, message
    assert expected in message, message


def tower_args(**extra) -> SimpleNamespace:
    return SimpleNamespace(mm_vision_select_layer=-2, mm_vision_select_feature="patch", **extra)


def test_the_sound_directory_loads_everywhere(moe_source):
    """The control: without a fault every entry point below loads the fixture (with its tokenizer)."""
    loaded = load_clip(moe_source)
    assert loaded.is_moe and loaded.tokenizer is not None
    assert CLIPMoEVisionTower(str(moe_source), tower_args()).is_loaded
    assert read_tower(moe_source).num_experts == 4


@pytest.mark.parametrize("corruption, expected", [f[1:] for f in TOWER_FAULTS + FULL_MODEL_FAULTS],
                         ids=[f[0] for f in TOWER_FAULTS + FULL_MODEL_FAULTS])
def test_load_clip_refuses(tmp_path, moe_source, corruption, expected):
    directory, file = corrupted(tmp_path, moe_source, corruption)
    with pytest.raises(UserError) as err:
        load_clip(directory)
    assert_one_line(err.value, directory, file, expected)


@pytest.mark.parametrize("corruption, expected", [f[1:] for f in TOWER_FAULTS], ids=[f[0] for f in TOWER_FAULTS])
def test_llava_tower_and_tower_reader_refuse(tmp_path, moe_source, corruption, expected):
    directory, file = corrupted(tmp_path, moe_source, corruption)
    with pytest.raises(UserError) as err:
        CLIPMoEVisionTower(str(directory), tower_args())
    assert_one_line(err.value, directory, file, expected)
    with pytest.raises(UserError) as err:  # what check, swap-tower and the lmms-eval plugin read first
        read_tower(directory)
    assert_one_line(err.value, directory, file, expected)


@pytest.mark.parametrize("fault", ["num-experts-string", "top-k-0", "config-not-json"])
def test_delay_loaded_tower_refuses_its_config(tmp_path, moe_source, fault):
    """LLaVA builds towers with delay_load inside from_pretrained: the config alone is read then."""
    _, corruption, expected = next(f for f in TOWER_FAULTS if f[0] == fault)
    directory, file = corrupted(tmp_path, moe_source, corruption)
    with pytest.raises(UserError) as err:
        CLIPMoEVisionTower(str(directory), tower_args(), delay_load=True)
    assert_one_line(err.value, directory, file, expected)


# A processor whose images the model cannot take (its position embeddings fix the image size): refused where the
# model is loaded with it; `mllm_bridge check` lists it among the checkpoint's problems (see test_checks).
SIZE_FAULTS = [
    ("crop-not-the-image-size", edit_processor(crop_size={"height": 224, "width": 224}),
     'crop_size is 224x224 but the model takes 32x32 images (vision_config.image_size); set crop_size to '
     '{"height": 32, "width": 32} in preprocessor_config.json'),
    ("no-crop-other-size", edit_processor(do_center_crop=False, size={"shortest_edge": 48}),
     "do_center_crop is false and size is {'shortest_edge': 48}, which gives no 32x32 images"),
]


@pytest.mark.parametrize("corruption, expected", [f[1:] for f in SIZE_FAULTS], ids=[f[0] for f in SIZE_FAULTS])
def test_a_processor_whose_images_do_not_fit_the_model_is_refused(tmp_path, moe_source, corruption, expected):
    directory, file = corrupted(tmp_path, moe_source, corruption)
    with pytest.raises(UserError) as err:
        load_clip(directory)
    assert_one_line(err.value, directory, file, expected)
    with pytest.raises(UserError) as err:
        CLIPMoEVisionTower(str(directory), tower_args())
    assert_one_line(err.value, directory, file, expected)


def test_a_processor_that_resizes_to_the_image_size_without_a_crop_loads(tmp_path, moe_source):
    """open_clip's 'squash' resize: no crop, size height x width = the model's image size."""
    directory, _ = corrupted(tmp_path, moe_source, edit_processor(do_center_crop=False,
                                                                  size={"height": 32, "width": 32}))
    assert load_clip(directory).image_processor.size["height"] == 32


def test_vision_export_with_fewer_moe_layers_than_its_weights(tmp_path):
    directory = save_tiny_clip_moe(tmp_path / "vision-export", vision_only=True)
    config = json.loads((directory / CONFIG).read_text())
    config["moe_layers"] = [0, 1, 2]
    (directory / CONFIG).write_text(json.dumps(config))
    with pytest.raises(UserError) as err:
        CLIPMoEVisionTower(str(directory), tower_args())
    assert_one_line(err.value, directory, CONFIG, "moe_layers is [0, 1, 2] but model.safetensors has MoE layers")


def test_config_classes_reject_wrong_types_wherever_built():
    from encoder import CLIPMoEConfig, CLIPMoEVisionConfig

    for fields, message in [(dict(num_experts="4"), "num_experts must be an integer"),
                            (dict(top_k=True), "top_k must be an integer"),
                            (dict(moe_layers=["1"]), "moe_layers must be a list"),
                            (dict(router_jitter="0.1"), "router_jitter must be a number")]:
        with pytest.raises(Exception, match=message):
            CLIPMoEVisionConfig(num_hidden_layers=4, **fields)
        with pytest.raises(Exception, match=message):
            CLIPMoEConfig.from_dict({"vision_config": {"num_hidden_layers": 4, **fields}})
    assert CLIPMoEVisionConfig(num_hidden_layers=4, moe_layers=(3, torch.tensor(1))).moe_layers == [1, 3]


# The dense base of `upcycle sparse`: a present but corrupt preprocessor or tokenizer is no longer replaced by
# defaults (OpenAI normalisation, no tokenizer) in the CLIP-MoE it writes.

@pytest.mark.parametrize("name, text, expected", [
    (PREPROCESSOR, "{nope", "is not valid JSON"),
    ("tokenizer.json", '{"version": "1.0"}', "the tokenizer"),
], ids=["processor", "tokenizer"])
def test_sparse_refuses_a_base_with_corrupt_preprocessing(tmp_path, dense_source, capsys, name, text, expected):
    from upcycle.cli import main

    base, file = corrupted(tmp_path, dense_source, write(name, text))
    out = tmp_path / "moe"
    assert main(["sparse", "--base", str(base), "--out", str(out)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert str(base) in lines[0] and file in lines[0] and expected in lines[0], lines
    assert not out.exists()


@pytest.mark.parametrize("corruption, expected", [
    (edit_config(V, "hidden_act", value="nope"), "vision_config: hidden_act 'nope' is not an activation"),
    (edit_config("text_config", "layer_norm_eps", value=float("nan")),
     "text_config: layer_norm_eps must be a finite number > 0, got nan"),
    (edit_processor(crop_size={"height": 224, "width": 224}), "crop_size is 224x224 but the model takes 32x32"),
], ids=["hidden-act", "layer-norm-eps-nan", "crop-size"])
def test_sparse_refuses_a_base_the_forward_cannot_use(tmp_path, dense_source, capsys, corruption, expected):
    """The dense base is held to the CLIP-MoE's rules, named as the base's fault (not the output's)."""
    from upcycle.cli import main

    base, file = corrupted(tmp_path, dense_source, corruption)
    out = tmp_path / "moe"
    assert main(["sparse", "--base", str(base), "--out", str(out)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert str(base / file) in lines[0] and expected in lines[0], lines
    assert not out.exists()


def test_sparse_still_uses_openai_preprocessing_for_a_base_without_one(tmp_path, dense_source):
    """The documented fallback for a missing file is kept: only a present-and-corrupt one is refused."""
    from upcycle.cli import main

    base = tmp_path / "base"
    shutil.copytree(dense_source, base)
    (base / PREPROCESSOR).unlink()
    (base / "tokenizer.json").unlink()
    (base / "tokenizer_config.json").unlink()
    out = tmp_path / "moe"
    assert main(["sparse", "--base", str(base), "--out", str(out)]) == 0
    processor = json.loads((out / PREPROCESSOR).read_text())
    assert processor["image_mean"] == pytest.approx([0.48145466, 0.4578275, 0.40821073])
    assert not (out / "tokenizer.json").exists()


# import-official: a file that is not a checkpoint at all is not called a malicious pickle.

class Unsafe:  # any class outside torch's allowlist: weights_only refuses to rebuild it
    pass


@pytest.mark.parametrize("make, expected", [
    (lambda p: p.write_bytes(os.urandom(4096)), "is not a PyTorch checkpoint (corrupt, truncated"),
    (lambda p: p.write_bytes(b""), "is not a PyTorch checkpoint"),
    (lambda p: (torch.save({"w": torch.zeros(64)}, p, _use_new_zipfile_serialization=False),
                p.write_bytes(p.read_bytes()[:200])), "is not a PyTorch checkpoint"),
    (lambda p: torch.save({"w": Unsafe()}, p), "holds pickled Python objects other than tensors"),
    (lambda p: p.write_bytes(pickle.dumps({"w": Unsafe()}, protocol=0)), "holds pickled Python objects"),
], ids=["random-bytes", "empty", "truncated-legacy", "unsafe-zip", "unsafe-plain-pickle"])
def test_import_official_tells_garbage_from_unsafe_pickles(tmp_path, capsys, make, expected):
    from encoder.cli import main

    ckpt = tmp_path / "release.pt"
    make(ckpt)
    assert main(["import-official", str(ckpt), "--out", str(tmp_path / "out")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and str(ckpt) in lines[0] and expected in lines[0], lines
    if "unsafe" not in expected and "pickled" not in expected:
        assert "pickled Python objects" not in lines[0]
    assert not (tmp_path / "out").exists()


# The finite-weights check the trainers run before their first step.

def test_require_finite_weights_names_the_tensor_and_the_source(moe_source):
    model = load_clip(moe_source).model
    require_finite_weights(model, moe_source)  # sound weights pass
    name = "vision_model.encoder.layers.2.mlp.experts.up_proj"
    with torch.no_grad():
        model.get_parameter(name)[1, 0, 0] = float("nan")
        model.get_parameter(name)[1, 0, 1] = float("inf")
    with pytest.raises(NonFiniteValues) as err:
        require_finite_weights(model, moe_source)
    message = str(err.value)
    assert "\n" not in message and str(moe_source) in message and name in message and "holds 2 NaN" in message
    assert isinstance(err.value, UserError)


# The command lines, end to end: one line on stderr and the exit code (a few only; each costs an interpreter).

def run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=180,
                          env=env, check=False)


@pytest.mark.end_to_end
def test_upcycle_eval_refuses_a_config_that_lies_about_the_experts(tmp_path, moe_source):
    from PIL import Image

    directory, _ = corrupted(tmp_path, moe_source, edit_config(V, "num_experts", value=2))
    Image.new("RGB", (32, 32), "white").save(tmp_path / "a.png")
    (tmp_path / "pairs.csv").write_text("image,caption\na.png,a photo of a cat\n")
    result = run("upcycle", "eval", "--model", str(directory), "--data", str(tmp_path / "pairs.csv"), "--device", "cpu")
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: {directory / CONFIG}: vision_config.num_experts is 2 but model.safetensors has 4 experts per MoE "
        "layer; set vision_config.num_experts to match the weights or re-save the model"]
    assert not result.stdout.strip()


@pytest.mark.end_to_end
def test_mllm_bridge_check_reports_a_truncated_tower(tmp_path, moe_source):
    tower, _ = corrupted(tmp_path, moe_source, truncate)
    llava = tmp_path / "llava-tiny"
    llava.mkdir()
    (llava / CONFIG).write_text(json.dumps({"model_type": "llava_llama", "mm_vision_tower": str(tower),
                                            "mm_hidden_size": 32, "mm_vision_select_layer": -2,
                                            "mm_vision_select_feature": "patch", "mm_projector_type": "mlp2x_gelu"}))
    result = run("mllm_bridge", "check", str(llava))
    assert result.returncode == 1, result.stdout + result.stderr
    problems = [line for line in result.stdout.splitlines() if line.startswith("  - ")]
    assert len(problems) == 1 and str(tower / WEIGHTS) in problems[0] and "truncated" in problems[0], result.stdout
    assert "Traceback" not in result.stderr
