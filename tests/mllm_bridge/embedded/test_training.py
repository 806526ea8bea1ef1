"""The embedded default of scripts/pretrain_projector.sh and scripts/finetune.sh, shortened, end to end."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import REPO_ROOT

from mllm_bridge.embedded.training import FINETUNE_OUTPUT, PRETRAIN_OUTPUT, ensure_assets
from mllm_bridge.train.cli import main

ROOT = REPO_ROOT


@pytest.mark.slow
@pytest.mark.end_to_end
def test_bare_scripts_build_everything_and_train(tmp_path, capsys):
    # The scripts set up the environment, then hand every argument to this entry point.
    for script, stage in (("pretrain_projector.sh", "pretrain"), ("finetune.sh", "finetune")):
        text = (ROOT / "scripts" / script).read_text()
        assert f'-m mllm_bridge.train {stage} "$@"' in text and "scripts/setup.sh" in text
    ensure_assets(tmp_path, num_train=48, num_test=8)  # what the bare run builds, with less data

    def train(*argv: str) -> str:
        assert main(list(argv)) == 0
        return capsys.readouterr().out

    out = train("pretrain", "--embedded_dir", str(tmp_path), "--max_steps", "3")
    stage1 = tmp_path / PRETRAIN_OUTPUT
    assert f"output: {stage1} (config.json + mm_projector.bin)" in out
    assert f"--pretrain_mm_mlp_adapter {stage1 / 'mm_projector.bin'}" in out
    assert json.loads((stage1 / "config.json").read_text())["mm_vision_tower"] == str(tmp_path / "clip-moe-vision")
    assert len((stage1 / "metrics.jsonl").read_text().splitlines()) == 3

    out = train("finetune", "--embedded_dir", str(tmp_path), "--max_steps", "3")
    stage2 = tmp_path / FINETUNE_OUTPUT
    assert f"output: {stage2} (a LLaVA checkpoint" in out
    args = json.loads((stage2 / "training_args.json").read_text())
    assert args["model"]["pretrain_mm_mlp_adapter"] == str(stage1 / "mm_projector.bin")
    assert args["data"]["data_path"] == str(tmp_path / "digit-grids" / "train_qa.json")
    assert args["model"]["version"] == "v1" and args["data"]["image_aspect_ratio"] == "pad"
    # LLaVA's defaults, not speed workarounds: both stages recompute activations as LLaVA-1.5's scripts do.
    stage1_args = json.loads((stage1 / "training_args.json").read_text())
    assert args["training"]["gradient_checkpointing"] is stage1_args["training"]["gradient_checkpointing"] is True
    assert torch.load(stage1 / "mm_projector.bin", weights_only=True)["model.mm_projector.0.weight"].shape == (128, 64)
