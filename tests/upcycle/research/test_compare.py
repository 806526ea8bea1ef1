"""`upcycle compare`: equal budgets from identical base weights, filled tables, and re-runs that resume."""

from __future__ import annotations

import json

import numpy as np
import pytest

from upcycle.cli import main
from upcycle.research.compare import ArmSettings, check_fairness
from upcycle.research.compare.report import intervals_section
from upcycle.research.intervals import pack_hits
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
    n_images, n_texts = (len(json.loads((grids_dir / "test.json").read_text())),
                         len(summary["results"]["base"][0]["hits"]["t2i_r1"]))
    for runs in summary["results"].values():  # per-query hits, one character per test query
        hits = runs[0]["hits"]
        assert {len(hits[f"i2t_r{k}"]) for k in (1, 5, 10)} == {n_images}
        assert {len(hits[f"t2i_r{k}"]) for k in (1, 5, 10)} == {n_texts}
        assert runs[0]["i2t_r1"] == pytest.approx(100 * hits["i2t_r1"].count("1") / n_images)
    ci_rows = {line.split(" | ")[0][2:]: line for line in report.splitlines()
               if "[" in line and line.startswith("| ") and not line.startswith(("| arm |", "| seed |", "| 0 |"))}
    assert set(ci_rows) == {"base", "dense", "sparse-all", "dmu"} and "reference" in ci_rows["dense"]
    # DMU's MoE against its experts alone and their FFN average, the best expert chosen on val.json
    experts = summary["dmu_experts"]["0"]
    assert experts["best_expert"]["chosen_on"] == "val" and set(experts["models"]) == {
        "moe", "expert-0", "expert-1", "ffn-average"}
    assert (out / "arms" / "dmu" / "seed-0" / "experts.json").is_file()
    row = next(line for line in report.splitlines() if line.startswith("| 0 |"))
    assert f"{experts['best_expert']['name']} (val)" in row and row.count("[") == 4  # four paired intervals
    stages = [line for line in report.splitlines() if line.startswith("| 0 |") and "→" in line]
    assert "DMU's stages (diagnostics" in report and len(stages) == 1  # one MCL stage with 2 experts
    moe = summary["results"]["sparse-all"][0]
    assert moe["vision_params_total"] > moe["vision_params_active"]  # top-1 of 2 experts
    capsys.readouterr()

    def no_training(*args, **kwargs):
        raise AssertionError("a finished arm was trained again")

    monkeypatch.setattr(ContrastiveTrainer, "_optimizer_step", no_training)
    # an arm finished before per-query hits were recorded gets them by evaluation alone
    dense_result = out / "arms" / "dense" / "seed-0" / "result.json"
    dense_result.write_text(json.dumps({k: v for k, v in json.loads(dense_result.read_text()).items() if k != "hits"}))
    assert main(compare_args(base_clip_dir, grids_dir, out)) == 0
    assert json.loads((out / "compare.json").read_text())["results"] == summary["results"]
    assert "hits" in json.loads(dense_result.read_text())
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


def hit_runs(hits_per_seed: list[np.ndarray], seeds: list[int]) -> list[dict]:
    """Result records carrying only what the interval table reads."""
    return [{"seed": seed, "hits": {"i2t_r1": pack_hits(h), "t2i_r1": pack_hits(h[:150])}}
            for seed, h in zip(seeds, hits_per_seed)]


