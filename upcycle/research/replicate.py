"""The papers' comparison at tiny scale (`scripts/replicate.sh`): CLIP arms over seeds, then the MLLM comparison.

1. Digit grids (train, validation and test from disjoint digit scans); a base CLIP trained from scratch
   (20 epochs by default; `--base-epochs 3` gives the weak base of earlier reports).
2. `upcycle compare`: base / dense fine-tuning (all weights, FFNs only) / sparse upcycling (every other layer,
   all layers) / DMU, equal pair budgets from the same base weights, each arm's learning rate chosen on the
   validation split (DMU also its epochs per stage and small-cluster rule), 3 seeds at the chosen setting,
   evaluated on test with intervals (Wilson per arm, paired bootstrap for differences).
3. The MLLM comparison: LLaVA stage 1 + stage 2 with a tiny Llama on every --mllm-seeds tower of the dense,
   sparse-upcycled (all layers) and DMU arms (LLaVA seeded with the tower's seed), then lmms-eval on digit-grid
   QA for all of them, seeds paired and whole images resampled in the intervals.
4. OUT/report.md (+ PNGs) with the exact command, machine, wall time and versions.

Steps run as subprocesses through the demo's step runner (`upcycle.embedded.steps`): finished steps (and finished
arm/seed runs inside `compare`) are skipped when the command is run again.
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

from encoder.utils.errors import UserError
from encoder.utils.files import write_atomic
from encoder.utils.options import check_options, option

from ..embedded.main_job import PIXELS_PER_DIGIT, data_and_base_steps, mllm_steps
from ..embedded.steps import Step, claim_job, run_steps
from .intervals import MIN_INFORMATIVE, RESAMPLES, paired_difference_ci, proportion_ci
from .seeds import parse_seeds

MLLM_ARMS = ("dense", "sparse-all", "dmu")
PLAN_SETTINGS = ("num_train", "num_val", "num_test", "grid", "base_epochs", "lr_factors", "stage_epochs",
                 "dmu_stage_epochs", "dmu_small_clusters", "seeds", "mllm_seeds", "stage_steps",
                 "eval_limit")  # what `plan` reads

CI_HALF_WIDTH = 0.015  # one tower's LLaVA digit-QA accuracy: a 95% interval of ±1.5 points at most (p = 0.5)


def questions_for_half_width(half_width: float, z: float = 1.96) -> int:
    """Questions for which the (normal-approximation) 95% interval of an accuracy is at most ±`half_width` whatever
    the accuracy: z * sqrt(p(1 - p) / N) <= half_width at the worst case p = 0.5."""
    return math.ceil(z * z * 0.25 / half_width**2)


@dataclass(frozen=True)
class ReplicateConfig:
    """the papers' comparison at tiny scale, CLIP arms and MLLMs (about 90 min on 2 CPU cores)

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
    grid: int = option("--grid", "digits per side of each image (3: the harder 3x3 variant, 48 px images)", 2,
                       kind=int, low=2, high=4)
    base_epochs: int = option("--base-epochs", "epochs of base pre-training (3: the weak base of earlier reports)", 20)
    lr_factors: str = option("--lr-factors", "learning-rate sweep per arm (factors of its own rate), chosen on "
                             "validation", "1,3,10,30,100")
    stage_epochs: int = option("--stage-epochs", "epochs per DMU stage (and so every arm's budget: "
                               "(experts - 1) x this + 1 epochs)", 4)
    dmu_stage_epochs: str = option("--dmu-stage-epochs", "DMU's epochs per stage tried on validation at that budget "
                                   "(router training gets the rest)", "2,3,4")
    dmu_small_clusters: str = option("--dmu-small-clusters", "DMU's small-cluster handlings tried on validation",
                                     "merge,drop,bin")
    seeds: str = option("--seeds", "seeds of the CLIP arms", "0,1,2")
    mllm_seeds: str = option("--mllm-seeds", "CLIP seeds whose towers go through LLaVA (each LLaVA run trained with "
                             "the same seed, so towers are compared seed against seed)", "0,1,2")
    stage_steps: int = option("--stage-steps", "LLaVA stage 1 and stage 2 steps", 300)
    eval_limit: int = option("--eval-limit", "lmms-eval questions per checkpoint (4,269: an accuracy's 95 percent "
                             "interval within ±1.5 points; the test split has 4 per image)",
                             questions_for_half_width(CI_HALF_WIDTH))

    def __post_init__(self):
        check_options(self)


