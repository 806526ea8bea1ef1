"""What each rank holds under each engine: LLaVA stage 2 on the embedded default's tiny models, 1 process vs
2 processes under DDP, DeepSpeed ZeRO-2, ZeRO-3 and FSDP2 (CPU processes over gloo here; GPUs the same way).

Each run trains 3 steps and writes checkpoint-2, whose trainer_state.json records per rank, from the engine's own
records: the weights it holds (DeepSpeed's partitions, FSDP2's local shards), the elements of Adam's moments it
holds, and the peak resident memory of the process. No timing is measured.

    python scripts/bench_engines.py [--work runs/bench-engines] [--per-device 4]

Prints one JSON object on stdout (per engine: the per-rank values and their ratio to the one-process run) and a
Markdown table on stderr. At this scale the resident memory is mostly Python and torch themselves, and the frozen
tower (kept whole on every rank) is over half of the weights; the weight and optimizer columns are what sharding
changes, and the engine's share of them scales with the LLM.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no"]
RUNS = {  # name -> (launcher, the run's own extra flags)
    "1 process": ([sys.executable], []),
    "DDP x2": ([*ACCELERATE, "--multi_gpu"], []),
    "ZeRO-2 x2": ([*ACCELERATE, "--multi_gpu"], ["--deepspeed", str(ROOT / "scripts" / "zero2.json")]),
    "ZeRO-3 x2": ([*ACCELERATE, "--multi_gpu"], ["--deepspeed", str(ROOT / "scripts" / "zero3.json")]),
    "FSDP2 x2": ([*ACCELERATE, "--use_fsdp", "--fsdp_version", "2"], []),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=str(ROOT / "runs" / "bench-engines"), help="where runs are written")
    parser.add_argument("--per-device", type=int, default=4, help="per-device batch of the 2-process runs (the "
                        "one-process run takes twice as many, so every run has the same global batch)")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from mllm_bridge.embedded.training import ensure_assets

    work = Path(args.work)
    with stdout_to_stderr():  # the builders' progress lines (theirs and their subprocesses') stay off the JSON
        assets = ensure_assets(work / "assets")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    results = {}
    for name, (launcher, extra) in RUNS.items():
        out = work / name.replace(" ", "-").lower()
        shutil.rmtree(out, ignore_errors=True)
        per_device = args.per_device * (2 if launcher == [sys.executable] else 1)
        flags = ["--model_name_or_path", assets.llm, "--vision_tower", assets.tower, "--data_path",
                 assets.data / "train_qa.json", "--image_folder", assets.data, "--output_dir", out,
                 "--per_device_train_batch_size", per_device, "--max_steps", 3, "--save_steps", 2,
                 "--gradient_checkpointing", False, "--report_to", "none", "--seed", 0, *extra]
        print(f"[bench_engines] {name}", file=sys.stderr, flush=True)
        run = subprocess.run([*launcher, "-m", "mllm_bridge.train", "finetune", *map(str, flags)], env=env,
                             capture_output=True, text=True, check=False)
        if run.returncode:
            print(run.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"error: the {name} run failed (exit {run.returncode})")
        state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
        results[name] = {key: state[key] for key in ("engine", "parameters_total", "parameters_held_per_rank",
                                                     "optimizer_state_held_per_rank", "peak_memory_mib_per_rank",
                                                     "vision_tower_parameters")}
    for values in results.values():
        # Under ZeRO-3 / FSDP2 the frozen tower is kept whole on every rank outside the engine: counted here.
        outside = values["vision_tower_parameters"] if values["engine"] in ("deepspeed-zero3", "fsdp2") else 0
        values["weights_per_rank"] = [n + outside for n in values["parameters_held_per_rank"]]
    alone = results["1 process"]
    for values in results.values():
        for key in ("weights_per_rank", "optimizer_state_held_per_rank", "peak_memory_mib_per_rank"):
            values[key.replace("_per_rank", "_ratio_to_1_process")] = round(max(values[key]) / alone[key][0], 3)
    print(json.dumps(results, indent=1))
    print(table(results), file=sys.stderr)
    return 0


@contextlib.contextmanager
def stdout_to_stderr():
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def table(results: dict) -> str:
    lines = ["| run | engine | weights per rank (in the engine + the tower outside it) | Adam moments per rank | "
             "peak RSS per rank (MiB) |", "|---|---|---|---|---|"]
    for name, v in results.items():
        outside = v["weights_per_rank"][0] - v["parameters_held_per_rank"][0]
        held = " / ".join(f"{n:,}" for n in v["parameters_held_per_rank"]) + (f" + {outside:,}" if outside else "")
        moments = " / ".join(f"{n:,}" for n in v["optimizer_state_held_per_rank"])
        rss = " / ".join(f"{m:,.0f}" for m in v["peak_memory_mib_per_rank"])
        lines.append(f"| {name} | {v['engine']} | {held} ({v['weights_ratio_to_1_process']:.2f}x) | "
                     f"{moments} ({v['optimizer_state_held_ratio_to_1_process']:.2f}x) | {rss} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
