"""scripts/replicate.sh's plan: MLLM arms trained alike, and steps with outputs are skipped on a re-run."""

from __future__ import annotations

import argparse

from upcycle.experiments.main_job import Step, run_step
from upcycle.experiments.replicate import MLLM_ARMS, plan


def args(**kw):
    defaults = dict(num_train=100, num_test=20, base_epochs=3, seeds="0,1,2", stage_steps=7, eval_limit=9)
    return argparse.Namespace(**{**defaults, **kw})


def test_every_mllm_arm_gets_identical_llava_training(tmp_path):
    steps = plan(tmp_path, args())
    for stage in ("LLaVA stage 1", "LLaVA stage 2"):
        runs = {s.name.split(": ")[1].removesuffix(" tower"): s.argv for s in steps if s.name.startswith(stage)}
        assert set(runs) == set(MLLM_ARMS)
        normalised = []
        for arm, argv in runs.items():
            tower = argv[argv.index("--vision_tower") + 1]
            assert f"arms/{arm}/seed-0/model" in tower  # the seed-0 tower of each CLIP arm
            normalised.append([a.replace(arm, "ARM") for a in argv])
        assert all(n == normalised[0] for n in normalised), "arms differ in more than their tower"
    compare = next(s for s in steps if s.name == "CLIP arms x seeds")
    assert compare.argv[compare.argv.index("--seeds") + 1] == "0,1,2"


def test_a_step_is_skipped_only_with_its_success_record_and_the_same_command(tmp_path, capsys):
    done = tmp_path / "out.txt"
    done.write_text("x")
    step = Step("finished", ["true"], done)
    assert run_step(step, 1, 2, tmp_path) > 0  # an output without a success record is not done
    assert run_step(step, 1, 2, tmp_path) == 0.0 and "skipped" in capsys.readouterr().out
    assert run_step(Step("finished", ["true", "--other"], done), 1, 2, tmp_path) > 0  # another command line
