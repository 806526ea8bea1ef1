"""The contrastive trainer: batch plan, loss, parameter selection, checkpoints/resume, divergence, processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import dataset_for, kill_after_steps
from safetensors.torch import load_file
from transformers.models.clip.modeling_clip import image_text_contrastive_loss

from encoder.loading import load_clip
from upcycle.cli import main
from upcycle.recipes.sparse import sparse_upcycle
from upcycle.train import (
    ClusterBatchSampler,
    ContrastiveTrainer,
    TrainConfig,
    TrainingDiverged,
    clip_contrastive_loss,
    latest_checkpoint,
    select_trainable,
)
from upcycle.train import trainer as trainer_module

# -- the batch plan --------------------------------------------------------------------------------------

def cluster_labels(seed=0):
    rng = np.random.default_rng(seed)
    sizes = [40, 17, 16, 33, 64, 21]  # all >= one global batch of 16 (small clusters are merged upstream)
    labels = np.concatenate([np.full(n, 10 * c) for c, n in enumerate(sizes)])
    return rng.permutation(labels)


@pytest.mark.parametrize("replicas", [1, 2, 4])
def test_every_global_batch_is_one_cluster_and_every_pair_appears_once(replicas):
    labels = cluster_labels()
    ranks = [ClusterBatchSampler(labels, 16, replicas, r, seed=3) for r in range(replicas)]
    shares = [list(s) for s in ranks]
    assert len({len(s) for s in shares}) == 1 and len(shares[0]) == ranks[0].batches_per_epoch
    seen = []
    for step in range(len(shares[0])):
        parts = [shares[r][step] for r in range(replicas)]
        assert len({len(p) for p in parts}) == 1  # equal shares: gathered batches line up across ranks
        global_batch = sum(parts, [])
        assert len(set(global_batch)) == len(global_batch)  # disjoint rank shares
        assert len({labels[i] for i in global_batch}) == 1, "a global batch mixes clusters"
        assert 8 <= len(global_batch) <= 16
        seen += global_batch
    dropped = ranks[0].dropped_per_epoch
    assert dropped == sum(n % replicas for n in np.unique(labels, return_counts=True)[1])
    assert len(seen) == len(set(seen)) == len(labels) - dropped


def test_epochs_reshuffle_and_resume_skips_the_batches_done():
    sampler = ClusterBatchSampler(cluster_labels(), 16, seed=0)
    first = list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) != first
    sampler.set_epoch(0, start_batch=5)
    assert list(sampler) == first[5:] and len(sampler) == len(first) - 5


def test_one_label_is_ordinary_shuffled_batching():
    sampler = ClusterBatchSampler(np.zeros(100, dtype=int), 32)
    batches = list(sampler)
    assert [len(b) for b in batches] == [25, 25, 25, 25]
    assert sorted(sum(batches, [])) == list(range(100))


# -- the loss ----------------------------------------------------------------------------------------

def test_single_process_loss_is_clips_loss_and_label_smoothing_changes_it():
    g = torch.Generator().manual_seed(0)
    image = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=-1)
    ours = clip_contrastive_loss(image, text, 20.0)
    assert torch.allclose(ours, image_text_contrastive_loss(20.0 * text @ image.t()), atol=1e-6)
    assert not torch.allclose(clip_contrastive_loss(image, text, 20.0, label_smoothing=0.1), ours)


# -- what trains -------------------------------------------------------------------------------------

def run_steps(model, data, tmp_path, trainable, steps=2, **kw):
    cfg = TrainConfig(trainable=trainable, max_steps=steps, batch_size=16, lr=1e-2, warmup_ratio=0.0,
                      checkpoint_every=kw.pop("checkpoint_every", 100), **kw)
    trainer = ContrastiveTrainer(model, data, data.collate, cfg, tmp_path / f"work-{trainable}")
    return trainer, trainer.train(resume=False)


def changed_keys(before, model):
    return {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}


def test_ffn_only_training_changes_exactly_the_ffns(base_clip_dir, grids_dir, tmp_path):
    loaded = load_clip(base_clip_dir)
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    run_steps(loaded.model, dataset_for(loaded, grids_dir / "train.json"), tmp_path, "ffn", logit_scale=100.0)
    ffn = {k for k in before if ".mlp.fc" in k}
    assert changed_keys(before, loaded.model) == ffn


def test_router_only_training_changes_exactly_the_routers(base_clip_dir, grids_dir, tmp_path):
    loaded = load_clip(base_clip_dir)
    moe = sparse_upcycle(loaded.model, 4, 2, "all", ("vision", "text"), seed=0)
    before = {k: v.clone() for k, v in moe.state_dict().items()}
    trainer, _ = run_steps(moe, dataset_for(loaded, grids_dir / "train.json"), tmp_path, "router",
                           aux_loss_coef=0.01, z_loss_coef=0.001)
    routers = {k for k in before if k.endswith("mlp.router.weight")}
    assert len(routers) == 4 and changed_keys(before, moe) == routers
    metrics = (trainer.work_dir / "metrics.jsonl").read_text().splitlines()
    assert '"load_balance": 0.0' not in metrics[0]  # the auxiliary losses reach the trainer


def test_the_loss_weights_left_open_are_the_models_own(base_clip_dir, grids_dir, tmp_path):
    """One source for the auxiliary-loss weights: a TrainConfig that leaves them out trains with the CLIP-MoE
    config's (recorded as numbers, so a resume compares them); a given weight wins; a dense CLIP has no router."""
    loaded = load_clip(base_clip_dir)
    data = dataset_for(loaded, grids_dir / "train.json")
    moe = sparse_upcycle(loaded.model, 2, 1, "all", ("vision", "text"), seed=0, aux_loss_coef=0.02,
                         router_z_loss_coef=0.003)
    cfg = TrainConfig(trainable="router", max_steps=1, batch_size=16)
    assert (cfg.aux_loss_coef, cfg.z_loss_coef) == (None, None)
    trainer = ContrastiveTrainer(moe, data, data.collate, cfg, tmp_path / "moe")
    assert (trainer.config.aux_loss_coef, trainer.config.z_loss_coef) == (0.02, 0.003)
    trainer.train(resume=False)
    state = json.loads((latest_checkpoint(tmp_path / "moe") / "state.json").read_text())
    assert (state["config"]["aux_loss_coef"], state["config"]["z_loss_coef"]) == (0.02, 0.003)
    given = ContrastiveTrainer(moe, data, data.collate, TrainConfig(trainable="router", z_loss_coef=0.0,
                                                                    batch_size=16), tmp_path / "given")
    assert (given.config.aux_loss_coef, given.config.z_loss_coef) == (0.02, 0.0)
    dense = ContrastiveTrainer(loaded.model, data, data.collate, TrainConfig(batch_size=16), tmp_path / "dense")
    assert (dense.config.aux_loss_coef, dense.config.z_loss_coef) == (0.0, 0.0)


