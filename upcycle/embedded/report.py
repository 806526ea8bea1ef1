"""report.md of the main job: retrieval table, MLLM table, training-loss plots and expert usage, all read from
the files the job's commands wrote (nothing is recomputed here)."""

from __future__ import annotations

import json
import platform
import statistics
from pathlib import Path

import torch

from encoder.utils.files import write_atomic

TOWER_TITLES = {"dense": "dense base (trained from scratch)", "clip-moe": "CLIP-MoE by DMU (4 experts, top-2)"}


def smooth(values: list[float], window: int = 9) -> list[float]:
    """A centred moving mean of a loss curve (shorter windows at the ends). It lives with the demo's plots and
    `upcycle compare`'s loss plot imports it from here: the research harness may use the demo, never the reverse."""
    half = window // 2
    return [statistics.mean(values[max(0, i - half):i + half + 1]) for i in range(len(values))]


def _json(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def _curve(log: Path, key: str, offset: int = 0) -> tuple[list[int], list[float]]:
    if not log.exists():
        return [], []
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if key in r]
    return [offset + int(r["step"]) for r in rows], [float(r[key]) for r in rows]


def loss_figure(out: Path, path: Path) -> Path:
    """Three panels: the base's training, DMU's stages and router training, LLaVA stage 1 and 2 per tower."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 3.6))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    xs, ys = _curve(out / "base.train-work" / "metrics.jsonl", "contrastive")
    axes[0].plot(xs, smooth(ys), label="contrastive")
    axes[0].set_title("base CLIP, trained from scratch")
    work, offset = out / "clip-moe.dmu-work", 0
    for log in [*sorted(work.glob("stage-*/train/metrics.jsonl")), work / "router" / "metrics.jsonl"]:
        xs, ys = _curve(log, "contrastive", offset)
        if xs:
            axes[1].plot(xs, smooth(ys), label=log.parent.parent.name if "stage" in str(log) else "router")
            offset = xs[-1]
    axes[1].set_title("DMU: MCL stages, then routers")
    for name in TOWER_TITLES:
        for stage in ("pretrain", "finetune"):
            xs, ys = _curve(out / f"llava-{name}-{stage}" / "metrics.jsonl", "loss")
            if xs:
                axes[2].plot(xs, smooth(ys), label=f"{name} {'stage 1' if stage == 'pretrain' else 'stage 2'}")
    axes[2].set_title("LLaVA stage 1 / stage 2")
    for ax in axes:
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss (smoothed)")
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))


def retrieval_table(out: Path) -> str:
    lines = ["| tower | I→T R@1 | I→T R@5 | T→I R@1 | T→I R@5 | digit acc. (zero-shot, per position mean) |",
             "|---|---|---|---|---|---|"]
    for name, title in TOWER_TITLES.items():
        r = _json(out / "eval" / f"{name}.json")
        if r is None:
            lines.append(f"| {title} | - | - | - | - | - |")
            continue
        cells = [f"{r[k]:.1f}" for k in ("i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5")]
        lines.append(f"| {title} | " + " | ".join(cells) + f" | {r['digit_positions']['mean']:.1f} |")
    return "\n".join(lines)


def mllm_section(out: Path) -> str:
    """lmms-eval's comparison table as its own command wrote it (results.md)."""
    table = out / "lmms-eval" / "results.md"
    if not table.exists():
        return "(lmms-eval has not run yet)"
    lines = [line for line in table.read_text().strip().splitlines() if not line.startswith("# ")]  # its title
    return "\n".join("#" + line if line.startswith("##") else line for line in lines).strip()  # one level down


def routing_table(out: Path) -> str:
    stats = _json(out / "eval" / "routing.json")
    if stats is None:
        return "(no routing statistics)"
    lines = ["| tower | layer | expert shares | usage entropy / log E |", "|---|---|---|---|"]
    for tower, t in stats["towers"].items():
        for layer in t["layers"]:
            shares = " ".join(f"{f:.2f}" for f in layer["expert_fraction"])
            lines.append(f"| {tower} | {layer['layer']} | {shares} | {layer['usage_entropy_norm']:.3f} |")
    return "\n".join(lines)


def write_report(out: Path, sizes, timings: dict[str, float], seconds: float) -> Path:
    report_dir = out / "report"
    loss_figure(out, report_dir / "training_losses.png")
    total = sum(timings.values())
    steps = "\n".join(f"| {name} | {secs:.0f} |" for name, secs in timings.items())
    text = f"""# Main job report

Real handwriting (scikit-learn's digits) arranged in 2x2 grids: {sizes.num_train} training and {sizes.num_test}
test images (test digits never seen in training). A small dense CLIP was trained from scratch on the captions
(the "pretrained base"), turned into a CLIP-MoE by Diversified Multiplet Upcycling, and both towers were
put into LLaVA with a tiny Llama (stage 1 projector, stage 2 instruction tuning on one-word digit questions),
then benchmarked with lmms-eval.

## Zero-shot retrieval on the test split (percent)

{retrieval_table(out)}

## MLLM: digit-grid QA through lmms-eval

{mllm_section(out)}

## Training losses

![training losses](training_losses.png)

## Expert usage of the CLIP-MoE on the test split

![expert usage](expert_usage.png)

{routing_table(out)}

## Run

| step | seconds |
|---|---|
{steps}

Total {total / 60:.1f} min of step time (this invocation: {seconds / 60:.1f} min; finished steps are skipped on
re-runs). Machine: {platform.machine()}, {torch.get_num_threads()} threads, Python {platform.python_version()},
torch {torch.__version__}.
"""
    return write_atomic(report_dir / "report.md", lambda tmp: tmp.write_text(text))
