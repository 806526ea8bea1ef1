"""Fault tier, the research harness's numbers (`upcycle compare`, `upcycle replicate`, `upcycle.research.intervals`):
nothing reported surer than the data allows, no input silently repeated or dropped, one failing candidate or a
kill costing only itself (they used to: a bootstrap interval of [100, 100] from 50 hits, a paired difference on 3
items called "higher", `--seeds 0,0` reported as a replication with std 0, a tower missing from the MLLM table
without a word, one failing sweep candidate stopping the whole comparison, an arm killed near its end restarting
from step 0)."""

from __future__ import annotations

import pytest

from upcycle.cli import main

# --- seeds: repeats and junk are refused in one line before anything is written ------------------------------

@pytest.mark.parametrize("seeds, says", [("0,0", "seed 0 is given more than once"),
                                         ("0,1,1", "seed 1 is given more than once"),
                                         ("0,-1", "'-1' is not a seed"), ("0,1.5", "'1.5' is not a seed"),
                                         ("0,,1", "'' is not a seed"), ("a", "'a' is not a seed")])
def test_compare_refuses_repeated_or_junk_seeds(seeds, says, base_clip_dir, grids_dir, tmp_path, capsys):
    out = tmp_path / "cmp"
    code = main(["compare", "--base", str(base_clip_dir), "--data", str(grids_dir), "--out", str(out),
                 "--arms", "base,dense", "--seeds", seeds])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--seeds" in err[0] and says in err[0], err
    assert not out.exists()


@pytest.mark.parametrize("flag, seeds, says", [("--seeds", "0,0", "seed 0 is given more than once"),
                                               ("--mllm-seeds", "0,-2", "'-2' is not a seed"),
                                               ("--seeds", "1e3", "'1e3' is not a seed")])
