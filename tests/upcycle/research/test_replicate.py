"""scripts/replicate.sh's plan: MLLM arms trained alike, and steps with outputs are skipped on a re-run."""

from __future__ import annotations

import json

import numpy as np
import pytest

from upcycle.embedded.steps import Step, run_step
from upcycle.research.replicate import MLLM_ARMS, plan, split_tower, tower_name


def args(**kw):
    from upcycle.research.replicate import ReplicateConfig

    defaults = dict(num_train=100, num_val=10, num_test=20, base_epochs=3, seeds="0,1,2", mllm_seeds="0,2",
                    stage_steps=7, eval_limit=9, lr_factors="1,3", stage_epochs=2, dmu_stage_epochs="1,2",
                    dmu_small_clusters="merge,bin")
    return ReplicateConfig(**{**defaults, **kw})


def test_every_mllm_tower_gets_identical_llava_training_but_its_seed(tmp_path):
    """Each arm's tower of each --mllm-seeds seed goes through LLaVA with that seed; apart from the tower, the
    output folders and the seed, the commands are identical, so seed s of one arm meets seed s of another."""
    steps = plan(tmp_path, args())
    for stage in ("LLaVA stage 1", "LLaVA stage 2"):
        runs = {s.name.split(": ")[1].removesuffix(" tower"): s.argv for s in steps if s.name.startswith(stage)}
        assert set(runs) == {tower_name(arm, seed) for arm in MLLM_ARMS for seed in (0, 2)}
        normalised = []
        for name, argv in runs.items():
            arm, seed = split_tower(name)
            assert argv[argv.index("--vision_tower") + 1].endswith(f"compare/towers/{arm}/seed-{seed}")
            assert argv[argv.index("--seed") + 1] == str(seed)
            argv = list(argv)
            argv[argv.index("--seed") + 1] = "SEED"
            normalised.append([a.replace(f"towers/{arm}/seed-{seed}", "TOWER").replace(name, "NAME") for a in argv])
        assert all(n == normalised[0] for n in normalised), "towers differ in more than their tower and seed"
    compare = next(s for s in steps if s.name == "CLIP arms x seeds")
    for flag, value in (("--seeds", "0,1,2"), ("--lr-factors", "1,3"), ("--stage-epochs", "2"),
                        ("--dmu-stage-epochs", "1,2"), ("--dmu-small-clusters", "merge,bin")):
        assert compare.argv[compare.argv.index(flag) + 1] == value
    data = next(s for s in steps if s.name == "data")
    assert data.argv[data.argv.index("--num-val") + 1] == "10"  # the sweep's validation split
    assert data.argv[data.argv.index("--image-size") + 1] == "32" and "--grid" not in data.argv
    evaluated = next(s for s in steps if s.name.startswith("lmms-eval: ")).argv
    assert sum(a == "--checkpoint" for a in evaluated) == 6


def test_the_3x3_variant_makes_48_px_grids_and_a_base_of_that_size(tmp_path):
    steps = {s.name: s.argv for s in plan(tmp_path, args(grid=3))}
    assert steps["data"][steps["data"].index("--grid") + 1] == "3"
    for name in ("data", "base: a small CLIP"):
        assert steps[name][steps[name].index("--image-size") + 1] == "48"


def test_mllm_seeds_must_be_clip_seeds(tmp_path):
    from encoder.utils.errors import UserError

    with pytest.raises(UserError, match="--mllm-seeds 0,5: give distinct seeds of --seeds 0,1,2.*not there: 5"):
        plan(tmp_path, args(mllm_seeds="0,5"))
    with pytest.raises(UserError, match="distinct"):
        plan(tmp_path, args(mllm_seeds="1,1"))


