"""Fault tier, non-finite numbers: a model with one NaN weight must never score (NaN compares False, so a
rank counted as `scores >= best` would make it perfect). Every metric refuses with one line, nothing written."""

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from encoder.utils.errors import NonFiniteValues
from upcycle.eval.retrieval import retrieval_metrics
from upcycle.eval.zero_shot import topk_accuracy
from upcycle.experiments.digit_accuracy import position_accuracy
from encoder.routing_stats import RoutingTally


def unit(n, d=8, seed=0):
    return torch.nn.functional.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_every_metric_refuses_non_finite_embeddings(bad):
    images, texts = unit(6), unit(6, seed=1)
    poisoned = images.clone()
    poisoned[2, 3] = bad
    captions = [f"c{i}" for i in range(6)]
    with pytest.raises(NonFiniteValues, match=r"image embeddings: 1 of 6 rows are NaN or infinite"):
        retrieval_metrics(poisoned, texts, captions)
    with pytest.raises(NonFiniteValues, match="text embeddings"):
        retrieval_metrics(images, poisoned, captions)
    with pytest.raises(NonFiniteValues, match="class"):
        topk_accuracy(images, poisoned[:3], [0, 1, 2, 0, 1, 2])
    with pytest.raises(NonFiniteValues, match="image embeddings"):
        position_accuracy(poisoned, torch.zeros(6, 1, dtype=torch.long), unit(10).view(1, 10, 8))


def test_finite_embeddings_still_score_and_identical_ones_score_nothing():
    images = unit(6)
    assert retrieval_metrics(images, images.clone(), [f"c{i}" for i in range(6)])["i2t_r1"] == 100.0
    collapsed = torch.ones(6, 8) / 8 ** 0.5
    assert retrieval_metrics(collapsed, collapsed, [f"c{i}" for i in range(6)])["i2t_r1"] == 0.0


def test_routing_tally_refuses_nan_router_logits():
    tally = RoutingTally([0, 1], num_experts=4, top_k=2)
    logits = torch.randn(5, 4)
    logits[1, 0] = float("nan")
    with pytest.raises(NonFiniteValues, match="router logits of MoE layer 1"):
        tally.add([torch.randn(5, 4), logits])


def poison_one_expert_weight(model_dir):
    weights = load_file(model_dir / "model.safetensors")
    name = next(k for k in weights if "experts.up_proj" in k and k.startswith("vision"))
    weights[name][0, 0, 0] = float("nan")
    save_file(weights, model_dir / "model.safetensors", metadata={"format": "pt"})
    return name


@pytest.fixture(scope="module")
def nan_moe_dir(tmp_path_factory, base_clip_dir):
    from upcycle.cli import main as upcycle_main

    model = tmp_path_factory.mktemp("faults") / "nan-moe"
    assert upcycle_main(["sparse", "--base", str(base_clip_dir), "--out", str(model), "--num-experts", "2",
                         "--top-k", "1"]) == 0
    poison_one_expert_weight(model)
    return model


@pytest.mark.parametrize("command", ["eval", "routing"])
def test_eval_and_routing_on_a_model_with_one_nan_expert_weight_exit_non_zero_with_one_line(
        command, tmp_path, nan_moe_dir, grids_dir):
    model = nan_moe_dir
    out = tmp_path / "metrics.json"
    extra = ["--out", str(out)] if command == "eval" else ["--out-png", str(tmp_path / "r.png"), "--out-json",
                                                           str(out)]
    result = subprocess.run([sys.executable, "-m", "upcycle", command, "--model", str(model), "--data",
                             str(grids_dir / "test.json"), *extra], capture_output=True, text=True, timeout=600)
    assert result.returncode != 0, result.stdout
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "NaN or infinite" in lines[0], result.stderr[-1500:]
    assert not out.exists() and not (tmp_path / "r.png").exists()


def test_upcycling_a_base_with_a_nan_weight_is_refused_and_writes_nothing(tmp_path, capsys):
    from conftest import save_tiny_dense_clip

    from upcycle.cli import main as upcycle_main

    base = tmp_path / "nan-base"
    save_tiny_dense_clip(base)
    weights = load_file(base / "model.safetensors")
    name = next(k for k in weights if "mlp.fc1.weight" in k)
    weights[name][0, 0] = float("nan")
    save_file(weights, base / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "moe"
    assert upcycle_main(["sparse", "--base", str(base), "--out", str(out), "--num-experts", "2", "--top-k", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "computes NaN or inf" in err[0], err
    assert not out.exists() and not list(tmp_path.glob(".moe.*"))