def test_interval_table_pairs_against_dense_and_calls_nothing_a_win_inside_the_noise():
    rng = np.random.default_rng(0)
    dense = [(rng.random(400) < 0.5).astype(np.uint8) for _ in range(2)]
    better = []
    for h in dense:  # 40 more hits per seed, on the first 40 items dense missed
        b = h.copy()
        b[np.flatnonzero(h == 0)[:40]] = 1
        better.append(b)
    noisy = []
    for h in dense:  # 15 more hits and 13 fewer per seed: inside the noise, on enough differing items to call
        b = h.copy()
        b[np.flatnonzero(h == 0)[-15:]] = 1
        b[np.flatnonzero(h == 1)[:13]] = 0
        noisy.append(b)
    base = np.zeros(400, dtype=np.uint8)
    base[:20] = 1
    results = {"base": hit_runs([base], [0]), "dense": hit_runs(dense, [0, 1]),
               "sparse-all": hit_runs([h.copy() for h in dense], [0, 1]), "dmu": hit_runs(better, [0, 1]),
               "sparse-even": hit_runs(noisy, [0, 1])}
    section = intervals_section(results)
    assert "measured against `dense`" in section and "400 test images" in section and "150 distinct" in section
    rows = {line.split(" | ")[0][2:]: [c.strip() for c in line.strip("| ").split("|")]
            for line in section.splitlines() if line.startswith("| ") and not line.startswith("| arm |")}
    assert rows["dense"][2] == rows["dense"][4] == "reference"
    assert rows["dense"][1].split(" ")[0] == f"{100 * np.mean(dense):.1f}"  # pooled over both seeds
    assert rows["sparse-all"][2] == "+0.0 [+0.0, +0.0] n too small to call (0 of 400 differ, 10 needed)"  # = dense
    assert rows["dmu"][2].startswith("+10.0 [") and rows["dmu"][2].endswith("higher")
    assert rows["sparse-even"][2].startswith("+0.5 [-") and rows["sparse-even"][2].endswith("CI includes 0")
    assert rows["base"][2].endswith("lower")  # one untrained run, paired with every dense seed
    assert not any(word in section for word in ("better", "win"))

    with pytest.raises(ValueError, match="seeds \\[0, 2\\] and the reference \\[0, 1\\]"):
        intervals_section({**results, "dmu": hit_runs(better, [0, 2])})
    alone = intervals_section({"base": results["base"], "dmu": results["dmu"]})
    assert "No paired differences" in alone and "reference" not in alone


def metrics_scoring(score: float) -> dict:
    """What `metrics_on_split` returns, every metric at `score` percent (hits of 100 queries to match)."""
    hits = "1" * int(score) + "0" * (100 - int(score))
    return {"i2t_r1": score, "t2i_r1": score, "i2t_r5": score, "t2i_r5": score, "digits_mean": score,
            "digits": {"top left": score}, "hits": {"i2t_r1": hits, "t2i_r1": hits},
            "vision_params_total": 1, "vision_params_active": 1}


def fake_compare(monkeypatch, run_module, train, metrics):
    """`compare` with training and evaluation replaced, and no timing or plotting inputs."""
    monkeypatch.setattr(run_module, "train_arm", train)
    monkeypatch.setattr(run_module, "metrics_on_split", metrics)
    monkeypatch.setattr(run_module, "forward_ms_per_image", lambda *a, **k: {})
    monkeypatch.setattr(run_module, "loss_curve", lambda *a, **k: [])


