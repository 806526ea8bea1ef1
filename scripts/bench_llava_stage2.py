"""LLaVA stage-2 step time and image tokens per sample: --image_aspect_ratio pad vs anyres, frozen vs trained tower.

The parts are the embedded default's (`mllm_bridge/embedded/training.py` ensure_assets: a tiny Llama, the small
CLIP-MoE vision tower with top-2 of 4 experts in every layer, 32 px crops) and its stage-2 flags (batch 16,
learning rate 5e-4, the loop's other defaults), on digit grids of three shapes (`make-digit-grids --shapes
2x2,1x2,2x1 --image-size 64`: one 32 px tower crop per digit, so 64x64, 64x32 and 32x64 px), which anyres cuts
into 2x2, 2x1 and 1x2 crops (pad: one crop each):

  pad              LLaVA-1.5: each image padded to a square and resized to one crop
  anyres           LLaVA-1.6: --image_aspect_ratio anyres --mm_patch_merge_type spatial_unpad
                   --image_grid_pinpoints "(1x1),...,(2x2)" (the global view plus the crops of the best-fitting
                   pinpoint, padding rows/columns dropped, image_newline after each row)
  pad_trained      pad with --unfreeze_mm_vision_tower True: the tower trains too, the routers' balance and z
  anyres_trained   losses join the LM loss (only where mllm_bridge.train has the flag: the JSON's "trained_tower"
                   says whether this build compared it)

Every run is built in this one process by the training loop's own code (`prepare_run`), and timed on its own
optimizer step (data loading, forward, backward, clipping, optimizer and scheduler step) in interleaved rounds:
warm-up steps, then every run once per round in a rotating order, median over rounds. The ratios are therefore
fair on a shared machine; "paired" ratios take the median of per-round ratios. All runs see the same batches (same
seed, same data). Nothing is written under --work but the data, the embedded parts and empty run folders.

    python scripts/bench_llava_stage2.py [--work runs/bench-llava-stage2] [--repeats 5] [--output FILE]

Prints one JSON object on stdout; progress goes to stderr. No timing is asserted anywhere.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHAPES = "2x2,1x2,2x1"  # rows x columns of digits: the three image shapes
PINPOINTS = "(1x1),...,(2x2)"  # LLaVA-NeXT's range form, in crops of the tower's image size
ANYRES = {"image_aspect_ratio": "anyres", "mm_patch_merge_type": "spatial_unpad", "image_grid_pinpoints": PINPOINTS}
LAYOUTS = {"pad": {"image_aspect_ratio": "pad"}, "anyres": ANYRES}
TRAIN_TOWER = {"unfreeze_mm_vision_tower": True}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def can_train_tower() -> bool:
    """Whether this build's stage 2 has --unfreeze_mm_vision_tower (LLaVA-NeXT's flag)."""
    from mllm_bridge.train.arguments import ModelArguments

    return "unfreeze_mm_vision_tower" in {f.name for f in fields(ModelArguments)}


def run_flags(llm: Path, tower: Path, data: Path, out: Path, batch: int, steps: int, learning_rate: float,
              extra: dict) -> list[str]:
    values = dict(model_name_or_path=llm, vision_tower=tower, data_path=data / "train_qa.json", image_folder=data,
                  output_dir=out, per_device_train_batch_size=batch, max_steps=steps, learning_rate=learning_rate,
                  save_strategy="no", report_to="none", seed=0, **extra)
    return [item for key, value in values.items() for item in (f"--{key}", str(value))]


def build_run(flags: list[str]):
    """The stage-2 trainer of `flags` and a function that runs one optimizer step of it, as its loop does."""
    from encoder.training.sampler import endless_batches
    from mllm_bridge.train.arguments import split_arguments
    from mllm_bridge.train.cli import build_parser
    from mllm_bridge.train.run import prepare_run

    trainer, _ = prepare_run(split_arguments(build_parser().parse_args(["finetune", *flags])))
    trainer.model.train()
    batches = endless_batches(trainer.loader, trainer.sampler, 0)
    return trainer, lambda: trainer._optimizer_step(batches)  # the loop's own step (TrainingLoop.run calls it)


def token_counts(trainer) -> dict:
    """Image tokens per sample (mean over the data), LLM positions per sample (text + image) and image tokens per
    image shape, from the run's own ImageLayout and dataset, as the model embeds them."""
    from PIL import Image

    dataset = trainer.loader.dataset
    image_tokens, positions, by_shape = [], [], {}
    for i, sample in enumerate(dataset.samples):
        with Image.open(sample.image) as im:
            size = im.size
        count = dataset.layout.count(size)
        image_tokens.append(count)
        positions.append(len(dataset[i]["input_ids"]) - 1 + count)
        by_shape[f"{size[0]}x{size[1]}"] = count
    return {"image_tokens_per_sample": round(statistics.mean(image_tokens), 3),
            "llm_positions_per_sample": round(statistics.mean(positions), 3),
            "image_tokens_per_image_shape (width x height)": by_shape}


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int) -> dict[str, dict]:
    """Median / min wall time in ms of each function, measured in rotating order round by round."""
    names = list(fns)
    for i in range(warmup):
        for n in names:
            fns[n]()
        log(f"  warm-up {i + 1}/{warmup} done")
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for n in names[r % len(names):] + names[: r % len(names)]:
            t0 = time.perf_counter()
            fns[n]()
            samples[n].append((time.perf_counter() - t0) * 1e3)
        log(f"  round {r + 1}/{repeats}: " + ", ".join(f"{n}={samples[n][-1]:.0f} ms" for n in names))
    return {n: {"median_ms": round(statistics.median(s), 2), "min_ms": round(min(s), 2),
                "samples_ms": [round(v, 3) for v in s]} for n, s in samples.items()}


