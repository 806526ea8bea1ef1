"""Diversified Multiplet Upcycling: clusters, stages, assembly, the command, resume and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from encoder import CLIPMoEModel
from upcycle.cli import main
from upcycle.recipes.dmu import accumulate_labels, joint_labels, merge_small_clusters
from upcycle.train import ContrastiveTrainer

FFN = {"fc1.weight": "up_proj", "fc1.bias": "up_proj_bias", "fc2.weight": "down_proj", "fc2.bias": "down_proj_bias"}


def test_labels_accumulate_as_published():
    # K = 3: joint = text * 3 + image; after a stage, label = label * 9 + joint.
    image, text = np.array([0, 2, 1, 2]), np.array([1, 0, 2, 2])
    assert joint_labels(image, text, 3).tolist() == [3, 2, 7, 8]
    stage1 = accumulate_labels(np.zeros(4, dtype=int), image, text, 3)
    assert stage1.tolist() == [3, 2, 7, 8]
    stage2 = accumulate_labels(stage1, np.array([1, 1, 0, 0]), np.array([0, 2, 2, 0]), 3)
    assert stage2.tolist() == [3 * 9 + 1, 2 * 9 + 7, 7 * 9 + 6, 8 * 9 + 0]
    # Pairs share a stage-2 label only if they shared every earlier assignment.
    assert len(set(accumulate_labels(stage1, np.zeros(4, dtype=int), np.zeros(4, dtype=int), 3))) == 4


def test_small_clusters_merge_into_the_nearest_and_nothing_is_dropped():
    labels = np.array([0] * 10 + [1] * 3 + [2] * 8 + [3])
    features = np.array([[0.0]] * 10 + [[5.0]] * 3 + [[6.0]] * 8 + [[-1.0]])
    merged, report = merge_small_clusters(labels, features, min_size=8)
    assert merged.tolist() == [0] * 10 + [2] * 11 + [0]  # 3 -> 0 (nearest), 1 -> 2 (nearest)
    assert (report.clusters_found, report.clusters_used, report.merged) == (4, 2, 2)
    assert report.smallest >= 8 and len(merged) == len(labels)
    kept, none = merge_small_clusters(labels, features, min_size=1)
    assert kept.tolist() == labels.tolist() and none.merged == 0


def dmu_args(base, grids, out, *extra):
    return ["dmu", "--base", str(base), "--train-data", str(grids / "train.json"), "--out", str(out),
            "--num-experts", "3", "--top-k", "2", "--clusters-per-modality", "2", "--batch-size", "16",
            "--stage-max-steps", "3", "--router-max-steps", "2", "--lr", "1e-3", "--router-lr", "1e-2",
            "--checkpoint-every", "2", *extra]


@pytest.fixture(scope="module")
def dmu_run(base_clip_dir, grids_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("dmu") / "clip-moe"
    assert main(dmu_args(base_clip_dir, grids_dir, out)) == 0
    return out


def test_assembled_experts_are_the_stage_ffns_and_everything_else_is_the_base(dmu_run, base_clip_dir):
    moe = load_file(str(dmu_run / "model.safetensors"))
    base = load_file(str(base_clip_dir / "model.safetensors"))
    work = dmu_run.with_name("clip-moe.dmu-work")
    stages = [base] + [load_file(str(work / f"stage-{s}" / "ffn.safetensors")) for s in (1, 2)]
    for tower in ("vision_model", "text_model"):
        for layer in range(2):
            prefix = f"{tower}.encoder.layers.{layer}.mlp."
            for dense, stacked in FFN.items():
                experts = moe[prefix + "experts." + stacked]
                for e, source in enumerate(stages):
                    assert torch.equal(experts[e], source[prefix + dense]), (prefix, stacked, e)
                assert not torch.equal(experts[1], experts[2])  # stages learned different FFNs
    rest = {k for k in moe if ".experts." not in k and not k.endswith("router.weight")}
    assert rest == {k for k in base if ".mlp.fc" not in k}
    assert all(torch.equal(moe[k], base[k]) for k in rest)
    assert all(set(s) == {k for k in base if ".mlp.fc" in k} for s in stages[1:])  # stages hold FFNs only


def test_dmu_output_is_a_documented_clip_moe(dmu_run):
    model = CLIPMoEModel.from_pretrained(dmu_run)
    assert model.config.vision_config.num_experts == 3 and model.config.text_config.top_k == 2
    recipe = json.loads((dmu_run / "clip_moe_recipe.json").read_text())
    stages = recipe["details"]["stages"]
    assert set(stages) == {"1", "2"} and all(s["status"] == "done" for s in stages.values())
    for stats in (s["clusters"] for s in stages.values()):
        assert stats["pairs"] == 96 and stats["pairs_used_per_epoch"] == 96
        assert 1 <= stats["clusters_used"] <= stats["clusters_found"] and stats["smallest"] >= 16
        assert stats["steps"] == 3 and 3 * 8 <= stats["pairs_seen"] <= 3 * 16
    assert stages["1"]["clusters"]["clusters_found"] <= 4  # 2 x 2 joint clusters after one stage
    card = (dmu_run / "README.md").read_text()
    assert "Diversified Multiplet Upcycling" in card and "stage 2 final loss" in card
    labels = np.load(dmu_run.with_name("clip-moe.dmu-work") / "stage-2" / "labels.npy")
    assert labels.max() < 16  # two stages of 2 x 2 clusters: labels in 0..15


def test_eval_reads_the_dmu_output(dmu_run, grids_dir, capsys):
    assert main(["eval", "--model", str(dmu_run), "--data", str(grids_dir / "test.json")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {"i2t_r1", "i2t_r5", "t2i_r10"} <= set(result) and 0 <= result["t2i_r10"] <= 100


def test_interrupted_dmu_resumes_without_retraining_finished_stages(base_clip_dir, grids_dir, tmp_path,
                                                                   monkeypatch, capsys):
    out = tmp_path / "moe"
    real_step = ContrastiveTrainer._optimizer_step
    trained, killed = [], []

    def step(self, batches):
        if self.config.desc == "MCL stage 2" and self.step == 2 and not killed:
            killed.append(True)
            raise KeyboardInterrupt  # killed mid-stage, after the checkpoint at step 2
        trained.append((self.config.desc, self.step + 1))
        return real_step(self, batches)

    monkeypatch.setattr(ContrastiveTrainer, "_optimizer_step", step)
    with pytest.raises(KeyboardInterrupt):
        main(dmu_args(base_clip_dir, grids_dir, out))
    stage1 = out.with_name("moe.dmu-work") / "stage-1" / "ffn.safetensors"
    written = stage1.stat().st_mtime_ns
    assert not out.exists()

    trained.clear()
    assert main(dmu_args(base_clip_dir, grids_dir, out)) == 2
    assert "--resume" in capsys.readouterr().err  # an earlier run is never silently mixed in
    assert main(dmu_args(base_clip_dir, grids_dir, out, "--resume", "--lr", "5e-4", "--seed", "3")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "lr: " in err and "-> 0.0005" in err and "seed: 0 -> 3" in err, err
    assert main(dmu_args(base_clip_dir, grids_dir, out, "--resume")) == 0
    assert trained == [("MCL stage 2", 3), ("router training", 1), ("router training", 2)]
    assert stage1.stat().st_mtime_ns == written
    assert CLIPMoEModel.from_pretrained(out).config.vision_config.num_experts == 3


def write_json(path, records):
    path.write_text(json.dumps(records))
    return path


@pytest.mark.parametrize("case", ["missing_images", "empty_caption", "too_few_pairs", "unknown_format",
                                  "one_expert"])
def test_bad_input_is_one_line_and_writes_nothing(case, base_clip_dir, grids_dir, tmp_path, capsys):
    records = json.loads((grids_dir / "train.json").read_text())
    for r in records:
        r["image"] = str(grids_dir / r["image"])
    extra = []
    data = tmp_path / "data.json"
    if case == "missing_images":
        records[5]["image"] = "/nowhere/a.png"
        records[9]["image"] = "/nowhere/b.png"
        expect = "2 of 96 images not found, e.g. /nowhere/a.png, /nowhere/b.png"
    elif case == "empty_caption":
        records[3]["conversations"][1]["value"] = "  "
        expect = "empty caption"
    elif case == "too_few_pairs":
        records = records[:10]
        expect = "10 training pairs but the global batch is 16"
    elif case == "unknown_format":
        data = tmp_path / "data.parquet"
        expect = "supported: .json, .jsonl, .csv, .tsv"
    else:
        extra = ["--num-experts", "1", "--top-k", "1"]
        expect = "at least 2 experts"
    write_json(data, records)
    args = dmu_args(base_clip_dir, grids_dir, tmp_path / "out", *extra)
    args[args.index("--train-data") + 1] = str(data)
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert expect in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.dmu-work").exists()


def test_skip_missing_drops_and_counts(base_clip_dir, grids_dir, tmp_path, caplog):
    records = json.loads((grids_dir / "train.json").read_text())
    for r in records:
        r["image"] = str(grids_dir / r["image"])
    records[0]["image"] = "/nowhere/a.png"
    data = write_json(tmp_path / "data.json", records)
    args = dmu_args(base_clip_dir, grids_dir, tmp_path / "out", "--skip-missing", "--num-experts", "2")
    args[args.index("--train-data") + 1] = str(data)
    assert main(args) == 0
    assert "dropped 1 of 96 pairs" in caplog.text
    recipe = json.loads((tmp_path / "out" / "clip_moe_recipe.json").read_text())
    assert recipe["details"]["train_pairs"] == 95


@pytest.mark.slow
@pytest.mark.engines
def test_two_processes_plan_the_same_clusters_and_finish(dmu_run, base_clip_dir, grids_dir, tmp_path):
    """DMU under `accelerate launch --multi_gpu --num_processes 2` on CPU (gloo): the processes share the
    encoding, agree on one cluster plan (the one-process run's) and split every global batch between them."""
    import os
    import subprocess
    import sys

    out = tmp_path / "clip-moe"
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "upcycle"]
    run = subprocess.run([*launcher, *dmu_args(base_clip_dir, grids_dir, out)], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    one = np.load(dmu_run.with_name("clip-moe.dmu-work") / "stage-1" / "labels.npy")
    two = np.load(out.with_name("clip-moe.dmu-work") / "stage-1" / "labels.npy")
    assert np.array_equal(one, two)
    stats = json.loads((out / "clip_moe_recipe.json").read_text())["details"]["stages"]["1"]["clusters"]
    sizes = np.unique(np.load(out.with_name("clip-moe.dmu-work") / "stage-1" / "batch_labels.npy"),
                      return_counts=True)[1]
    assert stats["pairs_used_per_epoch"] == 96 - int((sizes % 2).sum())  # only odd remainders are left out
    assert CLIPMoEModel.from_pretrained(out).config.vision_config.num_experts == 3


def test_a_diverged_router_training_names_the_router_lr(base_clip_dir, grids_dir, tmp_path, monkeypatch, capsys):
    # Router training learns at --router-lr: advice to lower --lr would only change the MCL stages.
    import upcycle.train.trainer as trainer_module

    real_loss = trainer_module.clip_contrastive_loss
    seen = {}

    def nan_in_router_training(*args, **kwargs):  # at router step 2: after an update, so the rate is suspect
        value = real_loss(*args, **kwargs)
        trainer = seen.get("trainer")
        if trainer is not None and trainer.config.desc == "router training":
            seen["router_calls"] = seen.get("router_calls", 0) + 1
            return value * float("nan") if seen["router_calls"] == 2 else value
        return value

    real_init = ContrastiveTrainer.__init__

    def remember(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        seen["trainer"] = self

    monkeypatch.setattr(trainer_module, "clip_contrastive_loss", nan_in_router_training)
    monkeypatch.setattr(ContrastiveTrainer, "__init__", remember)
    assert main(dmu_args(base_clip_dir, grids_dir, tmp_path / "moe")) != 0
    err = capsys.readouterr().err
    assert "lower --router-lr" in err and "lower --lr" not in err, err
    assert not (tmp_path / "moe").exists()
