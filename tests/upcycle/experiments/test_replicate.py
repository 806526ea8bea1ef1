"""scripts/replicate.sh's plan: MLLM arms trained alike, and steps with outputs are skipped on a re-run."""

from __future__ import annotations

import argparse

from upcycle.experiments.main_job import Step, run_step
from upcycle.experiments.replicate import MLLM_ARMS, plan


def args(**kw):
    defaults = dict(num_train=100, num_val=10, num_test=20, base_epochs=3, seeds="0,1,2", stage_steps=7, eval_limit=9,
                    lr_factors="1,3", stage_epochs=2)
    return argparse.Namespace(**{**defaults, **kw})


def test_every_mllm_arm_gets_identical_llava_training(tmp_path):
    steps = plan(tmp_path, args())
    for stage in ("LLaVA stage 1", "LLaVA stage 2"):
        runs = {s.name.split(": ")[1].removesuffix(" tower"): s.argv for s in steps if s.name.startswith(stage)}
        assert set(runs) == set(MLLM_ARMS)
        normalised = []
        for arm, argv in runs.items():
            tower = argv[argv.index("--vision_tower") + 1]
            assert tower.endswith(f"compare/towers/{arm}")  # the first seed's tower at the chosen learning rate
            normalised.append([a.replace(arm, "ARM") for a in argv])
        assert all(n == normalised[0] for n in normalised), "arms differ in more than their tower"
    compare = next(s for s in steps if s.name == "CLIP arms x seeds")
    assert compare.argv[compare.argv.index("--seeds") + 1] == "0,1,2"
    assert compare.argv[compare.argv.index("--lr-factors") + 1] == "1,3"
    assert compare.argv[compare.argv.index("--stage-epochs") + 1] == "2"
    data = next(s for s in steps if s.name == "data")
    assert data.argv[data.argv.index("--num-val") + 1] == "10"  # the sweep's validation split


def test_a_step_is_skipped_only_with_its_success_record_and_the_same_command(tmp_path, capsys):
    done = tmp_path / "out.txt"
    done.write_text("x")
    step = Step("finished", ["true"], done)
    assert run_step(step, 1, 2, tmp_path) > 0  # an output without a success record is not done
    assert run_step(step, 1, 2, tmp_path) == 0.0 and "skipped" in capsys.readouterr().out
    assert run_step(Step("finished", ["true", "--other"], done), 1, 2, tmp_path) > 0  # another command line


def test_the_default_question_count_gives_a_95_interval_of_at_most_1_5_points():
    import math

    from upcycle.experiments.replicate import ReplicateConfig

    n = ReplicateConfig().eval_limit
    assert n == 4269
    assert 1.96 * math.sqrt(0.25 / n) <= 0.015 < 1.96 * math.sqrt(0.25 / (n - 1))  # the smallest such count
    assert ReplicateConfig().num_test * 4 >= n  # the test split holds them: 4 questions per 2x2 grid


def fake_replicate_run(out, per_question):
    """What the steps before the report leave: compare's table and plot, eval-lmms' table and per-question file."""
    import json

    (out / "compare").mkdir(parents=True)
    (out / "compare" / "compare.md").write_text("## CLIP arms\n")
    (out / "compare" / "training_loss.png").write_bytes(b"png")
    (out / "lmms-eval").mkdir()
    (out / "lmms-eval" / "results.md").write_text("# lmms-eval comparison\n\n| task | metric |\n")
    (out / "lmms-eval" / "per_question.json").write_text(json.dumps({"checkpoints": {
        name: {"digit_grids_qa": {"exact_match": {str(i): hit for i, hit in enumerate(hits)}}}
        for name, hits in per_question.items()}}))


def row(report, tower):
    return next(line for line in report.splitlines() if line.startswith(f"| {tower} |"))


def test_the_report_gives_intervals_and_calls_a_difference_only_when_it_excludes_0(tmp_path):
    import numpy as np

    from upcycle.experiments.replicate import ReplicateConfig, write_report

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
    assert row(report, "dense").startswith(f"| dense | 600 | {accuracy:.1f} [")
    assert row(report, "dense").endswith("| reference |")
    low, high = (float(x) for x in row(report, "dense").split("[")[1].split("]")[0].split(", "))
    assert low < accuracy < high and 2 < high - low < 12  # about ±3.9 points at 600 questions
    assert row(report, "same").endswith("| +0.0 [+0.0, +0.0] CI includes 0 |")
    assert "+15.0 [+" in row(report, "better") and row(report, "better").endswith(" higher |")
    assert "+0.2 [+0.0, " in row(report, "slightly") and row(report, "slightly").endswith("CI includes 0 |")
    assert "-10.0 [-" in row(report, "worse") and row(report, "worse").endswith(" lower |")
    assert "Only 600 questions" in report and "--eval-limit to 4,269" in report
    assert report.index("| tower | questions |") < report.index("lmms-eval's own table")
