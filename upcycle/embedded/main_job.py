"""The embedded main job: the whole product on a CPU, from real handwriting to an MLLM benchmark table.

digit-grid data -> a small dense CLIP trained from scratch (the "pretrained base") -> a CLIP-MoE by DMU ->
LLaVA stage 1 and stage 2 with a tiny Llama, once with the dense tower and once with the CLIP-MoE tower ->
lmms-eval on the digit-grid QA task for both -> report.md with tables and plots.

Every step is the command a user would type, run through the step runner of `steps.py` (shared with
`upcycle replicate`): a re-run skips exactly the steps that finished with the same command line, so an
interrupted run continues where it stopped and a failed step is never taken for done. The job's sizes are
recorded in OUT/settings.json: a run with other sizes (e.g. --quick over a full run) stops with one line instead
of mixing the two. mllm_bridge is only ever run, never imported, which keeps the packages' dependency direction
(upcycle -> encoder <- mllm_bridge).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from encoder.utils.options import option, switch

from .steps import Step, claim_job, run_steps


@dataclass(frozen=True)
class Sizes:
    """How big each part of the job is; `quick` is the shortened run the test suite makes."""

    num_train: int = 2000
    num_test: int = 200
    base_epochs: int = 20
    batch_size: int = 64
    dmu_stage_epochs: int = 2
    stage1_steps: int = 400
    stage2_steps: int = 400
    eval_limit: int = 200


QUICK = Sizes(num_train=96, num_test=32, base_epochs=1, batch_size=16, dmu_stage_epochs=1, stage1_steps=2,
              stage2_steps=2, eval_limit=4)
TOWERS = ("dense", "clip-moe")


def plan(out: Path, sizes: Sizes) -> list[Step]:
    """The job's commands in order."""
    py = [sys.executable, "-m"]
    data, base, moe = out / "digit-grids", out / "base", out / "clip-moe"
    towers = {"dense": base, "clip-moe": moe}
    steps = [
        *data_and_base_steps(out, sizes.num_train, sizes.num_test, sizes.base_epochs, sizes.batch_size),
        Step("CLIP-MoE by DMU", [*py, "upcycle", "dmu", "--base", str(base), "--train-data", str(data / "train.json"),
                                 "--out", str(moe), "--num-experts", "4", "--top-k", "2",
                                 "--stage-epochs", str(sizes.dmu_stage_epochs), "--router-epochs", "1",
                                 "--batch-size", str(sizes.batch_size), "--lr", "2e-4", "--router-lr", "1e-3",
                                 "--logit-scale", "learnable", "--resume"], moe / "config.json"),
    ]
    for name, tower in towers.items():
        steps.append(Step(f"retrieval: {name}", [*py, "upcycle", "eval", "--model", str(tower), "--data",
                                                  str(data / "test.json"), "--digit-positions", "--out",
                                                  str(out / "eval" / f"{name}.json")], out / "eval" / f"{name}.json"))
    steps.append(Step("expert usage", [*py, "upcycle", "routing", "--model", str(moe), "--data", str(data / "test.json"),
                                       "--out-png", str(out / "report" / "expert_usage.png"),
                                       "--out-json", str(out / "eval" / "routing.json")], out / "eval" / "routing.json"))
    steps += mllm_steps(out, data, towers, sizes.stage1_steps, sizes.stage2_steps, sizes.eval_limit)
    return steps


PIXELS_PER_DIGIT = 16  # two 8 px patches per digit side: 2x2 grids are 32 px images, 3x3 grids 48 px


def data_and_base_steps(out: Path, num_train: int, num_test: int, base_epochs: int, batch_size: int = 64,
                        title: str = "trained from scratch", num_val: int = 0, grid: int = 2) -> list[Step]:
    """Digit grids under OUT/digit-grids (`num_val` validation grids from their own digits, for choosing settings;
    `grid` digits per side) and a small CLIP trained on them from scratch into OUT/base."""
    py = [sys.executable, "-m"]
    data, base_init, base = out / "digit-grids", out / "base-init", out / "base"
    size = str(PIXELS_PER_DIGIT * grid)
    return [
        Step("data", [*py, "upcycle", "make-digit-grids", "--out", str(data), "--num-train", str(num_train),
                      "--num-val", str(num_val), "--num-test", str(num_test), "--image-size", size,
                      *(["--grid", str(grid)] if grid != 2 else [])], data / "test_qa.json", clean=data),
        Step("base: a small CLIP", [*py, "upcycle", "init-base", "--captions", str(data / "train.json"),
                                    "--out", str(base_init), "--width", "64", "--layers", "4", "--image-size", size],
             base_init / "config.json", clean=base_init),
        Step(f"base: {title}", [*py, "upcycle", "train", "--model", str(base_init), "--train-data",
                                str(data / "train.json"), "--out", str(base), "--trainable", "all", "--epochs",
                                str(base_epochs), "--batch-size", str(batch_size), "--lr", "1e-3",
                                "--weight-decay", "0.1", "--resume"], base / "config.json"),
    ]


