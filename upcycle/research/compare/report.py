"""The comparison's markdown tables (mean ± std over seeds; R@1 with its interval and paired differences against
the dense arm) and its training-loss plot."""

from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np

from encoder.utils.files import write_atomic

from ...embedded.report import smooth
from ..intervals import MIN_INFORMATIVE, RESAMPLES, Interval, paired_difference_ci, proportion_ci, unpack_hits, verdict
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
            "pairs seen", "optimizer steps"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm, runs in results.items():
        cells = [f"{arm}"] + [mean_std([r[key] for r in runs]) for key, _ in COLUMNS]
        cells.append(f"{runs[0]['vision_params_total']:,} / {runs[0]['vision_params_active']:,}")
        cells.append(f"{ms_per_image[arm]:.3f}" if arm in ms_per_image else "-")
        cells.append(f"{runs[0]['pairs_seen']:,}")
        cells.append(f"{runs[0]['optimizer_steps']:,}" if "optimizer_steps" in runs[0] else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


INTERVAL_COLUMNS = (("i2t_r1", "I→T R@1"), ("t2i_r1", "T→I R@1"))
# Differences are paired against a dense arm: `dense` fixed in advance, or, when a sweep scored the arms on the
# validation split, the better dense arm there (`run.reference_arm`; never chosen on the test items used here).
REFERENCE_ARM = "dense"


def intervals_section(results: dict[str, list[dict]], reference: str | None = REFERENCE_ARM,
                      why: str = "fixed in advance") -> str:
    """R@1 with its 95% interval per arm, and each arm's paired difference from the reference arm."""
    reference = reference if reference in results else None
    counts = {key: len(next(iter(results.values()))[0]["hits"][key]) for key, _ in INTERVAL_COLUMNS}
    if reference:
        pairing = (f"Differences are measured against `{reference}`, {why}. They are paired: both arms on the same "
                   "resampled items, seed s against seed s, the untrained base against every seed; 95% percentile "
                   f"bootstrap intervals, {RESAMPLES:,} resamples. A difference is called higher or lower only when "
                   f"its interval excludes 0 and the two arms differ on at least {MIN_INFORMATIVE} items (with fewer "
                   "the bootstrap calls chance differences too often: the cell says n too small to call).")
    else:
        pairing = "No paired differences: no dense arm to measure them against was run."
    note = (f"R@1 in percent over the {counts['i2t_r1']:,} test images (I→T) and {counts['t2i_r1']:,} distinct "
            "test captions (T→I), averaged over an arm's seeds, with 95% Wilson score intervals (several seeds: at "
            f"the effective number of items a bootstrap of the test items finds). {pairing}")
    return note + "\n\n" + intervals_table(results, reference)


def intervals_table(results: dict[str, list[dict]], reference: str | None) -> str:
    head = ["arm"]
    for _, title in INTERVAL_COLUMNS:
        head += [f"{title} [95% CI]"] + ([f"{title} − {reference} [95% CI]"] if reference else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm, runs in results.items():
        cells = [arm]
        for key, _ in INTERVAL_COLUMNS:
            ci = proportion_ci([unpack_hits(r["hits"][key]) for r in runs])
            cells.append(f"{100 * ci.estimate:.1f} [{100 * ci.low:.1f}, {100 * ci.high:.1f}]")
            if reference:
                cells.append("reference" if arm == reference else difference_cell(paired_difference(
                    arm, runs, results[reference], key)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_difference(arm: str, runs: list[dict], reference_runs: list[dict], key: str) -> Interval:
    """The interval of arm - reference on `key`, seed s of the arm paired with seed s of the reference."""
    seeds = [r["seed"] for r in reference_runs]
    reference = np.stack([unpack_hits(r["hits"][key]) for r in reference_runs])
    by_seed = {r["seed"]: unpack_hits(r["hits"][key]) for r in runs}
    if arm == "base":  # not trained: one model, the same for every seed
        hits = np.stack([by_seed[runs[0]["seed"]]] * len(seeds))
    elif sorted(by_seed) != sorted(seeds):
        raise ValueError(f"arm {arm} has seeds {sorted(by_seed)} and the reference {sorted(seeds)}: paired "
                         "differences need the same seeds")
    else:
        hits = np.stack([by_seed[s] for s in seeds])
    return paired_difference_ci(hits, reference)


def difference_cell(ci: Interval) -> str:
    """The difference in points with its interval and `intervals.verdict`'s wording (higher or lower only when the
    interval excludes 0 and enough items differ)."""
    return f"{100 * ci.estimate:+.1f} [{100 * ci.low:+.1f}, {100 * ci.high:+.1f}] {verdict(ci)}"


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