def test_all_with_learnable_scale_trains_the_logit_scale_and_fixed_scale_does_not(base_clip_dir, grids_dir,
                                                                                   tmp_path):
    loaded = load_clip(base_clip_dir)
    data = dataset_for(loaded, grids_dir / "train.json")
    scale = loaded.model.logit_scale.detach().clone()
    run_steps(loaded.model, data, tmp_path / "a", "all", steps=1)
    assert not torch.equal(loaded.model.logit_scale, scale)
    loaded = load_clip(base_clip_dir)
    run_steps(loaded.model, data, tmp_path / "b", "all", steps=1, logit_scale=50.0)
    assert torch.equal(loaded.model.logit_scale, scale)


def test_router_selection_on_a_dense_clip_is_a_user_error(base_clip_dir):
    with pytest.raises(Exception, match="no routers"):
        select_trainable(load_clip(base_clip_dir).model, "router")


# -- checkpoints, resume, divergence -----------------------------------------------------------------

def test_interrupted_run_resumes_to_the_same_weights(base_clip_dir, grids_dir, tmp_path, monkeypatch):
    loaded = load_clip(base_clip_dir)
    data = dataset_for(loaded, grids_dir / "train.json")
    cfg = TrainConfig(trainable="all", max_steps=5, batch_size=16, lr=1e-3, checkpoint_every=2)
    straight = ContrastiveTrainer(load_clip(base_clip_dir).model, data, data.collate, cfg, tmp_path / "a").train()

    real_step = kill_after_steps(monkeypatch, ContrastiveTrainer, 3)  # killed in step 4
    with pytest.raises(KeyboardInterrupt):
        ContrastiveTrainer(load_clip(base_clip_dir).model, data, data.collate, cfg, tmp_path / "b").train()
    assert latest_checkpoint(tmp_path / "b").name == "step-2"
    monkeypatch.setattr(ContrastiveTrainer, "_optimizer_step", real_step)
    resumed = ContrastiveTrainer(load_clip(base_clip_dir).model, data, data.collate, cfg, tmp_path / "b")
    model = resumed.train(resume=True)
    assert resumed.pairs_seen == 5 * 16
    for key, value in straight.state_dict().items():
        assert torch.allclose(model.state_dict()[key], value, atol=1e-6), key
    assert [p.name for p in (tmp_path / "b").glob("step-*")] == ["step-5"]  # older checkpoints pruned


def test_nan_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(base_clip_dir, grids_dir, tmp_path,
                                                                         monkeypatch):
    loaded = load_clip(base_clip_dir)
    data = dataset_for(loaded, grids_dir / "train.json")
    calls = []

    def loss_going_nan(*args, **kwargs):
        calls.append(1)
        value = clip_contrastive_loss(*args, **kwargs)
        return value * float("nan") if len(calls) == 3 else value

    monkeypatch.setattr(trainer_module, "clip_contrastive_loss", loss_going_nan)
    cfg = TrainConfig(trainable="all", max_steps=5, batch_size=16, lr=1e-3, checkpoint_every=1)
    trainer = ContrastiveTrainer(loaded.model, data, data.collate, cfg, tmp_path / "w")
    with pytest.raises(TrainingDiverged, match=r"nan at step 3; the last good checkpoint is .*step-2"):
        trainer.train()
    kept = latest_checkpoint(tmp_path / "w")
    assert kept.name == "step-2"
    assert all(torch.isfinite(t).all() for t in load_file(str(kept / "trainable.safetensors")).values())