def mllm_steps(out: Path, data: Path, towers: dict[str, Path], stage1_steps: int, stage2_steps: int,
               eval_limit: int, seeds: dict[str, int] | None = None) -> list[Step]:
    """A tiny LLM, LLaVA stage 1 and stage 2 for every tower with identical settings (but the training seed, when
    `seeds` gives one per tower), then lmms-eval on the digit-grid QA task for all of them side by side."""
    py = [sys.executable, "-m"]
    llm = out / "llm"
    steps = [Step("tiny LLM", [*py, "mllm_bridge", "make-tiny-llm", "--data", str(data), "--out", str(llm)],
                  llm / "config.json", clean=llm)]
    seed = {name: ["--seed", str(seeds[name])] if seeds and name in seeds else [] for name in towers}
    for name, tower in towers.items():
        stage1, stage2 = out / f"llava-{name}-pretrain", out / f"llava-{name}-finetune"
        steps.append(Step(f"LLaVA stage 1: {name} tower", [
            *py, "mllm_bridge.train", "pretrain", "--model_name_or_path", str(llm), "--vision_tower", str(tower),
            "--data_path", str(data / "train.json"), "--output_dir", str(stage1), "--max_steps",
            str(stage1_steps), "--per_device_train_batch_size", "16", "--learning_rate", "1e-3",
            "--dataloader_num_workers", "0", *seed[name]], stage1 / "mm_projector.bin"))
        steps.append(Step(f"LLaVA stage 2: {name} tower", [
            *py, "mllm_bridge.train", "finetune", "--model_name_or_path", str(llm), "--vision_tower", str(tower),
            "--pretrain_mm_mlp_adapter", str(stage1 / "mm_projector.bin"), "--data_path",
            str(data / "train_qa.json"), "--output_dir", str(stage2), "--max_steps", str(stage2_steps),
            "--per_device_train_batch_size", "16", "--learning_rate", "5e-4", "--dataloader_num_workers", "0",
            *seed[name]], stage2 / "config.json"))
    tasks = out / "lmms-tasks"
    steps.append(Step("lmms-eval task from the test split", [*py, "mllm_bridge", "make-lmms-task", "--data", str(data),
                                                             "--out", str(tasks), "--split", "test"],
                      tasks / "digit_grids.parquet", clean=tasks))
    checkpoints = [a for name in towers for a in ("--checkpoint", f"{name}={out / f'llava-{name}-finetune'}")]
    steps.append(Step("lmms-eval: digit-grid QA", [
        *py, "mllm_bridge", "eval-lmms", *checkpoints, "--tasks", "digit_grids_qa", "--include-path", str(tasks),
        "--limit", str(eval_limit), "--device", "cpu", "--out", str(out / "lmms-eval")],
        out / "lmms-eval" / "summary.json", clean=out / "lmms-eval"))
    return steps


@dataclass(frozen=True)
class MainJobConfig:
    """the main job on its embedded default: data -> base -> DMU -> LLaVA -> lmms-eval

    Runs the whole product on a CPU with no downloads: digit-grid data (real handwriting), a small dense CLIP
    trained from scratch, a CLIP-MoE by DMU, LLaVA stage 1 and stage 2 with a tiny Llama for the dense and the
    CLIP-MoE tower, lmms-eval on the digit-grid QA task for both, and OUT/report/report.md. Every step is a
    printed user command; finished steps are skipped when run again.
    """

    out: str = option("--out", "working directory", "runs/demo")
    quick: bool = switch("--quick", "minimal sizes and steps (a smoke test, ~3 min)")


def run_main_job(cfg: MainJobConfig) -> int:
    from .report import write_report

    out = Path(cfg.out)
    sizes = QUICK if cfg.quick else Sizes()
    claim_job(out, "demo", dataclasses.asdict(sizes))
    steps = plan(out, sizes)
    start = time.time()
    timings = run_steps(out, steps, out / "report" / "timings.json")
    report = write_report(out, sizes, timings, time.time() - start)
    print(f"\nreport: {report}")
    return 0