def test_the_learning_rate_sweep_chooses_on_validation_and_never_reads_test(base_clip_dir, grids_dir, tmp_path,
                                                                            monkeypatch):
    """Validation and test disagree on purpose: validation prefers x3, test would prefer x10. Every arm trains at
    x3 for all seeds, only x3 runs are ever evaluated on test, and the better dense arm on validation becomes the
    reference of the paired differences."""
    from upcycle.research.compare import run as run_module

    val_score = {"1": 10.0, "3": 30.0, "10": 20.0}
    test_score = {"1": 90.0, "3": 5.0, "10": 95.0}
    evaluated = []

    def fake_train(arm, seed, base_dir, train_data, folder, settings):
        folder.mkdir(parents=True, exist_ok=True)
        if arm == "base":
            return {"model": str(base_dir), "pairs_seen": 0, "optimizer_steps": 0}
        return {"model": str(folder), "pairs_seen": settings.budget_epochs * 96, "optimizer_steps": 12}

    def fake_metrics(model_dir, data):
        factor = next((p[len("lr-x"):] for p in model_dir.split("/") if p.startswith("lr-x")), "1")
        split = data.stem
        evaluated.append((split, model_dir))
        score = (val_score if split == "val" else test_score)[factor]
        if "dense-ffn" in model_dir:
            score += 1  # the FFN-only arm is the better dense arm on val (and on test)
        return metrics_scoring(score)

    fake_compare(monkeypatch, run_module, fake_train, fake_metrics)
    breakdowns = []

    def fake_breakdown(work, base, moe, test, val_json=None):
        breakdowns.append((moe, test.name, val_json.name))
        ci = {"estimate": 1.0, "low": -1.0, "high": 3.0, "excludes_zero": False, "verdict": "CI includes 0"}
        models = {name: {"i2t_r1": 1.0, "t2i_r1": 1.0, "r1_mean": 1.0, "hits": {}}
                  for name in ("moe", "expert-0", "expert-1", "ffn-average")}
        return {"models": models, "best_expert": {"name": "expert-1", "chosen_on": "val"},
                "intervals": {"moe_minus_best": {"i2t_r1": ci, "t2i_r1": ci},
                              "moe_minus_average": {"i2t_r1": ci, "t2i_r1": ci}}}

    monkeypatch.setattr(run_module, "expert_breakdown", fake_breakdown)
    out = tmp_path / "sweep"
    assert main(["compare", "--base", str(base_clip_dir), "--data", str(grids_dir), "--out", str(out),
                 "--arms", "base,dense,dense-ffn,dmu", "--seeds", "0,1", "--lr-factors", "1,3,10",
                 "--num-experts", "2", "--batch-size", "16"]) == 0
    summary = json.loads((out / "compare.json").read_text())
    assert summary["chosen_lr_factor"] == {"base": 1.0, "dense": 3.0, "dense-ffn": 3.0, "dmu": 3.0}
    assert summary["reference_arm"] == "dense-ffn"
    # the experts of every DMU seed, at the chosen rate, best chosen on val, reported on test
    assert sorted(breakdowns) == [(out / "arms" / "dmu" / "lr-x3" / f"seed-{s}" / "model", "test.json", "val.json")
                                  for s in (0, 1)]
    tested = [model for split, model in evaluated if split == "test"]
    assert tested and all("lr-x3/" in m or m.endswith("base") or "/base/" in m for m in tested), tested
    assert {(s, m.split("/arms/")[1]) for s, m in evaluated if s == "val" and "/dense/" in m} == {
        ("val", f"dense/lr-x{f}/seed-0") for f in ("1", "3", "10")}  # the sweep trains the first seed only
    report = (out / "compare.md").read_text()
    assert "| dense | dense_lr = 0.0001 x factor | 10.0 | **30.0** | 20.0 | x3 (0.0003) |" in report
    assert "measured against `dense-ffn`, the dense arm with the higher validation R@1" in report
    for seed in (0, 1):  # every seed's model at the chosen rate, for the LLaVA runs
        assert (out / "towers" / "dense" / f"seed-{seed}").resolve() == (
            out / "arms" / "dense" / "lr-x3" / f"seed-{seed}").resolve()
    # The chosen runs of the first seed are the sweep's own (trained once), evaluated on test as well.
    assert "val" in json.loads((out / "arms" / "dense" / "lr-x3" / "seed-0" / "result.json").read_text())