def ratios(a: dict, b: dict) -> dict:
    return {"step_time": round(a["step_ms"]["median_ms"] / b["step_ms"]["median_ms"], 3),
            "step_time_paired": round(statistics.median(x / y for x, y in zip(a["step_ms"]["samples_ms"],
                                                                             b["step_ms"]["samples_ms"])), 3),
            "step_time_min": round(a["step_ms"]["min_ms"] / b["step_ms"]["min_ms"], 3),
            "image_tokens_per_sample": round(a["image_tokens_per_sample"] / b["image_tokens_per_sample"], 3),
            "llm_positions_per_sample": round(a["llm_positions_per_sample"] / b["llm_positions_per_sample"], 3)}


def bench_stage2(llm: str | Path, tower: str | Path, data: str | Path, work: str | Path, batch: int = 16,
                 repeats: int = 5, warmup: int = 2, learning_rate: float = 5e-4,
                 train_tower: bool | None = None) -> dict:
    """Step time and tokens per sample of every run side by side, with the anyres/pad and trained/frozen ratios.

    data: a digit-grid folder (train_qa.json, images/); work: where the runs' (empty) output folders go;
    train_tower: also the trained-tower runs (None: when this build has --unfreeze_mm_vision_tower).
    """
    import torch

    available = can_train_tower()
    if train_tower is None:
        train_tower = available
    if train_tower and not available:
        raise SystemExit("error: this build's stage 2 has no --unfreeze_mm_vision_tower; run without --train-tower")
    configs = {name: extra for name, extra in LAYOUTS.items()}
    if train_tower:
        configs.update({f"{name}_trained": {**extra, **TRAIN_TOWER} for name, extra in LAYOUTS.items()})
    steps = warmup + repeats
    runs, step_fns = {}, {}
    for name, extra in configs.items():
        log(f"[bench_llava_stage2] building {name}")
        out = Path(work) / f"llava-{name}"  # 'llava' in the name, as LLaVA's loaders want it
        flags = run_flags(Path(llm), Path(tower), Path(data), out, batch, steps, learning_rate, extra)
        with contextlib.redirect_stdout(sys.stderr):  # the run's notes stay off the JSON
            trainer, step = build_run(flags)
        runs[name] = {"flags": shlex.join(flags[flags.index("--per_device_train_batch_size"):]),
                      "trainable_parameters": sum(p.numel() for p in trainer.trainable),
                      **token_counts(trainer)}
        step_fns[name] = step
    log(f"[bench_llava_stage2] timing {len(step_fns)} runs: {warmup} warm-up + {repeats} timed steps each")
    for name, timing in interleaved(step_fns, repeats, warmup).items():
        runs[name]["step_ms"] = timing
        runs[name]["samples_per_s"] = round(batch / (timing["median_ms"] / 1e3), 2)
    result: dict = {"runs": runs, "ratios": {"anyres / pad (frozen tower)": ratios(runs["anyres"], runs["pad"])}}
    if train_tower:
        result["ratios"]["trained / frozen tower (pad)"] = ratios(runs["pad_trained"], runs["pad"])
        result["ratios"]["trained / frozen tower (anyres)"] = ratios(runs["anyres_trained"], runs["anyres"])
        result["ratios"]["anyres / pad (trained tower)"] = ratios(runs["anyres_trained"], runs["pad_trained"])
        result["trained_tower"] = "compared (--unfreeze_mm_vision_tower True)"
    else:
        result["trained_tower"] = ("not compared: " + ("this build's stage 2 has no --unfreeze_mm_vision_tower"
                                                       if not available else "--no-train-tower"))
    result["timing"] = {"repeats": repeats, "warmup": warmup, "batch": batch, "threads": torch.get_num_threads(),
                        "method": "one optimizer step per run per round, rotating order; median (and min) wall time",
                        "step_time": "median of a / median of b",
                        "step_time_paired": "median over rounds of a / b within a round",
                        "step_time_min": "fastest a / fastest b: the steps least slowed by other load"}
    return result


