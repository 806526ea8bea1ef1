"""`python -m mllm_bridge check | swap-tower`: mismatches are found, refused swaps leave config.json untouched."""

import json
import os
import subprocess
import sys

import pytest
from conftest import tiny_dense_clip, update_config_json

from encoder.convert.dense import default_image_processor
from mllm_bridge.cli import main
from mllm_bridge.llava import hook as llava_hook


def run(argv) -> int:
    """The exit status of `python -m mllm_bridge ARGV` (argparse errors exit through SystemExit)."""
    try:
        return main(argv)
    except SystemExit as stop:
        return stop.code


@pytest.mark.parametrize(("config", "status", "lines"), [
    ({}, 0, ["CLIPMoEVisionTower (clip-moe-toolkit)", "top-2 of 4 experts in layers [0, 1, 2, 3] of 4",
             "tower 32, mm_hidden_size 32", "layer -2 of 5 hidden states, feature 'patch' -> 16 image tokens",
             "crop 32x32", "mismatches: none"]),
    ({"mm_hidden_size": 1024, "mm_vision_select_layer": -7, "mm_vision_select_feature": "cls"}, 1,
     ["mismatches (3):", "mm_hidden_size is 1024 but the tower's hidden size is 32",
      "mm_vision_select_layer -7 does not index the tower's 5 hidden states", "mm_vision_select_feature 'cls'"]),
], ids=["fitting", "every-mismatch"])
def test_check_describes_the_checkpoint_and_lists_every_mismatch(config, status, lines, llava_config_dir, clip_moe_dir,
                                                                  capsys):
    update_config_json(llava_config_dir, **config)
    assert main(["check", str(llava_config_dir)]) == status
    out = capsys.readouterr().out
    missing = [line for line in lines if line not in out]
    assert not missing, out


def test_check_flags_a_directory_name_that_llava_loads_as_a_plain_llm(llava_config_dir, tmp_path, capsys):
    plain = tmp_path / "tiny-model"
    llava_config_dir.rename(plain)
    assert main(["check", str(plain)]) == 1
    assert "lacks 'llava'" in capsys.readouterr().out


def test_swap_tower_refuses_a_hidden_size_mismatch_and_writes_nothing(llava_config_dir, tmp_path, capsys):
    wide = tmp_path / "wide-clip"
    tiny_dense_clip(width=64).save_pretrained(wide)
    default_image_processor(32).save_pretrained(wide)
    before = (llava_config_dir / "config.json").read_bytes()
    assert main(["swap-tower", str(llava_config_dir), "--tower", str(wide)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: mm_hidden_size is 32 but the tower's hidden size is 64")
    assert "must be retrained" in err and len(err.splitlines()) == 1
    assert (llava_config_dir / "config.json").read_bytes() == before
    assert sorted(p.name for p in llava_config_dir.iterdir()) == ["config.json"]


def test_swap_tower_writes_a_backup_and_the_new_config(llava_config_dir, dense_clip_dir, clip_moe_dir, capsys):
    before = (llava_config_dir / "config.json").read_bytes()
    assert main(["swap-tower", str(llava_config_dir), "--tower", str(dense_clip_dir), "--select-layer", "-1",
                 "--select-feature", "cls_patch"]) == 0
    assert (llava_config_dir / "config.json.bak").read_bytes() == before
    config = json.loads((llava_config_dir / "config.json").read_text())
    assert config["mm_vision_tower"] == str(dense_clip_dir.resolve())
    assert (config["mm_vision_select_layer"], config["mm_vision_select_feature"]) == (-1, "cls_patch")
    assert {k: v for k, v in config.items() if not k.startswith("mm_vision")} == \
        {k: v for k, v in json.loads(before).items() if not k.startswith("mm_vision")}
    assert "image tokens per image change from 16 to 17" in capsys.readouterr().out

    assert main(["check", str(llava_config_dir)]) == 0
    assert "LLaVA builds:    CLIPVisionTower (LLaVA's own)" in capsys.readouterr().out

    middle = (llava_config_dir / "config.json").read_bytes()
    assert main(["swap-tower", str(llava_config_dir), "--tower", str(clip_moe_dir)]) == 0
    backups = sorted(p for p in llava_config_dir.iterdir() if p.name.startswith("config.json.bak-"))
    assert len(backups) == 1 and backups[0].read_bytes() == middle  # the first backup is kept
    assert (llava_config_dir / "config.json.bak").read_bytes() == before


@pytest.mark.parametrize(
    "args, message",
    [
        (["--select-layer", "5"], "mm_vision_select_layer 5 does not index"),
        (["--select-feature", "cls"], "invalid choice"),
    ],
)
def test_swap_tower_rejects_bad_selections(llava_config_dir, clip_moe_dir, capsys, args, message):
    before = (llava_config_dir / "config.json").read_bytes()
    assert run(["swap-tower", str(llava_config_dir), "--tower", str(clip_moe_dir), *args]) == 2
    assert message in capsys.readouterr().err
    assert (llava_config_dir / "config.json").read_bytes() == before


def test_swap_tower_rejects_what_is_not_a_tower(llava_config_dir, llava_moe_dir, tmp_path, capsys):
    assert main(["swap-tower", str(llava_config_dir), "--tower", str(tmp_path / "missing")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert main(["swap-tower", str(llava_config_dir), "--tower", str(llava_moe_dir)]) == 2
    assert "holds a 'llava_llama' model, not a vision tower" in capsys.readouterr().err
    assert main(["swap-tower", str(tmp_path), "--tower", str(llava_moe_dir)]) == 2
    assert "has no config.json" in capsys.readouterr().err


@pytest.mark.parametrize("command", [[], ["check"], ["swap-tower"]])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    assert "usage: python -m mllm_bridge" in out
    if command == ["check"]:
        assert "Exit status: 0 when the checkpoint and its tower fit, 1 when a mismatch was found" in out


@pytest.mark.end_to_end
def test_check_in_a_shell_with_the_hook_off_reports_the_dense_fallback(llava_config_dir):
    # Through `python -m` in a fresh interpreter: the switch is read from the environment at start-up.
    result = subprocess.run([sys.executable, "-m", "mllm_bridge", "check", str(llava_config_dir)], capture_output=True,
                            text=True, timeout=300, env={**os.environ, llava_hook.ENV_SWITCH: "0"})
    assert result.returncode == 1, result.stderr
    assert "LLaVA builds:    CLIPVisionTower (LLaVA's own)" in result.stdout
    assert "would load it as a dense CLIP without its experts" in result.stdout


def test_eval_lmms_without_a_checkpoint_falls_back_to_the_embedded_default(tmp_path, capsys):
    # The runner knows no demo: the command line hands it the embedded default, whose first check (it brings its own
    # task folder) answers here before anything is built; without the fallback the runner would say "no checkpoint".
    args = ["eval-lmms", "--include-path", str(tmp_path), "--default-dir", str(tmp_path / "default"),
            "--out", str(tmp_path / "out")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err == "error: --include-path needs --checkpoint; the embedded default brings its own task folder\n"
    assert not (tmp_path / "default").exists() and not (tmp_path / "out").exists()
