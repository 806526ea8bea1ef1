"""`python -m upcycle`: `sparse` / `sparse-demo` (the written directory, the summary, bad input) and the parsers
generated from the command configs."""

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


@pytest.mark.end_to_end
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


COMMANDS = ["sparse", "demo", "sparse-demo", "make-digit-grids", "init-base", "train", "dmu", "compare", "replicate",
            "eval", "routing"]


@pytest.mark.parametrize("args", [["--help"], *[[name, "--help"] for name in COMMANDS]])
def test_every_command_has_help(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 0 and "usage:" in capsys.readouterr().out


def subcommand_parsers():
    import argparse

    from upcycle.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices


def test_the_parsers_cover_every_command_and_show_defaults():
    parsers = subcommand_parsers()
    assert sorted(parsers) == sorted(COMMANDS)
    helps = {a.option_strings[0]: a.help for a in parsers["dmu"]._actions if a.option_strings}
    assert helps["--router-lr"] == "router learning rate (default 1e-6)"
    assert helps["--label-smoothing"] == ("InfoNCE label smoothing of a CLIP base's stages and router training (a "
                                         "SigLIP base trains with its sigmoid loss, which has none) (default 0.1)")
    train = {a.option_strings[0]: a for a in parsers["train"]._actions if a.option_strings}
    assert train["--loss"].choices == ("family", "clip", "sigmoid") and train["--loss"].help.endswith("(default family)")
    assert helps["--towers"].endswith("(default vision,text)")


def test_batch_size_means_the_global_training_batch_wherever_it_is_a_flag():
    """eval and routing batch pairs only for speed: that is --forward-batch-size, not a second --batch-size."""
    meanings = {}
    for name, parser in subcommand_parsers().items():
        for action in parser._actions:
            if "--batch-size" in action.option_strings and action.help != "==SUPPRESS==":
                meanings.setdefault(action.help, []).append(name)
    assert list(meanings.values()) == [["train", "dmu", "compare"]], meanings
    assert "global batch" in next(iter(meanings))


@pytest.mark.parametrize("command", ["eval", "routing"])
def test_the_old_eval_batch_flag_is_refused_with_the_one_to_use(command, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--model", str(tmp_path / "m"), "--data", str(tmp_path / "d.json"), "--batch-size", "8"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1
    assert err[0].startswith("error: --batch-size is the training batch") and "use --forward-batch-size 8" in err[0]


def test_a_refused_value_from_a_generated_parser_is_one_line_naming_the_flag(tmp_path, capsys):
    assert main(["compare", "--base", str(tmp_path), "--data", str(tmp_path), "--out", str(tmp_path / "o"),
                 "--batch-size", "0"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == ["error: --batch-size must be >= 1, got 0"]
    assert not (tmp_path / "o").exists()


def test_demo_runs_and_checks_function_preservation(tmp_path, capsys):
    assert main(["sparse-demo", "--out", str(tmp_path / "demo")]) == 0
    printed = capsys.readouterr().out
    assert "identical to the dense model" in printed and "handwritten digits" in printed
    assert (tmp_path / "demo" / "clip-moe" / "config.json").exists()


def test_every_command_config_is_frozen_so_it_is_checked_once_when_made():
    # A config is checked when made (its __post_init__); were it mutable, a field set afterwards would reach the run
    # unchecked. Frozen, a change is a `dataclasses.replace`, i.e. a new config, checked again.
    import dataclasses

    from encoder.utils.options import GROUP
    from upcycle.cli import commands

    def configs(cls):
        yield cls
        for f in dataclasses.fields(cls):
            if GROUP in f.metadata:  # a nested config (options_of): its class is the group's first item
                yield from configs(f.metadata[GROUP][0])

    classes = {c for command in commands() for c in configs(command.config)}
    assert len(classes) > len(commands())  # the nested ones (TrainConfig, DMUConfig, ...) are reached too
    mutable = sorted(c.__name__ for c in classes if not c.__dataclass_params__.frozen)
    assert mutable == []
