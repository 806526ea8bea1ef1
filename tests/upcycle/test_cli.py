"""`python -m upcycle sparse` / `demo`: the written directory, the summary, and bad input."""

import json
import os
import subprocess
import sys

import pytest
from conftest import tiny_dense_clip
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, CLIPImageProcessor, PreTrainedTokenizerFast

from encoder import CLIPMoEModel, CLIPMoEVisionModel
from upcycle.cli import main
from upcycle.eval.function_check import max_output_diff


@pytest.fixture
def base_dir(tmp_path):
    """A transformers CLIP directory with an image processor and a (word-level) tokenizer."""
    path = tmp_path / "dense"
    tiny_dense_clip().save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    vocab = {"[UNK]": 0, "a": 1, "digit": 2, "three": 3}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(path)
    return path


def test_sparse_writes_a_loadable_clip_moe_directory(base_dir, tmp_path, capsys, batch):
    out = tmp_path / "moe"
    rc = main(["sparse", "--base", str(base_dir), "--out", str(out), "--num-experts", "3", "--top-k", "1",
               "--moe-layers", "odd", "--towers", "vision"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "total" in printed and "active per token" in printed and "MoE layers [1, 3]" in printed
    assert "identical to the dense model" in printed
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "README.md",
                 "tokenizer.json", "clip_moe_recipe.json"):
        assert (out / name).is_file(), name
    config = json.loads((out / "config.json").read_text())
    assert config["vision_config"]["moe_layers"] == [1, 3] and config["text_config"]["moe_layers"] == []
    assert config["vision_config"]["num_experts"] == 3 and config["vision_config"]["top_k"] == 1
    assert CLIPImageProcessor.from_pretrained(out).crop_size["height"] == 32
    assert AutoTokenizer.from_pretrained(out)("a digit three")["input_ids"] == [1, 2, 3]
    assert "sparse upcycling" in (out / "README.md").read_text()
    moe = CLIPMoEModel.from_pretrained(out)
    assert max(max_output_diff(tiny_dense_clip(), moe, batch).values()) <= 1e-5
    assert type(CLIPMoEVisionModel.from_pretrained(out)) is CLIPMoEVisionModel
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers
    umask = os.umask(0)
    os.umask(umask)
    assert (out / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask  # readable by a server
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "upcycle", *args], capture_output=True, text=True)


@pytest.mark.parametrize("case", ["missing", "not_clip", "topk", "zero_experts", "layer", "exists"])
def test_bad_input_gives_one_line_and_writes_nothing(case, base_dir, tmp_path, capsys):
    out = tmp_path / "moe"
    args = ["sparse", "--base", str(base_dir), "--out", str(out)]
    expect = {"missing": "not found", "not_clip": "not a CLIP", "topk": "top_k", "zero_experts": "num_experts",
              "layer": "out of range", "exists": "already exists"}[case]
    if case == "missing":
        args[2] = str(tmp_path / "nowhere")
    elif case == "not_clip":
        other = tmp_path / "bert"
        other.mkdir()
        (other / "config.json").write_text(json.dumps({"model_type": "bert"}))
        args[2] = str(other)
    elif case == "topk":
        args += ["--num-experts", "2", "--top-k", "3"]
    elif case == "zero_experts":
        args += ["--num-experts", "0", "--top-k", "0"]
    elif case == "layer":
        args += ["--moe-layers", "0,9"]
    elif case == "exists":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    assert main(args) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and expect in lines[0], err
    if case == "exists":
        assert [p.name for p in out.iterdir()] == ["keep.txt"]
    else:
        assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_process_exit_code_and_no_traceback(tmp_path):
    result = run_cli("sparse", "--base", str(tmp_path / "nowhere"), "--out", str(tmp_path / "moe"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: CLIP {str(tmp_path / 'nowhere')!r} not found: give a "
                                                  "transformers CLIP directory, a hub id, or "
                                                  "open_clip:MODEL_NAME[:CHECKPOINT]"]


def test_corrupt_weights_are_one_line(base_dir, tmp_path, capsys):
    (base_dir / "model.safetensors").write_bytes(b"not a safetensors file")
    assert main(["sparse", "--base", str(base_dir), "--out", str(tmp_path / "moe")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "weights cannot be loaded" in err and "re-save" in err
    assert not (tmp_path / "moe").exists()


def test_overwrite_replaces_an_existing_directory(base_dir, tmp_path):
    out = tmp_path / "moe"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    assert main(["sparse", "--base", str(base_dir), "--out", str(out), "--overwrite"]) == 0
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").exists()


@pytest.mark.parametrize("args", [["--help"], ["sparse", "--help"], ["demo", "--help"], ["sparse-demo", "--help"]])
def test_every_command_has_help(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 0 and "usage:" in capsys.readouterr().out


def test_demo_runs_and_checks_function_preservation(tmp_path, capsys):
    assert main(["sparse-demo", "--out", str(tmp_path / "demo")]) == 0
    printed = capsys.readouterr().out
    assert "identical to the dense model" in printed and "handwritten digits" in printed
    assert (tmp_path / "demo" / "clip-moe" / "config.json").exists()