def make_data(out: Path, num_train: int) -> None:
    """Digit grids of three shapes, 32 px per digit: the tower's crop size, so each digit is one anyres crop (the
    embedded default's own 32 px 2x2 grids would fit one crop whatever their shape)."""
    if (out / "train_qa.json").is_file():
        return
    command = [sys.executable, "-m", "upcycle", "make-digit-grids", "--out", str(out), "--num-train", str(num_train),
               "--num-val", "0", "--num-test", "0", "--image-size", "64", "--grid", "2", "--shapes", SHAPES,
               "--overwrite"]
    log(f"[bench_llava_stage2] python {shlex.join(command[1:])}")
    subprocess.run(command, check=True, stdout=sys.stderr)


def git_version() -> str:
    """The commit measured ("-dirty": with uncommitted changes), or "unknown" outside a git checkout."""
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        return subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    return "unknown"


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.machine()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-llava-stage2",
                   help="where the embedded parts, the data and the runs' folders go (reused on later runs)")
    p.add_argument("--repeats", type=int, default=5, help="timed steps per run (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per run before timing")
    p.add_argument("--batch", type=int, default=16, help="samples per step (the embedded stage 2's: 16)")
    p.add_argument("--num-train", type=int, default=240, help="digit grids in the benchmark's data")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    tower = p.add_mutually_exclusive_group()
    tower.add_argument("--train-tower", dest="train_tower", action="store_true", default=None,
                       help="also time the trained-tower runs (default: when stage 2 has --unfreeze_mm_vision_tower)")
    tower.add_argument("--no-train-tower", dest="train_tower", action="store_false", help="only pad vs anyres")
    p.add_argument("--output", type=Path, help="also write the JSON to this file")
    p.add_argument("--note", help="free text stored in the JSON (e.g. what else ran on the machine)")
    args = p.parse_args(argv)
    for flag in ("repeats", "batch", "num_train", "threads"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be 1 or more")
    if args.warmup < 0:
        p.error("--warmup must be 0 or more")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch
    import transformers

    from mllm_bridge.embedded.training import ensure_assets

    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    with contextlib.redirect_stdout(sys.stderr):  # the builders' progress lines stay off the JSON
        assets = ensure_assets(args.work / "assets")
        make_data(args.work / "data", args.num_train)
    result: dict = {
        "benchmark": "scripts/bench_llava_stage2.py",
        "command": shlex.join(["python", "scripts/bench_llava_stage2.py", *(sys.argv[1:] if argv is None else argv)]),
        "parts": {"llm": "embedded default tiny Llama", "tower": "embedded default CLIP-MoE vision tower",
                  "data": f"make-digit-grids --shapes {SHAPES} --image-size 64 --grid 2 ({args.num_train} samples)"},
        "code": git_version(),
        "machine": f"{os.cpu_count()}-core CPU ({cpu_model()})",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
    if args.note:
        result["note"] = args.note
    result["loadavg_1min_start"] = round(os.getloadavg()[0], 2)
    result.update(bench_stage2(assets.llm, assets.tower, args.work / "data", args.work / "runs", args.batch,
                               args.repeats, args.warmup, train_tower=args.train_tower))
    result["loadavg_1min_end"] = round(os.getloadavg()[0], 2)
    text = json.dumps(result, indent=2)
    if args.output is not None:  # renamed into place: an earlier result stays whole if this write fails
        from encoder.utils.files import write_atomic

        write_atomic(args.output, lambda tmp: tmp.write_text(text + "\n"), flag="--output")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
