"""`python -m upcycle compare`: every arm x seed from one base, equal budgets, results resumable.

Each arm/seed folder records the settings that shape it (`settings.json`, written before training starts) and
leaves `result.json` when it finishes; a re-run with the same settings skips finished arms and resumes unfinished
training from its checkpoints, so an interrupted comparison never recomputes finished work (an arm finished
before per-query hits were recorded is evaluated again, not retrained). A re-run with other settings (another
learning rate, base or data) stops with one line naming what differs.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch

from encoder.utils.errors import UserError
from encoder.utils.files import check_output_parent, file_sha256, write_atomic
from encoder.utils.step_record import claim

from .arms import ARMS, ArmSettings, CompareConfig, arm_settings, loss_curve, train_arm
from .measure import forward_ms_per_image, metrics_on_test_split
from .report import arms_legend, intervals_section, loss_plot, positions_table, results_table


def run_arm(arm: str, seed: int, base_dir: Path, data_dir: Path, out: Path, settings: ArmSettings,
            inputs: dict[str, str]) -> dict:
    folder = out / "arms" / arm / f"seed-{seed}"
    done = folder / "result.json"
    claim(folder, arm_settings(arm, seed, settings, inputs),
          f"use another --out, or delete {folder} to retrain this arm with the new settings")
    if done.exists():
        result = json.loads(done.read_text())
        if "hits" in result:
            return result
        # finished before per-query hits were recorded: evaluate the trained model again (no training)
        result.update(metrics_on_test_split(result["model"], data_dir / "test.json"))
    else:
        start = time.time()
        trained = train_arm(arm, seed, base_dir, data_dir / "train.json", folder, settings)
        result = {"arm": arm, "seed": seed, **trained, "base_sha256": file_sha256(base_dir / "model.safetensors"),
                  "train_seconds": round(time.time() - start, 1),
                  **metrics_on_test_split(trained["model"], data_dir / "test.json")}
        folder.mkdir(parents=True, exist_ok=True)
    write_atomic(done, lambda tmp: tmp.write_text(json.dumps(result, indent=1) + "\n"))
    return result


def check_fairness(results: dict[str, list[dict]], settings: ArmSettings, num_train: int) -> int:
    """Every trained arm saw the same number of pairs and every arm started from the same base weights."""
    budget = settings.budget_epochs * num_train
    for arm, runs in results.items():
        for r in runs:
            want = 0 if arm == "base" else budget
            if r["pairs_seen"] != want:
                raise AssertionError(f"unequal budget: {arm} seed {r['seed']} saw {r['pairs_seen']} pairs, "
                                     f"expected {want}")
    bases = {r["base_sha256"] for runs in results.values() for r in runs}
    if len(bases) != 1:
        raise AssertionError(f"arms started from different base weights: {sorted(bases)}")
    return budget


def run_compare(args: CompareConfig) -> int:
    base_dir, data_dir, out = Path(args.base), Path(args.data), Path(args.out)
    check_output_parent(out / "compare.json")  # before hours of training the arms, not after
    for needed in (base_dir / "model.safetensors", data_dir / "train.json", data_dir / "test.json"):
        if not needed.is_file():
            raise UserError(f"{needed} not found; --base must be a CLIP directory and --data a digit-grid "
                            "directory (python -m upcycle make-digit-grids)")
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS]
    if unknown or not arms:
        raise UserError(f"--arms {args.arms!r}: unknown {unknown}; choose from {', '.join(ARMS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    settings = args.settings
    start = time.time()
    inputs = {"base_sha256": file_sha256(base_dir / "model.safetensors"),
              "train_sha256": file_sha256(data_dir / "train.json"), "test_sha256": file_sha256(data_dir / "test.json")}
    results = {arm: [run_arm(arm, s, base_dir, data_dir, out, settings, inputs)
                     for s in (seeds if arm != "base" else [0])] for arm in arms}
    num_train = len(json.loads((data_dir / "train.json").read_text()))
    budget = check_fairness(results, settings, num_train)
    ms = forward_ms_per_image({arm: runs[0]["model"] for arm, runs in results.items()},
                              json.loads((base_dir / "config.json").read_text())["vision_config"]["image_size"])
    plot = loss_plot({arm: loss_curve(out / "arms" / arm / f"seed-{seeds[0]}", arm) for arm in arms if arm != "base"},
                     out / "training_loss.png", f"training loss, seed {seeds[0]}")
    summary = {"arms": arms, "seeds": seeds, "budget_pairs": budget, "settings": vars(settings),
               "ms_per_image": ms, "results": results}
    write_atomic(out / "compare.json", lambda tmp: tmp.write_text(json.dumps(summary, indent=1) + "\n"))
    report = render(results, ms, settings, budget, seeds, num_train, plot.name, time.time() - start)
    write_atomic(out / "compare.md", lambda tmp: tmp.write_text(report))
    print(report)
    print(f"\ncomparison written to {out / 'compare.md'}")
    return 0


def render(results, ms, settings: ArmSettings, budget: int, seeds, num_train: int, plot: str, seconds: float) -> str:
    return "\n".join([
        "## CLIP arms on the digit-grid test split",
        "",
        arms_legend(results),
        "",
        f"Every trained arm saw {budget:,} image-text pairs ({settings.budget_epochs} epochs of {num_train:,}: "
        f"DMU = {settings.num_experts - 1} MCL stages x {settings.stage_epochs} + {settings.router_epochs} of router "
        f"training), all from the same base weights (checked). Metrics in percent, mean ± std over seeds "
        f"{', '.join(map(str, seeds))}; MoE arms use top-{settings.top_k} of {settings.num_experts} experts. "
        "Forward time: vision tower, batch 32, median of 7 interleaved rounds in one process.",
        "",
        results_table(results, ms),
        "",
        intervals_section(results),
        "",
        "Zero-shot digit accuracy per grid position (chance 10%):",
        "",
        positions_table(results),
        "",
        f"![training loss]({plot})",
        "",
        "DMU's MCL-stage losses come from within-cluster batches (harder negatives) with label smoothing 0.1, so "
        "their level is not comparable with the other curves; compare the test metrics.",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
        f"{torch.__version__}; this step took {seconds / 60:.1f} min (finished arms are reused on re-runs).",
        "",
    ])
