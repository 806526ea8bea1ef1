"""The papers' comparison at tiny scale (`scripts/replicate.sh`): CLIP arms over seeds, then the MLLM comparison.

1. Digit grids (train, validation and test from disjoint digit scans); a base CLIP trained from scratch
   (20 epochs by default; `--base-epochs 3` gives the weak base of earlier reports).
2. `upcycle compare`: base / dense fine-tuning (all weights, FFNs only) / sparse upcycling (every other layer,
   all layers) / DMU, equal pair budgets from the same base weights, each arm's learning rate chosen on the
   validation split, 3 seeds at the chosen rate, evaluated on test with bootstrap intervals.
3. The MLLM comparison: LLaVA stage 1 + stage 2 with a tiny Llama on the seed-0 tower of the dense,
   sparse-upcycled (all layers) and DMU arms, then lmms-eval on digit-grid QA for the three.
4. OUT/report.md (+ PNGs) with the exact command, machine, wall time and versions.

Steps run as subprocesses through the main job's step runner: finished steps (and finished arm/seed runs
inside `compare`) are skipped when the command is run again.
"""

from __future__ import annotations

import json
import math
import platform
import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from encoder.utils.files import write_atomic
from encoder.utils.options import option

from ..eval.intervals import RESAMPLES, bootstrap_ci, paired_difference_ci
from .main_job import Step, claim_job, data_and_base_steps, mllm_steps, run_step

MLLM_ARMS = ("dense", "sparse-all", "dmu")
PLAN_SETTINGS = ("num_train", "num_val", "num_test", "base_epochs", "lr_factors", "stage_epochs", "seeds",
                 "stage_steps", "eval_limit")  # what `plan` reads

CI_HALF_WIDTH = 0.015  # one tower's LLaVA digit-QA accuracy: a 95% interval of ±1.5 points at most (p = 0.5)


def questions_for_half_width(half_width: float, z: float = 1.96) -> int:
    """Questions for which the (normal-approximation) 95% interval of an accuracy is at most ±`half_width` whatever
    the accuracy: z * sqrt(p(1 - p) / N) <= half_width at the worst case p = 0.5."""
    return math.ceil(z * z * 0.25 / half_width**2)


@dataclass
class ReplicateConfig:
    """the papers' comparison at tiny scale, CLIP arms and MLLMs (up to an hour)

    Digit grids -> a base trained from scratch -> `upcycle compare` (base, dense fine-tuning of all weights / of
    the FFNs, sparse upcycling every other / all layers, DMU; equal budgets; learning rates chosen on validation;
    several seeds) -> LLaVA stage 1 + 2 on the dense, sparse-upcycled
    and DMU towers -> lmms-eval -> OUT/report.md. Run again after an interruption: finished steps, arms and
    seeds are reused.
    """

    out: str = option("--out", "working directory", "runs/replicate")
    num_train: int = option("--num-train", "training images", 2000)
    num_test: int = option("--num-test", "test images (6,000: a paired R@1 difference to about ±1 point)", 6000)
    num_val: int = option("--num-val", "validation images (their own digits): the learning rates are chosen on them",
                          1000)
    base_epochs: int = option("--base-epochs", "epochs of base pre-training (3: the weak base of earlier reports)", 20)
    lr_factors: str = option("--lr-factors", "learning-rate sweep per arm (factors of its own rate), chosen on "
                             "validation", "1,3,10,30")
    stage_epochs: int = option("--stage-epochs", "epochs per DMU stage (and so every arm's budget: "
                               "(experts - 1) x this + 1 epochs)", 4)
    seeds: str = option("--seeds", "seeds of the CLIP arms", "0,1,2")
    stage_steps: int = option("--stage-steps", "LLaVA stage 1 and stage 2 steps", 300)
    eval_limit: int = option("--eval-limit", "lmms-eval questions per checkpoint (4,269: an accuracy's 95 percent "
                             "interval within ±1.5 points; the test split has 4 per image)",
                             questions_for_half_width(CI_HALF_WIDTH))


def plan(out: Path, args: ReplicateConfig) -> list[Step]:
    py = [sys.executable, "-m"]
    data, base = out / "digit-grids", out / "base"
    compare = out / "compare"
    steps = [
        *data_and_base_steps(out, args.num_train, args.num_test, args.base_epochs,
                             title=f"trained {args.base_epochs} epochs", num_val=args.num_val),
        Step("CLIP arms x seeds", [*py, "upcycle", "compare", "--base", str(base), "--data", str(data), "--out",
                                   str(compare), "--seeds", args.seeds, "--lr-factors", args.lr_factors,
                                   "--stage-epochs", str(args.stage_epochs)], compare / "compare.md"),
    ]
    # The first seed's model of each arm at the learning rate the sweep chose (compare links it there).
    towers = {arm: compare / "towers" / arm for arm in MLLM_ARMS}
    steps += mllm_steps(out, data, towers, args.stage_steps, args.stage_steps, args.eval_limit)
    return steps


def run_replicate(args: ReplicateConfig) -> int:
    out = Path(args.out)
    claim_job(out, "replicate", {name: getattr(args, name) for name in PLAN_SETTINGS})
    steps = plan(out, args)
    start = time.time()
    timings_file = out / "timings.json"
    timings = json.loads(timings_file.read_text()) if timings_file.exists() else {}
    for i, step in enumerate(steps, start=1):
        seconds = run_step(step, i, len(steps), out)
        if seconds or step.name not in timings:
            timings[step.name] = round(seconds, 1)
            write_atomic(timings_file, lambda tmp: tmp.write_text(json.dumps(timings, indent=1) + "\n"))
    report = write_report(out, args, timings, time.time() - start)
    print(f"\nreport: {report}")
    return 0