def test_a_sweep_needs_validation_data(base_clip_dir, grids_dir, tmp_path, capsys):
    data = tmp_path / "grids"
    data.mkdir()
    for name in ("train.json", "test.json"):
        (data / name).write_text((grids_dir / name).read_text())
    (data / "val.json").write_text("[]")
    code = main(["compare", "--base", str(base_clip_dir), "--data", str(data), "--out", str(tmp_path / "o"),
                 "--lr-factors", "1,3"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "val.json, which is missing or empty" in err[0], err
    assert main(["compare", "--base", str(base_clip_dir), "--data", str(data), "--out", str(tmp_path / "o"),
                 "--lr-factors", "1,1"]) == 2
    assert "give distinct positive numbers" in capsys.readouterr().err


def one_expert_breakdown():
    """What `expert_breakdown` returns, with made-up numbers (for tests about what surrounds it)."""
    ci = {"estimate": 1.0, "low": -1.0, "high": 3.0, "excludes_zero": False, "verdict": "CI includes 0"}
    models = {name: {"i2t_r1": 1.0, "t2i_r1": 1.0, "r1_mean": 1.0, "hits": {}}
              for name in ("moe", "expert-0", "expert-1", "ffn-average")}
    return {"models": models, "best_expert": {"name": "expert-1", "chosen_on": "val"},
            "intervals": {"moe_minus_best": {"i2t_r1": ci, "t2i_r1": ci}, "moe_minus_average": {"i2t_r1": ci, "t2i_r1": ci}}}


def test_dmus_stage_epochs_and_small_clusters_are_chosen_on_validation_at_an_unchanged_budget(
        base_clip_dir, grids_dir, tmp_path, monkeypatch):
    """After its learning rate, DMU tries stage epochs (router training taking the rest of the budget), then
    small-cluster rules at the chosen epochs, each scored on val only; every seed trains at the final choice and
    only that is evaluated on test. Test prefers other settings on purpose. With `drop` chosen, DMU may have seen
    fewer pairs (it skips small clusters), never more."""
    from upcycle.research.compare import run as run_module

    val = {"lr-x1": 10.0, "lr-x3": 20.0, "lr-x3-stage-epochs-1": 25.0, "lr-x3-stage-epochs-1-small-clusters-drop": 30.0,
           "lr-x3-stage-epochs-1-small-clusters-bin": 28.0}
    trained, evaluated = {}, []

    def fake_train(arm, seed, base_dir, train_data, folder, settings):
        folder.mkdir(parents=True, exist_ok=True)
        if arm == "base":
            return {"model": str(base_dir), "pairs_seen": 0, "optimizer_steps": 0}
        trained[str(folder.relative_to(out))] = settings
        pairs = settings.budget_epochs * 96 - (10 if settings.small_clusters == "drop" else 0)
        return {"model": str(folder), "pairs_seen": pairs, "optimizer_steps": 12}

    def fake_metrics(model_dir, data):
        tag = next((p for p in model_dir.split("/") if p.startswith("lr-x")), "lr-x1")
        evaluated.append((data.stem, tag))
        score = val.get(tag, 1.0) if data.stem == "val" else 50.0 - val.get(tag, 1.0)
        return metrics_scoring(score)

    fake_compare(monkeypatch, run_module, fake_train, fake_metrics)
    monkeypatch.setattr(run_module, "expert_breakdown", lambda *a, **k: one_expert_breakdown())
    out = tmp_path / "sweep"
    assert main(["compare", "--base", str(base_clip_dir), "--data", str(grids_dir), "--out", str(out),
                 "--arms", "base,dmu", "--seeds", "0,1", "--lr-factors", "1,3", "--num-experts", "3",
                 "--stage-epochs", "2", "--dmu-stage-epochs", "1,2", "--dmu-small-clusters", "merge,drop,bin",
                 "--batch-size", "16"]) == 0
    summary = json.loads((out / "compare.json").read_text())
    assert summary["chosen_lr_factor"]["dmu"] == 3.0
    assert summary["chosen_dmu_settings"] == {"stage_epochs": 1, "small_clusters": "drop"}
    # the sweep, first seed only: lr, then stage epochs at x3 (2 is the x3 run itself), then the rules at 1 epoch
    assert sorted(k.removesuffix("/seed-0") for k in trained if k.endswith("seed-0")) == sorted(
        f"arms/dmu/{tag}" for tag in val)
    for folder, settings in trained.items():
        assert settings.budget_epochs == 2 * 2 + 1  # unchanged: (E - 1) x --stage-epochs + 1
        assert settings.router_epochs == 5 - 2 * settings.stage_epochs
    chosen = "lr-x3-stage-epochs-1-small-clusters-drop"
    assert "arms/dmu/" + chosen + "/seed-1" in trained and len([k for k in trained if "seed-1" in k]) == 1
    assert {tag for split, tag in evaluated if split == "test"} <= {chosen, "lr-x1"}  # lr-x1: the base's row
    assert ("test", chosen) in evaluated
    report = (out / "compare.md").read_text()
    assert "| stage epochs | 1: 25.0, 2: 20.0 | 1 |" in report.replace("**", "")
    assert "| small clusters | merge: 25.0, **drop: 30.0**, bin: 28.0 | drop |" in report
    assert "1 epochs per stage, 3 of router training, small clusters: drop" in report
    assert "(at most: with small clusters dropped DMU skips their pairs" in report


def test_dmu_stage_epochs_beyond_the_budget_are_one_line(base_clip_dir, grids_dir, tmp_path, capsys):
    code = main(["compare", "--base", str(base_clip_dir), "--data", str(grids_dir), "--out", str(tmp_path / "o"),
                 "--stage-epochs", "2", "--dmu-stage-epochs", "1,3"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--dmu-stage-epochs 3" in err[0] and "try 1 to 2" in err[0], err
    assert main(["compare", "--base", str(base_clip_dir), "--data", str(grids_dir), "--out", str(tmp_path / "o"),
                 "--dmu-small-clusters", "merge,split"]) == 2
    assert "unknown ['split']" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_factor_at_the_edge_of_the_grid_is_flagged():
    from upcycle.research.compare.run import edge_note

    note = edge_note({"dense": {1: 1.0, 3: 2.0, 10: 3.0}, "dmu": {1: 1.0, 3: 5.0, 10: 2.0},
                      "sparse-all": {1: 4.0, 3: 2.0, 10: 1.0}}, {"dense": 10, "dmu": 3, "sparse-all": 1})
    assert "dense (largest factor)" in note and "sparse-all (smallest factor)" in note and "dmu" not in note
    assert "inside the grid" in edge_note({"dmu": {1: 1.0, 3: 5.0, 10: 2.0}}, {"dmu": 3})
