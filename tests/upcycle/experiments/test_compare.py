"""`upcycle compare`: equal budgets from identical base weights, filled tables, and re-runs that resume."""

from __future__ import annotations

import json

import pytest

from upcycle.cli import main
from upcycle.experiments.compare import ArmSettings, check_fairness
from upcycle.train import ContrastiveTrainer


def compare_args(base, grids, out):
    return ["compare", "--base", str(base), "--data", str(grids), "--out", str(out),
            "--arms", "base,dense,sparse-all,dmu",
            "--seeds", "0", "--num-experts", "2", "--top-k", "1", "--batch-size", "16"]


@pytest.mark.slow
def test_compare_trains_equal_budgets_and_a_rerun_recomputes_nothing(base_clip_dir, grids_dir, tmp_path, capsys,
                                                                      monkeypatch):
    out = tmp_path / "cmp"
    assert main(compare_args(base_clip_dir, grids_dir, out)) == 0
    summary = json.loads((out / "compare.json").read_text())
    assert summary["budget_pairs"] == 2 * 96  # (E-1) x 1 stage epoch + 1 router epoch, of 96 pairs
    seen = {arm: runs[0]["pairs_seen"] for arm, runs in summary["results"].items()}
    assert seen == {"base": 0, "dense": 192, "sparse-all": 192, "dmu": 192}
    assert len({runs[0]["base_sha256"] for runs in summary["results"].values()}) == 1
    report = (out / "compare.md").read_text()
    for arm in ("base", "dense", "sparse-all", "dmu"):
        row = next(line for line in report.splitlines() if line.startswith(f"| {arm} |"))
        cells = [c.strip() for c in row.strip("|").split("|")][1:6]
        assert all(float(c.split(" ")[0]) >= 0 for c in cells), row  # every metric cell is a number
    assert (out / "training_loss.png").stat().st_size > 1000
    moe = summary["results"]["sparse-all"][0]
    assert moe["vision_params_total"] > moe["vision_params_active"]  # top-1 of 2 experts
    capsys.readouterr()

    def no_training(*args, **kwargs):
        raise AssertionError("a finished arm was trained again")

    monkeypatch.setattr(ContrastiveTrainer, "_optimizer_step", no_training)
    assert main(compare_args(base_clip_dir, grids_dir, out)) == 0
    assert json.loads((out / "compare.json").read_text())["results"] == summary["results"]
    capsys.readouterr()

    # Other settings never reuse an arm trained with the old ones: one line naming what differs, nothing rewritten.
    before = (out / "compare.json").read_bytes()
    assert main([*compare_args(base_clip_dir, grids_dir, out), "--dense-lr", "0.1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "dense_lr: 0.0001 -> 0.1" in err[0] and "arms/dense/seed-0" in err[0], err
    assert (out / "compare.json").read_bytes() == before


def test_fairness_check_refuses_unequal_budgets_and_different_bases():
    settings = ArmSettings(num_experts=4, stage_epochs=1, router_epochs=1)
    ok = {"base": [{"seed": 0, "pairs_seen": 0, "base_sha256": "a"}],
          "dense": [{"seed": 0, "pairs_seen": 400, "base_sha256": "a"}]}
    assert check_fairness(ok, settings, num_train=100) == 400
    with pytest.raises(AssertionError, match="unequal budget: dense seed 0 saw 300"):
        check_fairness({**ok, "dense": [{"seed": 0, "pairs_seen": 300, "base_sha256": "a"}]}, settings, 100)
    with pytest.raises(AssertionError, match="different base weights"):
        check_fairness({**ok, "dense": [{"seed": 0, "pairs_seen": 400, "base_sha256": "b"}]}, settings, 100)


def test_unknown_arm_is_one_line(base_clip_dir, grids_dir, tmp_path, capsys):
    args = compare_args(base_clip_dir, grids_dir, tmp_path / "cmp")
    args[args.index("--arms") + 1] = "dense,moe"
    assert main(args) == 2
    assert "unknown ['moe']" in capsys.readouterr().err