def write_report(out: Path, args: ReplicateConfig, timings: dict, seconds: float) -> Path:
    import torch
    import transformers

    compare_md = (out / "compare" / "compare.md").read_text()
    shutil.copyfile(out / "compare" / "training_loss.png", out / "training_loss.png")
    lmms = out / "lmms-eval" / "results.md"
    mllm = "\n".join("#" + line if line.startswith("##") else line
                     for line in lmms.read_text().splitlines() if not line.startswith("# ")) if lmms.exists() else ""
    intervals = mllm_intervals(lmms.parent) if lmms.exists() else ""
    total = sum(timings.values())
    text = f"""# Tiny-scale replication: dense fine-tuning vs sparse upcycling vs DMU

Command: `{shlex.join(['bash', 'scripts/replicate.sh', *sys.argv[2:]])}`

Data: digit grids of scikit-learn's real handwritten digits, {args.num_train:,} training, {args.num_val:,}
validation and {args.num_test:,} test images (2x2 grids; the three splits' digit scans are disjoint, so test
digits are never seen in training; retrieval ranks among all {args.num_test:,} test items, which keeps R@1 far
from saturation). Base: a small CLIP (width 64, 4 layers per tower, 32 px, patch 8) trained from scratch for
{args.base_epochs} epochs on the same captions. Every arm then gets the same extra budget, with its learning rate
chosen on the validation split (factors {args.lr_factors} of its own rate), DMU with {args.stage_epochs} epochs
per MCL stage.

{compare_md}

## MLLM comparison (LLaVA with a tiny Llama, first-seed towers at the chosen learning rates, digit-grid QA via lmms-eval)

Stage 1 (projector) and stage 2 (projector + LLM, one-word digit questions) with {args.stage_steps} steps each,
identical settings for every tower.

{intervals}

lmms-eval's own table:

{mllm}

## Run

Wall time of the steps: {total / 60:.1f} min (this invocation {seconds / 60:.1f} min). Machine:
{platform.machine()}, {torch.get_num_threads()} threads; Python {platform.python_version()}, torch
{torch.__version__}, transformers {transformers.__version__}.
"""
    return write_atomic(out / "report.md", lambda tmp: tmp.write_text(text))


def mllm_intervals(lmms: Path, reference: str = MLLM_ARMS[0]) -> str:
    """Markdown: each tower's accuracy with its 95% bootstrap interval and its paired difference from `reference`
    (the same questions, matched by lmms-eval doc_id), from the per_question.json `eval-lmms` writes in `lmms`."""
    path = lmms / "per_question.json"
    if not path.is_file():
        return (f"No per-question results in {lmms} (written by an older `eval-lmms`), so no intervals; delete "
                f"{lmms} and run again to get them.")
    checkpoints = json.loads(path.read_text())["checkpoints"]
    rows = dict.fromkeys((task, metric) for per in checkpoints.values() for task, metrics in per.items()
                         for metric in metrics)
    if not rows:
        return f"{path} holds no per-question results (every run failed?), so no intervals."
    return "\n\n".join(_interval_table(task, metric, {name: per[task][metric] for name, per in checkpoints.items()
                                                        if metric in per.get(task, {})}, reference)
                        for task, metric in rows)


def _interval_table(task: str, metric: str, hits: dict[str, dict[str, int]], reference: str) -> str:
    """One task's table: rows are towers; `hits` maps a tower to {doc_id: 0/1}."""
    # The CLIP comparison's wording (higher/lower only when 0 is excluded); imported here: compare loads torch.
    from .compare.report import difference_cell

    asked, needed = min(len(per) for per in hits.values()), questions_for_half_width(CI_HALF_WIDTH)
    note = (f"`{task}` {metric} in percent, with 95% percentile bootstrap intervals over the questions "
            f"({RESAMPLES:,} resamples). Differences from `{reference}` are paired: both towers on the same "
            "questions in every resample; one is called higher or lower only when its interval excludes 0. One "
            "LLaVA run per tower, so the intervals cover the choice of questions, not training seeds; the 4 "
            "questions about one grid share its image, so they are not independent and the intervals may be "
            "narrower than a resample of whole images would give.")
    lines = [note, ""]
    if asked < needed:
        lines += [(f"Only {asked:,} questions: an accuracy's interval can reach "
                   f"±{100 * 1.96 * math.sqrt(0.25 / asked):.1f} points, more than the ±{100 * CI_HALF_WIDTH:.1f} "
                   f"aimed for; raise --eval-limit to {needed:,} (and --num-test to a quarter of that or more: 4 "
                   "questions per test image)."), ""]
    lines += [f"| tower | questions | {metric} [95% CI] | − {reference} [95% CI] (paired) |", "|---|---|---|---|"]
    ref = hits.get(reference)
    for name, per in hits.items():
        ci = bootstrap_ci(list(per.values()))
        cells = [name, f"{ci.items:,}", f"{100 * ci.estimate:.1f} [{100 * ci.low:.1f}, {100 * ci.high:.1f}]"]
        common = sorted(set(per) & set(ref or {}), key=int)
        if ref is None:
            cells.append(f"no `{reference}` results")
        elif name == reference:
            cells.append("reference")
        elif not common:
            cells.append(f"no question in common with `{reference}`")
        else:
            diff = paired_difference_ci([per[d] for d in common], [ref[d] for d in common])
            shared = "" if len(common) == len(per) == len(ref) else f" (on the {len(common):,} common questions)"
            cells.append(difference_cell(diff) + shared)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