def mllm_seeds(args: ReplicateConfig) -> list[int]:
    """--mllm-seeds, each one of --seeds (only those have towers)."""
    clip_seeds, seeds = parse_seeds(args.seeds, "--seeds"), parse_seeds(args.mllm_seeds, "--mllm-seeds")
    missing = [s for s in seeds if s not in clip_seeds]
    if missing:
        raise UserError(f"--mllm-seeds {args.mllm_seeds}: give distinct seeds of --seeds {args.seeds} (only those "
                        f"have CLIP towers); not there: {', '.join(map(str, missing))}")
    return seeds


def tower_name(arm: str, seed: int) -> str:
    """The checkpoint name of one arm's tower of one seed in the LLaVA runs and lmms-eval (`mllm_intervals` parses
    it back)."""
    return f"{arm}-seed-{seed}"


def plan(out: Path, args: ReplicateConfig) -> list[Step]:
    py = [sys.executable, "-m"]
    data, base = out / "digit-grids", out / "base"
    compare = out / "compare"
    steps = [
        *data_and_base_steps(out, args.num_train, args.num_test, args.base_epochs,
                             title=f"trained {args.base_epochs} epochs", num_val=args.num_val, grid=args.grid),
        Step("CLIP arms x seeds", [*py, "upcycle", "compare", "--base", str(base), "--data", str(data), "--out",
                                   str(compare), "--seeds", args.seeds, "--lr-factors", args.lr_factors,
                                   "--stage-epochs", str(args.stage_epochs),
                                   "--dmu-stage-epochs", args.dmu_stage_epochs,
                                   "--dmu-small-clusters", args.dmu_small_clusters], compare / "compare.md"),
    ]
    # Each arm's model of each seed at the settings chosen on validation (compare links them there); LLaVA
    # trains with the tower's seed, so dense seed s meets DMU seed s under the same LLaVA seed.
    seeds = mllm_seeds(args)
    towers = {tower_name(arm, s): compare / "towers" / arm / f"seed-{s}" for s in seeds for arm in MLLM_ARMS}
    steps += mllm_steps(out, data, towers, args.stage_steps, args.stage_steps, args.eval_limit,
                        seeds={tower_name(arm, s): s for s in seeds for arm in MLLM_ARMS})
    return steps


def run_replicate(args: ReplicateConfig) -> int:
    out = Path(args.out)
    steps = plan(out, args)  # checks the arguments before OUT is claimed with them
    claim_job(out, "replicate", {name: getattr(args, name) for name in PLAN_SETTINGS})
    start = time.time()
    timings = run_steps(out, steps, out / "timings.json")
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
    towers = [tower_name(arm, s) for s in mllm_seeds(args) for arm in MLLM_ARMS]
    intervals = mllm_intervals(lmms.parent, data=out / "digit-grids", expected=towers) if lmms.exists() else ""
    total = sum(timings.values())
    text = f"""# Tiny-scale replication: dense fine-tuning vs sparse upcycling vs DMU

Command: `{shlex.join(['bash', 'scripts/replicate.sh', *sys.argv[2:]])}`

Data: digit grids of scikit-learn's real handwritten digits, {args.num_train:,} training, {args.num_val:,}
validation and {args.num_test:,} test images ({args.grid}x{args.grid} grids, {PIXELS_PER_DIGIT * args.grid} px; the three splits' digit scans are disjoint, so test
digits are never seen in training; retrieval ranks among all {args.num_test:,} test items, which keeps R@1 far
from saturation). Base: a small CLIP (width 64, 4 layers per tower, patch 8) trained from scratch for
{args.base_epochs} epochs on the same captions. Every arm then gets the same extra budget, with its learning rate
chosen on the validation split (factors {args.lr_factors} of its own rate); DMU's budget is {args.stage_epochs}
epochs per MCL stage + 1 of router training, and DMU also chooses on validation its epochs per stage
({args.dmu_stage_epochs}, routers taking the rest) and its small-cluster handling ({args.dmu_small_clusters}).

{compare_md}

## MLLM comparison (LLaVA with a tiny Llama, towers of seeds {args.mllm_seeds} at the settings chosen on validation, digit-grid QA via lmms-eval)

Stage 1 (projector) and stage 2 (projector + LLM, one-word digit questions) with {args.stage_steps} steps each,
identical settings for every tower; LLaVA's seed is the tower's.

{intervals}

lmms-eval's own table:

{mllm}

## Run

Wall time of the steps: {total / 60:.1f} min (this invocation {seconds / 60:.1f} min). Machine:
{platform.machine()}, {torch.get_num_threads()} threads; Python {platform.python_version()}, torch
{torch.__version__}, transformers {transformers.__version__}.
"""
    return write_atomic(out / "report.md", lambda tmp: tmp.write_text(text))


