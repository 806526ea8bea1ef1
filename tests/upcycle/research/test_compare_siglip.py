"""`upcycle compare` arms over a SigLIP base train with its family's loss, the pairwise sigmoid loss."""

from __future__ import annotations

import pytest
import torch

from encoder.family import family_of
from encoder.loading import load_clip
from upcycle.research.compare import ArmSettings
from upcycle.research.compare.arms import train_arm
from upcycle.train import trainer as trainer_module


@pytest.mark.parametrize(("arm", "label"), [("dense", "SigLIP"), ("sparse-all", "SigLIP-MoE")])
def test_siglip_arms_train_with_the_sigmoid_loss(arm, label, siglip_dir, grids_dir, tmp_path, monkeypatch):
    calls = []
    for name in ("siglip_sigmoid_loss", "clip_contrastive_loss"):
        real = getattr(trainer_module, name)
        monkeypatch.setattr(trainer_module, name,
                            lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    settings = ArmSettings(num_experts=2, top_k=1, batch_size=32, dense_lr=1e-3, sparse_lr=1e-3)
    result = train_arm(arm, 0, siglip_dir, grids_dir / "train.json", tmp_path / arm, settings)
    assert calls and set(calls) == {"siglip_sigmoid_loss"}
    trained = load_clip(result["model"]).model
    assert family_of(trained.config).label == label
    base = load_clip(siglip_dir).model
    assert not torch.equal(trained.logit_bias, base.logit_bias)  # trainable "all": the bias trains too