def test_bad_mllm_seeds_stop_before_the_working_directory_is_claimed(tmp_path, capsys):
    from upcycle.cli import main

    out = tmp_path / "rep"
    assert main(["replicate", "--out", str(out), "--mllm-seeds", "0,5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--mllm-seeds 0,5" in err[0], err
    assert not out.exists()  # nothing claimed: the corrected command runs in the same --out


def test_a_step_is_skipped_only_with_its_success_record_and_the_same_command(tmp_path, capsys):
    done = tmp_path / "out.txt"
    done.write_text("x")
    step = Step("finished", ["true"], done)
    assert run_step(step, 1, 2, tmp_path) > 0  # an output without a success record is not done
    assert run_step(step, 1, 2, tmp_path) == 0.0 and "skipped" in capsys.readouterr().out
    assert run_step(Step("finished", ["true", "--other"], done), 1, 2, tmp_path) > 0  # another command line


def test_the_default_question_count_gives_a_95_interval_of_at_most_1_5_points():
    import math

    from upcycle.research.replicate import ReplicateConfig

    n = ReplicateConfig().eval_limit
    assert n == 4269
    assert 1.96 * math.sqrt(0.25 / n) <= 0.015 < 1.96 * math.sqrt(0.25 / (n - 1))  # the smallest such count
    assert ReplicateConfig().num_test * 4 >= n  # the test split holds them: 4 questions per 2x2 grid


def fake_replicate_run(out, per_question, questions_per_grid=4):
    """What the steps before the report leave: compare's table and plot, eval-lmms' table and per-question file,
    and the test questions (test_qa.json), `questions_per_grid` per image, in lmms-eval's doc_id order."""
    (out / "compare").mkdir(parents=True)
    (out / "compare" / "compare.md").write_text("## CLIP arms\n")
    (out / "compare" / "training_loss.png").write_bytes(b"png")
    (out / "lmms-eval").mkdir()
    (out / "lmms-eval" / "results.md").write_text("# lmms-eval comparison\n\n| task | metric |\n")
    (out / "lmms-eval" / "per_question.json").write_text(json.dumps({"checkpoints": {
        name: {"digit_grids_qa": {"exact_match": {str(i): hit for i, hit in enumerate(hits)}}}
        for name, hits in per_question.items()}}))
    questions = len(next(iter(per_question.values())))
    (out / "digit-grids").mkdir()
    (out / "digit-grids" / "test_qa.json").write_text(json.dumps([
        {"id": f"test_{g:05d}", "conversations": [{"from": "human"}, {"from": "gpt"}] * questions_per_grid}
        for g in range(questions // questions_per_grid)]))


def row(report, tower):
    return next(line for line in report.splitlines() if line.startswith(f"| {tower} |"))


def test_the_report_gives_intervals_and_calls_a_difference_only_when_it_excludes_0(tmp_path):
    import numpy as np

    from upcycle.research.replicate import ReplicateConfig, write_report

    dense = (np.random.default_rng(0).random(600) < 0.4).astype(int)
    wrong = np.flatnonzero(dense == 0)
    better, slightly, worse = dense.copy(), dense.copy(), dense.copy()
    better[wrong[:90]] = 1  # +15 points on the same questions
    slightly[wrong[:1]] = 1  # +0.2 points: one question of 600
    worse[np.flatnonzero(dense == 1)[:60]] = 0  # -10 points
    towers = {"dense": dense, "same": dense.copy(), "better": better, "slightly": slightly, "worse": worse}
    fake_replicate_run(tmp_path, {name: hits.tolist() for name, hits in towers.items()})
    report = write_report(tmp_path, ReplicateConfig(out=str(tmp_path)), {"step": 60.0}, 60.0).read_text()

    accuracy = 100 * dense.mean()
    assert row(report, "dense").startswith(f"| dense | - | 600 | {accuracy:.1f} [")
    assert row(report, "dense").endswith("| reference |")
    low, high = (float(x) for x in row(report, "dense").split("[")[1].split("]")[0].split(", "))
    assert low < accuracy < high and 2 < high - low < 12  # about ±3.9 points at 600 questions
    assert row(report, "same").endswith("| +0.0 [+0.0, +0.0] n too small to call (0 of 150 differ, 10 needed) |")
    assert "+15.0 [+" in row(report, "better") and row(report, "better").endswith(" higher |")
    assert "+0.2 [+0.0, " in row(report, "slightly") and row(report, "slightly").endswith("n too small to call (1 of "
                                                                                         "150 differ, 10 needed) |")
    assert "-10.0 [-" in row(report, "worse") and row(report, "worse").endswith(" lower |")
    assert "Only 600 questions" in report and "--eval-limit to 4,269" in report
    assert report.index("| tower | seeds | questions |") < report.index("lmms-eval's own table")


def interval(cell):
    """(estimate, low, high) of a cell '12.3 [10.1, 14.5] ...'."""
    estimate, rest = cell.strip().split(" [", 1)
    low, high = rest.split("]")[0].split(", ")
    return float(estimate), float(low), float(high)


def test_seeds_are_pooled_and_paired_and_whole_images_resampled(tmp_path):
    """Two seeds per arm: an arm's accuracy is the mean over its seeds; the difference pairs seed s with seed s.
    The 4 questions of an image have the same outcome here, so resampling whole images (what the report does)
    must give a wider interval than resampling questions as if independent (what it did before)."""
    from upcycle.research.intervals import proportion_ci
    from upcycle.research.replicate import ReplicateConfig, write_report

    rng = np.random.default_rng(1)
    per_image = {(arm, seed): (rng.random(300) < p).astype(int) for arm, p in (("dense", 0.4), ("dmu", 0.5))
                 for seed in (0, 1)}
    hits = {tower_name(arm, seed): np.repeat(h, 4).tolist() for (arm, seed), h in per_image.items()}
    fake_replicate_run(tmp_path, hits)
    report = write_report(tmp_path, ReplicateConfig(out=str(tmp_path)), {"step": 60.0}, 60.0).read_text()
    dense, dmu = (row(report, arm).split(" | ") for arm in ("dense", "dmu"))
    assert dense[1] == dmu[1] == "0, 1" and "resampling whole images" in report
    want = 100 * np.mean([per_image["dense", s].mean() for s in (0, 1)])
    assert dense[2] == "1,200"
    est, low, high = interval(dense[3])
    assert est == pytest.approx(want, abs=0.05)
    independent = proportion_ci(np.stack([hits["dense-seed-0"], hits["dense-seed-1"]]))
    assert high - low > 1.6 * 100 * (independent.high - independent.low)  # about 2x: 4 identical answers per image
    diff = 100 * np.mean([per_image["dmu", s].mean() - per_image["dense", s].mean() for s in (0, 1)])
    assert interval(dmu[4].replace("+", ""))[0] == pytest.approx(diff, abs=0.05)


def test_an_arm_with_other_seeds_gets_no_paired_difference(tmp_path):
    from upcycle.research.replicate import ReplicateConfig, write_report

    ones = [1, 0, 1, 1] * 50
    fake_replicate_run(tmp_path, {"dense-seed-0": ones, "dense-seed-1": ones, "dmu-seed-0": ones, "dmu-seed-2": ones})
    report = write_report(tmp_path, ReplicateConfig(out=str(tmp_path)), {"step": 60.0}, 60.0).read_text()
    assert row(report, "dmu").endswith("seeds differ from `dense`'s, so no paired difference |")
