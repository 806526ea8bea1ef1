"""The comparison's markdown tables (mean ± std over seeds) and its training-loss plot."""

from __future__ import annotations

import statistics
from pathlib import Path

from encoder.utils.files import write_atomic

from .arms import ARM_TITLES

COLUMNS = (("i2t_r1", "I→T R@1"), ("i2t_r5", "I→T R@5"), ("t2i_r1", "T→I R@1"), ("t2i_r5", "T→I R@5"),
           ("digits_mean", "digit acc."))


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def results_table(results: dict[str, list[dict]], ms_per_image: dict[str, float]) -> str:
    """One row per arm: test metrics as mean ± std over its seeds, parameters and forward time."""
    head = ["arm", *(title for _, title in COLUMNS), "params total / active (vision)", "ms / image (vision)",
            "pairs seen"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm, runs in results.items():
        cells = [f"{arm}"] + [mean_std([r[key] for r in runs]) for key, _ in COLUMNS]
        cells.append(f"{runs[0]['vision_params_total']:,} / {runs[0]['vision_params_active']:,}")
        cells.append(f"{ms_per_image[arm]:.3f}" if arm in ms_per_image else "-")
        cells.append(f"{runs[0]['pairs_seen']:,}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def positions_table(results: dict[str, list[dict]]) -> str:
    """Zero-shot digit accuracy per grid position, mean ± std over seeds."""
    positions = list(next(iter(results.values()))[0]["digits"])
    lines = ["| arm | " + " | ".join(positions) + " |", "|" + "---|" * (len(positions) + 1)]
    for arm, runs in results.items():
        lines.append(f"| {arm} | " + " | ".join(mean_std([r["digits"][p] for r in runs]) for p in positions) + " |")
    return "\n".join(lines)


def arms_legend(arms) -> str:
    return "\n".join(f"- `{arm}`: {ARM_TITLES[arm]}" for arm in arms)


def loss_plot(curves: dict[str, list[tuple[int, float]]], path: Path, title: str) -> Path:
    """Training contrastive loss against pairs seen, one line per arm (matplotlib's Agg canvas, no display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for arm, curve in curves.items():
        if curve:
            xs, ys = zip(*curve)
            ax.plot(xs, smooth(list(ys)), label=arm, linewidth=1.2)
    ax.set_xlabel("image-text pairs seen")
    ax.set_ylabel("contrastive loss (smoothed)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    return write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))


def smooth(values: list[float], window: int = 9) -> list[float]:
    half = window // 2
    return [statistics.mean(values[max(0, i - half):i + half + 1]) for i in range(len(values))]
