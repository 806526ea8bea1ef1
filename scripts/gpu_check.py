"""The GPU check: what only a CUDA device can show, in one command of a few minutes on one GPU.

1. the tests marked `cuda` (the grouped_mm expert path in bf16 against the CPU reference, ...);
2. scripts/bench_moe.py on CUDA in bf16 at ViT-L/14-336 shapes: MoE FFN / dense 2h, tower / ideal, images/s;
3. one bf16 step of DMU (stage and router training, small digit-grid base) and of LLaVA stage 1 (the embedded
   default's parts), each with its final loss, which must be finite.

Writes one JSON (device name, versions, each part's outcome and wall time) atomically to --out and prints it.
Exit status 0 only when every part passed. Without a visible CUDA device: one line, exit 2, nothing written. An
interpreter that lacks what the check runs (torch, transformers, ...): one line naming it, exit 3, nothing written.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NEEDED = ("torch", "transformers", "accelerate", "safetensors", "pytest")  # what the parts import
NO_CUDA, CANNOT_RUN = 2, 3  # exit statuses of the two refusals


def missing_modules(names: tuple[str, ...] = NEEDED) -> list[str]:
    """The modules of `names` this interpreter cannot import (found without importing them)."""
    return [name for name in names if importlib.util.find_spec(name) is None]


def run(name: str, argv: list[str], log_dir: Path, timeout: int) -> dict:
    """Run one part in a subprocess, keep its log, return outcome and wall time."""
    start = time.perf_counter()
    log = log_dir / f"{name}.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "PYTHONUNBUFFERED": "1"}
    print(f"[gpu_check] {name}: {' '.join(argv)}", file=sys.stderr, flush=True)
    try:
        result = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        code, output = result.returncode, result.stdout + result.stderr
    except subprocess.TimeoutExpired as err:
        code, output = "timeout", f"{err.stdout or ''}{err.stderr or ''}\nstopped after {timeout} s"
    log.write_text(output if isinstance(output, str) else output.decode(errors="replace"))
    tail = output.strip().splitlines()[-3:] if isinstance(output, str) else []
    return {"command": " ".join(argv), "exit": code, "passed": code == 0,
            "wall_s": round(time.perf_counter() - start, 1), "tail": tail}


def last_loss(metrics: Path) -> float | None:
    """The loss of the last line of a metrics.jsonl that has one."""
    if not metrics.is_file():
        return None
    loss = None
    for line in metrics.read_text().splitlines():
        record = json.loads(line)
        for key in ("loss", "train/loss"):
            if key in record:
                loss = record[key]
    return loss


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "gpu_check.json",
                        help="the JSON written (default: docs/benchmarks/gpu_check.json)")
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    parser.add_argument("--bench-batch", type=int, default=8, help="images per batch in the benchmark (default 8)")
    args = parser.parse_args(argv)

    missing = missing_modules()
    if missing:
        print(f"error: {sys.executable} cannot import {', '.join(missing)}; run scripts/gpu_check.sh without "
              "GPU_CHECK_PYTHON (it sets up .venv), or point GPU_CHECK_PYTHON at a Python that has the project's "
              "requirements", file=sys.stderr)
        return CANNOT_RUN
    import torch

    if not torch.cuda.is_available():
        print("error: no CUDA device is visible; run scripts/gpu_check.sh on a machine with an NVIDIA GPU",
              file=sys.stderr)
        return NO_CUDA
    work = args.work or Path(tempfile.mkdtemp(prefix="clip-moe-gpu-check."))
    work.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    parts: dict[str, dict] = {}
    started = time.perf_counter()

    parts["cuda_tests"] = run("cuda_tests", [py, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider",
                                             "tests"], work, timeout=240)
    bench_json = work / "bench_moe_cuda_bf16.json"
    parts["bench_moe"] = run("bench_moe", [py, "scripts/bench_moe.py", "--device", "cuda", "--dtype", "bfloat16",
                                           "--preset", "vit-l-336", "--batch", str(args.bench_batch), "--repeats",
                                           "7", "--warmup", "3", "--output", str(bench_json)], work, timeout=240)
    if bench_json.is_file():
        bench = json.loads(bench_json.read_text())
        parts["bench_moe"]["result"] = {
            "ffn_ratios_forward": bench["ffn"]["forward"]["paired_ratios"],
            "ffn_ratios_forward_backward": bench["ffn"]["forward_backward"]["paired_ratios"],
            "tower_forward": bench["tower"]["forward"]["paired_ratios"],
            "tower_forward_backward": bench["tower"]["forward_backward"]["paired_ratios"],
            "tower_images_per_s": bench["tower"]["forward"]["images_per_s"],
            "config": bench["tower"]["config"],
        }

    grids, base, dmu = work / "grids", work / "base", work / "dmu"
    steps = [
        [py, "-m", "upcycle", "make-digit-grids", "--out", str(grids), "--num-train", "256", "--num-val", "16",
         "--num-test", "16", "--overwrite"],
        [py, "-m", "upcycle", "init-base", "--captions", str(grids / "train.json"), "--out", str(base),
         "--overwrite"],
        [py, "-m", "upcycle", "dmu", "--base", str(base), "--train-data", str(grids / "train.json"), "--out",
         str(dmu), "--num-experts", "2", "--top-k", "1", "--stage-max-steps", "1", "--router-max-steps", "1",
         "--batch-size", "32", "--precision", "bf16", "--overwrite"],
    ]
    for i, step in enumerate(steps):
        parts[f"dmu_bf16_{i}"] = run(f"dmu_bf16_{i}", step, work, timeout=240)
        if not parts[f"dmu_bf16_{i}"]["passed"]:
            break
    dmu_work = Path(f"{dmu}.dmu-work")
    losses = {str(p.parent.relative_to(dmu_work)): last_loss(p) for p in sorted(dmu_work.rglob("metrics.jsonl"))}
    parts["dmu_bf16_losses"] = {"losses": losses, "passed": bool(losses) and all(
        v is not None and math.isfinite(v) for v in losses.values())}

    stage1 = work / "llava"
    parts["stage1_bf16"] = run("stage1_bf16", [py, "-m", "mllm_bridge.train", "pretrain", "--embedded_dir",
                                               str(stage1), "--max_steps", "2", "--bf16", "True", "--tf32", "True"],
                               work, timeout=300)
    stage1_losses = [last_loss(p) for p in stage1.rglob("metrics.jsonl")]
    parts["stage1_bf16"]["final_loss"] = stage1_losses[0] if stage1_losses else None
    parts["stage1_bf16"]["passed"] &= bool(stage1_losses) and all(
        v is not None and math.isfinite(v) for v in stage1_losses)

    import transformers

    report = {
        "check": "scripts/gpu_check.sh",
        "device": torch.cuda.get_device_name(0),
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
        "wall_s": round(time.perf_counter() - started, 1),
        "passed": all(part.get("passed", False) for part in parts.values()),
        "parts": parts,
        "logs": str(work),
    }
    text = json.dumps(report, indent=2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    tmp.write_text(text + "\n")
    tmp.replace(args.out)
    print(text)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