# -- the command -------------------------------------------------------------------------------------

def test_train_command_writes_a_model_that_differs_from_its_start(base_clip_dir, grids_dir, tmp_path, capsys):
    out = tmp_path / "trained"
    rc = main(["train", "--model", str(base_clip_dir), "--train-data", str(grids_dir / "train.json"), "--out",
               str(out), "--max-steps", "2", "--batch-size", "16", "--lr", "1e-3"])
    assert rc == 0 and "32 pairs seen" in capsys.readouterr().out
    trained, start = load_clip(out), load_clip(base_clip_dir)
    assert trained.tokenizer is not None and not trained.is_moe
    assert not torch.equal(trained.model.text_projection.weight, start.model.text_projection.weight)
    assert (tmp_path / "trained.train-work" / "metrics.jsonl").is_file()
    rc = main(["train", "--model", str(base_clip_dir), "--train-data", str(grids_dir / "train.json"), "--out",
               str(tmp_path / "again"), "--work-dir", str(tmp_path / "trained.train-work")])
    assert rc == 2 and "--resume" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.engines
def test_two_processes_train_like_one_on_the_same_global_batches(base_clip_dir, grids_dir, tmp_path):
    """accelerate launch with 2 CPU processes (gloo): each rank holds half of every global batch, negatives are
    gathered with gradients, so one optimizer step gives the one-process weights."""
    args = ["-m", "upcycle", "train", "--model", str(base_clip_dir), "--train-data", str(grids_dir / "train.json"),
            "--max-steps", "1", "--batch-size", "16", "--lr", "1e-3", "--weight-decay", "0", "--warmup-ratio", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    two = subprocess.run([*launcher, *args, "--out", str(tmp_path / "two")], env=env, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-2000:]
    one = subprocess.run([sys.executable, *args, "--out", str(tmp_path / "one")], env=env, capture_output=True,
                         text=True)
    assert one.returncode == 0, one.stderr[-2000:]
    assert "16 pairs seen" in two.stdout and "16 pairs seen" in one.stdout
    a, b = load_file(str(tmp_path / "one" / "model.safetensors")), load_file(str(tmp_path / "two" / "model.safetensors"))
    base = load_file(str(base_clip_dir / "model.safetensors"))
    # Attention key biases get an exactly-zero gradient (softmax is shift invariant), which Adam turns into
    # a step driven by rounding noise; every other weight must agree.
    compared = [k for k in a if not k.endswith("k_proj.bias")]
    assert all(torch.allclose(a[k], b[k], atol=2e-6) for k in compared)
    assert any(not torch.equal(a[k], base[k]) for k in compared)


@pytest.mark.slow
@pytest.mark.engines
def test_a_sharded_engine_trains_the_ddp_weights_holding_half_per_rank(base_clip_dir, grids_dir, tmp_path):
    """upcycle train under FSDP2 (parameters, gradients and Adam state sharded over 2 CPU processes) gives the
    one-process (= DDP, test above) weights after two steps, the gathered-negatives loss unchanged, and each rank
    holds half of the model by FSDP2's own count."""
    args = ["-m", "upcycle", "train", "--model", str(base_clip_dir), "--train-data", str(grids_dir / "train.json"),
            "--max-steps", "2", "--batch-size", "16", "--lr", "1e-3", "--weight-decay", "0", "--warmup-ratio", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--use_fsdp", "--fsdp_version", "2",
                "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    two = subprocess.run([*launcher, *args, "--out", str(tmp_path / "two")], env=env, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, *args, "--out", str(tmp_path / "one")], env=env, capture_output=True,
                         text=True)
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = load_file(str(tmp_path / "one" / "model.safetensors")), load_file(str(tmp_path / "two" / "model.safetensors"))
    base = load_file(str(base_clip_dir / "model.safetensors"))
    compared = [k for k in a if not k.endswith("k_proj.bias")]  # see the DDP test
    assert set(a) == set(b) and a["logit_scale"].shape == base["logit_scale"].shape == ()
    assert all(torch.allclose(a[k], b[k], atol=2e-6) for k in compared)
    assert any(not torch.equal(a[k], base[k]) for k in compared)
    state = json.loads((tmp_path / "two.train-work" / "step-2" / "state.json").read_text())
    assert state["engine"] == "fsdp2" and len(state["parameters_held_per_rank"]) == 2
    assert all(0.45 < h / state["parameters_total"] < 0.55 for h in state["parameters_held_per_rank"])