def test_replicate_refuses_repeated_or_junk_seeds(flag, seeds, says, tmp_path, capsys):
    out = tmp_path / "rep"
    args = ["replicate", "--out", str(out), flag, seeds]
    if flag == "--seeds":
        args += ["--mllm-seeds", "0"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and flag in err[0] and says in err[0], err
    assert not out.exists()


# --- compare's arms checkpoint, so a kill costs minutes, not the arm ------------------------------------------

@pytest.mark.slow
def test_a_compare_arm_killed_midway_resumes_from_its_checkpoint_to_the_same_weights(base_clip_dir, grids_dir,
                                                                                   tmp_path, monkeypatch):
    """12 steps (2 epochs of 96 pairs, batch 16), a checkpoint every 4, killed after step 6: the re-run trains
    steps 5-12 only, and its weights are the uninterrupted run's."""
    from conftest import kill_after_steps
    from safetensors.torch import load_file

    from upcycle.train import ContrastiveTrainer

    def compare(out):
        return main(["compare", "--base", str(base_clip_dir), "--data", str(grids_dir), "--out", str(out),
                     "--arms", "dense", "--seeds", "0", "--num-experts", "2", "--batch-size", "16",
                     "--checkpoint-every", "4"])

    assert compare(tmp_path / "straight") == 0
    real = kill_after_steps(monkeypatch, ContrastiveTrainer, 6)
    with pytest.raises(KeyboardInterrupt):
        compare(tmp_path / "killed")
    trained = []

    def counted(self, batches):
        trained.append(self.step + 1)
        return real(self, batches)

    monkeypatch.setattr(ContrastiveTrainer, "_optimizer_step", counted)
    assert compare(tmp_path / "killed") == 0
    assert trained == list(range(5, 13))  # from the step-4 checkpoint, not from step 0
    weights = [load_file(str(out / "arms" / "dense" / "seed-0" / "model" / "model.safetensors"))
               for out in (tmp_path / "straight", tmp_path / "killed")]
    assert weights[0].keys() == weights[1].keys()
    for key, value in weights[0].items():
        assert (weights[1][key] - value).abs().max() <= 1e-6, key


def test_dmu_arms_checkpoint_their_stages_and_router_training(tmp_path, monkeypatch):
    """DMU's stages and router training are the DMU recipe's own runs: the comparison's interval reaches them."""
    from upcycle.research.compare import arms

    seen = []

    def stop(cfg, resume=False):
        seen.append(cfg)
        raise KeyboardInterrupt

    monkeypatch.setattr(arms, "run_dmu", stop)
    with pytest.raises(KeyboardInterrupt):
        arms.train_arm("dmu", 0, tmp_path / "base", tmp_path / "train.json", tmp_path / "arm",
                       arms.ArmSettings(checkpoint_every=7))
    assert seen[0].checkpoint_every == 7
    assert arms.ArmSettings().checkpoint_every < 500  # the trainers' default never checkpoints an arm this size


# --- intervals honest at small n ------------------------------------------------------------------------------

def test_all_hits_on_50_items_is_not_a_certain_100_percent():
    import numpy as np

    from upcycle.research.intervals import proportion_ci

    for hits in (np.ones(50), np.ones((3, 50))):  # one seed; three seeds that all hit every item
        ci = proportion_ci(hits)
        assert ci.estimate == 1.0 and ci.high == 1.0
        assert 0.90 < ci.low < 0.95  # Wilson on 50 items: [92.9, 100]; the percentile bootstrap said [100, 100]


def test_a_single_recall_covers_the_truth_at_small_n():
    """Exact coverage at n=10, p=0.9 (summed over the binomial outcomes, no simulation): the percentile bootstrap
    covered the truth about 70% of the time; the interval must keep close to its 95%."""
    import math

    import numpy as np

    from upcycle.research.intervals import proportion_ci

    n, p = 10, 0.9
    coverage = 0.0
    for k in range(n + 1):
        ci = proportion_ci(np.r_[np.ones(k), np.zeros(n - k)], resamples=2000)
        coverage += math.comb(n, k) * p**k * (1 - p) ** (n - k) * (ci.low <= p <= ci.high)
    assert coverage >= 0.92, coverage


def few_items_apart(items: int, differ: int):
    """Hits of a reference and of a model better on `differ` of `items` items (and alike on the rest)."""
    import numpy as np

    reference = np.zeros(items, dtype=np.uint8)
    reference[differ:] = np.arange(items - differ) % 2
    better = reference.copy()
    better[:differ] = 1
    return reference, better


def test_a_paired_difference_on_3_items_is_not_called_higher():
    from upcycle.research.intervals import MIN_INFORMATIVE, paired_difference_ci, verdict

    reference, better = few_items_apart(3, 3)
    ci = paired_difference_ci(better, reference)
    assert ci.excludes_zero()  # the percentile bootstrap's [1, 1] on 3 items...
    assert verdict(ci).startswith("n too small to call (3 of 3 differ")  # ...is not a finding
    # on 1,000 items of which 3 differ the same holds, and enough differing items are called
    assert verdict(paired_difference_ci(*reversed(few_items_apart(1000, 3)))).startswith("n too small to call")
    reference, better = few_items_apart(1000, 4 * MIN_INFORMATIVE)
    assert verdict(paired_difference_ci(better, reference)) == "higher"
    assert verdict(paired_difference_ci(reference, better)) == "lower"


def test_compares_table_never_calls_a_difference_on_too_few_items():
    from upcycle.research.compare.report import intervals_section
    from upcycle.research.intervals import pack_hits

    reference, better = few_items_apart(3, 3)
    runs = {arm: [{"seed": 0, "hits": {"i2t_r1": pack_hits(h), "t2i_r1": pack_hits(h)}}]
            for arm, h in (("dense", reference), ("dmu", better))}
    section = intervals_section(runs)
    row = next(line for line in section.splitlines() if line.startswith("| dmu |"))
    assert "higher" not in row and row.count("n too small to call") == 2, row
    assert "[100.0, 100.0]" not in row  # 3 of 3 hits: Wilson's [43.9, 100], not a certainty


def test_replicates_table_never_calls_a_difference_on_too_few_questions(tmp_path):
    from upcycle.research.replicate import mllm_intervals

    reference, better = few_items_apart(12, 3)  # 12 questions, 4 per image: 3 images
    (tmp_path / "per_question.json").write_text(__import__("json").dumps({"checkpoints": {
        name: {"qa": {"exact_match": {str(i): int(h) for i, h in enumerate(hits)}}}
        for name, hits in (("dense", reference), ("dmu", better))}}))
    row = next(line for line in mllm_intervals(tmp_path).splitlines() if line.startswith("| dmu |"))
    assert "higher" not in row and "n too small to call (3 of 12 differ" in row, row


# --- replicate's MLLM table: no tower left out without a row saying why ---------------------------------------

def test_a_tower_without_per_question_hits_gets_a_row_saying_why(tmp_path):
    import json

    from upcycle.research.replicate import ReplicateConfig, write_report

    hits = {str(i): i % 2 for i in range(40)}
    (tmp_path / "compare").mkdir()
    (tmp_path / "compare" / "compare.md").write_text("## CLIP arms\n")
    (tmp_path / "compare" / "training_loss.png").write_bytes(b"png")
    (tmp_path / "lmms-eval").mkdir()
    (tmp_path / "lmms-eval" / "results.md").write_text("# lmms-eval comparison\n")
    # sparse-all-seed-0 answered another metric only; dmu-seed-0's evaluation wrote nothing at all
    (tmp_path / "lmms-eval" / "per_question.json").write_text(json.dumps({"checkpoints": {
        "dense-seed-0": {"qa": {"exact_match": hits}}, "sparse-all-seed-0": {"qa": {"other": hits}}}}))
    report = write_report(tmp_path, ReplicateConfig(out=str(tmp_path), seeds="0", mllm_seeds="0"), {}, 1.0).read_text()
    table = report[report.index("`qa` exact_match"):]
    rows = {line.split(" | ")[0][2:]: line for line in table.splitlines() if line.startswith("| ")}
    assert "dense" in rows
    assert "per_question.json holds no `qa` exact_match for it" in rows["sparse-all-seed-0"]
    assert "its lmms-eval run wrote no per-question results" in rows["dmu-seed-0"]


# --- one failing sweep candidate is reported and skipped; the others are still compared -----------------------

def fake_compare_runs(monkeypatch, fails):
    """`compare` with training and evaluation replaced: DMU raises the recipe's UserError where `fails(settings,
    seed)`,
    every other run trains instantly and scores by its folder (x3 better than x1 on val)."""
    from encoder.utils.errors import UserError
    from upcycle.research.compare import run as run_module

    def train(arm, seed, base_dir, train_data, folder, settings):
        folder.mkdir(parents=True, exist_ok=True)
        if arm == "dmu" and fails(settings, seed):
            raise UserError("stage 2: every cluster is smaller than the global batch 16, so --small-clusters drop "
                            "leaves nothing to train; use merge or bin or a smaller --batch-size")
        if arm == "base":
            return {"model": str(base_dir), "pairs_seen": 0, "optimizer_steps": 0}
        return {"model": str(folder), "pairs_seen": settings.budget_epochs * 96, "optimizer_steps": 12}

    def metrics(model_dir, data):
        score = 30.0 if "lr-x3" in model_dir else 20.0
        score += 5.0 if "small-clusters-bin" in model_dir else 0.0
        hits = "1" * int(score) + "0" * (100 - int(score))
        return {"i2t_r1": score, "t2i_r1": score, "i2t_r5": score, "t2i_r5": score, "digits_mean": score,
                "digits": {"top left": score}, "hits": {"i2t_r1": hits, "t2i_r1": hits},
                "vision_params_total": 1, "vision_params_active": 1}

    ci = {"estimate": 0.0, "low": -1.0, "high": 1.0, "excludes_zero": False, "verdict": "CI includes 0"}
    breakdown = {"models": {name: {"i2t_r1": 1.0, "t2i_r1": 1.0, "r1_mean": 1.0, "hits": {}}
                            for name in ("moe", "expert-0", "expert-1", "ffn-average")},
                 "best_expert": {"name": "expert-1", "chosen_on": "val"},
                 "intervals": {k: {"i2t_r1": ci, "t2i_r1": ci} for k in ("moe_minus_best", "moe_minus_average")}}
    monkeypatch.setattr(run_module, "train_arm", train)
    monkeypatch.setattr(run_module, "metrics_on_split", metrics)
    monkeypatch.setattr(run_module, "forward_ms_per_image", lambda *a, **k: {})
    monkeypatch.setattr(run_module, "loss_curve", lambda *a, **k: [])
    monkeypatch.setattr(run_module, "expert_breakdown", lambda *a, **k: breakdown)


def sweep_args(base, grids, out):
    return ["compare", "--base", str(base), "--data", str(grids), "--out", str(out), "--arms", "base,dense,dmu",
            "--seeds", "0,1", "--lr-factors", "1,3", "--num-experts", "2", "--batch-size", "16",
            "--dmu-small-clusters", "merge,drop,bin"]


def test_a_failing_sweep_candidate_is_reported_and_skipped(base_clip_dir, grids_dir, tmp_path, monkeypatch):
    import json

    fake_compare_runs(monkeypatch, lambda settings, seed: settings.small_clusters == "drop")
    out = tmp_path / "cmp"
    assert main(sweep_args(base_clip_dir, grids_dir, out)) == 0
    summary = json.loads((out / "compare.json").read_text())
    assert summary["chosen_dmu_settings"] == {"small_clusters": "bin"}  # still chosen among those that ran
    assert [r["seed"] for r in summary["results"]["dmu"]] == [0, 1]
    report = (out / "compare.md").read_text()
    assert "| small clusters | merge: 30.0, drop: failed, **bin: 35.0** | bin |" in report
    assert "- small clusters drop failed and was skipped: the recipe stopped: stage 2: every cluster" in report


def test_an_arm_whose_every_candidate_fails_fails_in_one_line(base_clip_dir, grids_dir, tmp_path, monkeypatch,
                                                            capsys):
    fake_compare_runs(monkeypatch, lambda settings, seed: True)
    out = tmp_path / "cmp"
    assert main(sweep_args(base_clip_dir, grids_dir, out)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "arm dmu: every learning-rate factor failed" in err[0], err
    assert "x1: the recipe stopped" in err[0] and "x3: the recipe stopped" in err[0]
    assert not (out / "compare.md").exists()


def test_a_chosen_setting_failing_on_a_later_seed_names_the_arm_seed_and_setting(base_clip_dir, grids_dir, tmp_path,
                                                                               monkeypatch, capsys):
    fake_compare_runs(monkeypatch, lambda settings, seed: seed == 1)
    assert main(sweep_args(base_clip_dir, grids_dir, tmp_path / "cmp")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "arm dmu, seed 1 (lr-x3-small-clusters-bin): the recipe stopped" in err[0], err
    assert "leave dmu out of --arms, drop seed 1 from --seeds" in err[0]