def question_groups(data: Path) -> dict[str, str]:
    """lmms-eval doc_id -> the id of the grid the question is about, from data/test_qa.json: the digit-grid task
    lists one document per question, record by record and turn by turn, so doc_id counts the questions in that
    order (mllm_bridge's `qa_documents` writes them so). {} when the file is missing."""
    path = data / "test_qa.json"
    if not path.is_file():
        return {}
    groups, doc = {}, 0
    for record in json.loads(path.read_text()):
        for _ in range(len(record.get("conversations", [])) // 2):
            groups[str(doc)] = record["id"]
            doc += 1
    return groups


def split_tower(name: str) -> tuple[str, int | None]:
    """`tower_name`'s inverse: "dmu-seed-2" -> ("dmu", 2); a name without a seed -> (name, None)."""
    arm, sep, seed = name.rpartition("-seed-")
    return (arm, int(seed)) if sep and seed.isdigit() else (name, None)


def mllm_intervals(lmms: Path, reference: str = MLLM_ARMS[0], data: Path | None = None,
                   expected: list[str] | tuple[str, ...] = ()) -> str:
    """Markdown: each tower's accuracy with its 95% interval and its paired difference from `reference`
    (the same questions, matched by lmms-eval doc_id, and the same seeds), from the per_question.json `eval-lmms`
    writes in `lmms`. Towers named ARM-seed-S are pooled per arm, seed s against seed s; with `data`, the questions
    about one image are resampled together. A tower of `expected` (the towers the plan evaluated) or of the file
    without per-question hits for a table's metric gets a row saying so, never silently left out."""
    path = lmms / "per_question.json"
    if not path.is_file():
        return (f"No per-question results in {lmms} (written by an older `eval-lmms`), so no intervals; delete "
                f"{lmms} and run again to get them.")
    checkpoints = json.loads(path.read_text())["checkpoints"]
    rows = dict.fromkeys((task, metric) for per in checkpoints.values() for task, metrics in per.items()
                         for metric in metrics)
    if not rows:
        return f"{path} holds no per-question results (every run failed?), so no intervals."
    groups = question_groups(data) if data is not None else {}
    tables = []
    for task, metric in rows:
        hits = {name: per[task][metric] for name, per in checkpoints.items() if metric in per.get(task, {})}
        missing = {name: ("not in per_question.json: its lmms-eval run wrote no per-question results" if name not in
                          checkpoints else f"per_question.json holds no `{task}` {metric} for it")
                   for name in dict.fromkeys([*expected, *checkpoints]) if name not in hits}
        tables.append(_interval_table(task, metric, hits, reference, groups, missing))
    return "\n\n".join(tables)


def _interval_table(task: str, metric: str, hits: dict[str, dict[str, int]], reference: str,
                    groups: dict[str, str] | None = None, missing: dict[str, str] | None = None) -> str:
    """One task's table: rows are arms (towers ARM-seed-S pooled over their seeds); `hits` maps a tower to
    {doc_id: 0/1}; `groups` maps doc_id to its image (questions of one image are resampled together); `missing`
    maps each tower without hits to why, one row each (an arm missing a seed is pooled over the others)."""
    # The CLIP comparison's wording (higher/lower only when 0 is excluded); imported here: compare loads torch.
    from .compare.report import difference_cell

    arms: dict[str, dict[int | None, dict[str, int]]] = {}
    for name, per in hits.items():
        arm, seed = split_tower(name)
        arms.setdefault(arm, {})[seed] = per
    common = sorted(set.intersection(*(set(per) for per in hits.values())), key=int)
    grouped = bool(groups) and all(d in groups for d in common)
    asked, needed = len(common), questions_for_half_width(CI_HALF_WIDTH)
    resampled = ("whole images (all questions about one grid together, a cluster bootstrap)" if grouped
                 else "the questions")
    seeded = [sorted(seeds) for seeds in arms.values() if None not in seeds]
    if seeded:
        seeds_text = (f"LLaVA runs per tower: seeds {', '.join(map(str, seeded[0]))}, each trained with its CLIP "
                      "tower's seed; every resample averages an arm's seeds and pairs seed s with seed s, so the "
                      "intervals cover the test images and these training seeds, not others")
    else:
        seeds_text = "One LLaVA run per tower, so the intervals cover the choice of questions, not training seeds"
    note = (f"`{task}` {metric} in percent on the {asked:,} questions every tower answered, with 95% Wilson score "
            f"intervals at the effective number of questions a bootstrap resampling {resampled} finds. Differences "
            f"from `{reference}` are paired: both on the same resampled questions, 95% percentile bootstrap "
            f"intervals ({RESAMPLES:,} resamples). {seeds_text}. One is called higher or lower only when its "
            f"interval excludes 0 and the two differ on at least {MIN_INFORMATIVE} resampled units (else: n too "
            "small to call).")
    lines = [note, ""]
    if asked < needed:
        lines += [(f"Only {asked:,} questions: an accuracy's interval can reach "
                   f"±{100 * 1.96 * math.sqrt(0.25 / asked):.1f} points, more than the ±{100 * CI_HALF_WIDTH:.1f} "
                   f"aimed for; raise --eval-limit to {needed:,} (and --num-test to a quarter of that or more: 4 "
                   "questions per test image)."), ""]
    absent = [f"| {name} | {'-' if split_tower(name)[1] is None else split_tower(name)[1]} | 0 | left out: {why} | "
              "- |" for name, why in (missing or {}).items()]
    if not common:
        return "\n".join(lines + ["No question was answered by every tower, so no intervals.", "", *absent])
    labels = [groups[d] for d in common] if grouped else None
    lines += [f"| tower | seeds | questions | {metric} [95% CI] | − {reference} [95% CI] (paired) |",
              "|---|---|---|---|---|"]

    def matrix(per_seed: dict, seeds: list) -> list[list[int]]:
        return [[per_seed[s][d] for d in common] for s in seeds]

    ref = arms.get(reference)
    for arm, per_seed in arms.items():
        seeds = sorted(per_seed, key=lambda s: -1 if s is None else s)
        ci = proportion_ci(matrix(per_seed, seeds), groups=labels)
        cells = [arm, ", ".join("-" if s is None else str(s) for s in seeds), f"{ci.items:,}",
                 f"{100 * ci.estimate:.1f} [{100 * ci.low:.1f}, {100 * ci.high:.1f}]"]
        if ref is None:
            cells.append(f"no `{reference}` results")
        elif arm == reference:
            cells.append("reference")
        elif set(per_seed) != set(ref):
            cells.append(f"seeds differ from `{reference}`'s, so no paired difference")
        else:
            diff = paired_difference_ci(matrix(per_seed, seeds), matrix(ref, seeds), groups=labels)
            cells.append(difference_cell(diff))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines + absent)
