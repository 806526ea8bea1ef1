"""DMU on a SigLIP base: the MCL stages cluster SigLIP's own pooled embeddings and train its encoder MLPs with the
sigmoid loss (logit scale and bias frozen), router training trains the routers of the assembled SigLIP-MoE with it,
and `upcycle dmu` writes that SigLIP-MoE."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from encoder.convert.dense import DenseCLIP
from encoder.family import family_of
from encoder.loading import load_clip
from upcycle.cli import main
from upcycle.eval.embedding import encode_pairs
from upcycle.recipes.dmu import DMUConfig
from upcycle.recipes.dmu import pipeline as dmu_pipeline
from upcycle.recipes.dmu.clustering import kmeans_labels
from upcycle.train import trainer as trainer_module


@pytest.fixture
def siglip_run(make_tiny_siglip, siglip_tokenizer, siglip_processor, grids_dir, tmp_path, monkeypatch):
    """A DMU run over a tiny SigLIP held in memory (the loader stands in for reading a SigLIP directory), with every
    loss call recorded."""
    base = make_tiny_siglip()
    monkeypatch.setattr(dmu_pipeline, "load_dense_clip",
                        lambda spec: DenseCLIP(base, siglip_processor, siglip_tokenizer, "tiny siglip"))
    calls = []
    for name in ("siglip_sigmoid_loss", "clip_contrastive_loss"):
        real = getattr(trainer_module, name)
        monkeypatch.setattr(trainer_module, name,
                            lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    cfg = DMUConfig(base="tiny siglip", train_data=str(grids_dir / "train.json"), out=str(tmp_path / "out"),
                    num_experts=3, top_k=2, clusters_per_modality=2, batch_size=16, stage_max_steps=2,
                    router_max_steps=2, lr=1e-3, router_lr=1e-2, logit_scale=None, checkpoint_every=2)
    return dmu_pipeline.DMURun(cfg), base, calls


def test_mcl_stages_cluster_siglip_embeddings_and_train_its_mlps_with_the_sigmoid_loss(siglip_run,
                                                                                        siglip_tokenizer,
                                                                                        siglip_processor):
    run, base, calls = siglip_run
    assert run.sigmoid and run.cfg.label_smoothing == 0.1  # DMU's default, which the sigmoid loss does not take
    before = {k: v.clone() for k, v in base.state_dict().items()}
    labels, _ = run.run_stage(1, np.zeros(len(run.pairs), dtype=np.int64), np.zeros(len(run.pairs), dtype=np.int64))
    assert calls and set(calls) == {"siglip_sigmoid_loss"}
    # Stage 1 clusters the base's own SigLIP embeddings: the same k-means on encode_pairs' output gives its labels
    images, texts = encode_pairs(base, run.pairs, siglip_processor, siglip_tokenizer)
    seed = run.cfg.seed * 1000 + 1
    expected = kmeans_labels(texts.numpy(), 2, seed + 500) * 2 + kmeans_labels(images.numpy(), 2, seed)
    assert np.array_equal(labels, expected)
    ffn = load_file(str(run.stage_dir(1) / "ffn.safetensors"))
    assert ffn and all(".encoder.layers." in k and ".mlp." in k for k in ffn)
    assert any(not torch.equal(v, before[k]) for k, v in ffn.items())  # the stage trained its MLPs
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())  # from a copy: the base untouched


def test_upcycle_dmu_on_a_siglip_directory_makes_a_siglip_moe_of_its_stages(siglip_dir, grids_dir, tmp_path,
                                                                          monkeypatch, capsys):
    calls = []
    for name in ("siglip_sigmoid_loss", "clip_contrastive_loss"):
        real = getattr(trainer_module, name)
        monkeypatch.setattr(trainer_module, name,
                            lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    out = tmp_path / "siglip-moe"
    assert main(["dmu", "--base", str(siglip_dir), "--train-data", str(grids_dir / "train.json"), "--out", str(out),
                 "--num-experts", "3", "--top-k", "2", "--clusters-per-modality", "2", "--batch-size", "16",
                 "--stage-max-steps", "2", "--router-max-steps", "2", "--lr", "1e-3", "--router-lr", "1e-2",
                 "--logit-scale", "learnable"]) == 0
    assert calls and set(calls) == {"siglip_sigmoid_loss"}  # both MCL stages and router training
    assert f"SigLIP-MoE written to {out}" in capsys.readouterr().out
    model, base = load_clip(out).model, load_clip(siglip_dir).model
    assert family_of(model.config).label == "SigLIP-MoE"
    state = model.state_dict()
    assert torch.equal(state["logit_bias"], base.logit_bias.detach())  # frozen in the stages and router training
    # expert e of a MoE layer is stage e's MLP (expert 0: the base's)
    stage2 = load_file(str(tmp_path / "siglip-moe.dmu-work" / "stage-2" / "ffn.safetensors"))
    up = state["vision_model.encoder.layers.0.mlp.experts.up_proj"]  # [E, h, d], each expert an fc1.weight
    assert torch.equal(up[2], stage2["vision_model.encoder.layers.0.mlp.fc1.weight"])
    assert torch.equal(up[0], base.vision_model.encoder.layers[0].mlp.fc1.weight.detach())
    assert not torch.equal(up[0], up[2])
