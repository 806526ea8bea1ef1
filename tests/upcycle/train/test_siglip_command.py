"""`python -m upcycle train` on a SigLIP directory: trained with the sigmoid loss, its logit_bias included, and
written as a SigLIP directory that loads back."""

from __future__ import annotations

import json

import torch

from encoder.family import family_of
from encoder.loading import load_clip
from upcycle.cli import main


def test_upcycle_train_trains_a_siglip_directory_with_its_own_loss(siglip_dir, grids_dir, tmp_path):
    out = tmp_path / "trained"
    code = main(["train", "--model", str(siglip_dir), "--train-data", str(grids_dir / "train.json"),
                 "--out", str(out), "--batch-size", "16", "--max-steps", "3", "--lr", "1e-3"])
    assert code == 0
    trained, base = load_clip(out).model, load_clip(siglip_dir).model
    assert family_of(trained.config).label == "SigLIP"
    assert not torch.equal(trained.logit_bias, base.logit_bias)
    rows = [json.loads(line) for line in (tmp_path / "trained.train-work" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(r["load_balance"] == 0 for r in rows)
    assert json.loads((tmp_path / "trained.train-work" / "step-3" / "state.json").read_text())["config"]["loss"] == \
        "family"
