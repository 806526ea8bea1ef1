"""Confidence intervals for recall from per-query hits: a percentile bootstrap over the test items.

Recall@k is the mean of per-query 0/1 hits (`upcycle.eval.retrieval.retrieval_hits`), so its uncertainty from the
finite test set is estimated by resampling the test items with replacement. Two models scored on the same items
are compared pair by pair: every resample draws the same items for both, which cancels what the items have in
common (an easy item is easy for both) and gives a far narrower interval than two separate ones would.

Several seeds per model are given as hits of shape [seeds, items]; seed s of one model is paired with seed s of the
other. A resample draws items (the same items for every seed) and averages over the seeds, so the interval is for
the seed-averaged recall on this test set's population of items.

Items that are not independent (the questions asked about one image) are resampled as whole groups when `groups`
gives each item's group: a resample draws groups with replacement and the recall is the pooled mean over the items
of the drawn groups (a cluster bootstrap), which keeps the correlation inside a group out of the interval's width.

Hits must be 0 or 1 and finite: a NaN, a percentage or a rank passed by mistake is refused, never averaged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RESAMPLES = 10_000
LEVEL = 0.95
_CHUNK_ELEMENTS = 1 << 21  # resampled indices drawn per block: bounds memory at ~16 MB whatever the item count


@dataclass(frozen=True)
class Interval:
    """A point estimate with its percentile bootstrap interval, all as fractions (0.3 = 30%)."""

    estimate: float  # the observed mean over items (and seeds), or the observed difference of two such means
    low: float
    high: float
    level: float  # e.g. 0.95
    items: int  # test items resampled
    seeds: int  # seeds averaged in each resample

    def excludes_zero(self) -> bool:
        return excludes_zero(self)


def excludes_zero(interval: Interval) -> bool:
    """True when the whole interval lies on one side of 0: only then may a difference be called a win or a loss."""
    return interval.low > 0 or interval.high < 0


def bootstrap_ci(hits, resamples: int = RESAMPLES, level: float = LEVEL, seed: int = 0, groups=None) -> Interval:
    """Percentile bootstrap interval of the mean of per-item 0/1 hits.

    hits: [items] or [seeds, items] (each resample draws items and averages over the seeds).
    groups: optional [items] labels; items sharing a label are resampled together (see the module docstring).
    Raises ValueError on NaN/inf, values other than 0 and 1, no items, bad groups or bad resamples/level.
    """
    values = _hits(hits, "hits")
    return _interval(values.mean(axis=0), values.shape[0], resamples, level, seed, groups)


def paired_difference_ci(hits_a, hits_b, resamples: int = RESAMPLES, level: float = LEVEL,
                         seed: int = 0, groups=None) -> Interval:
    """Percentile bootstrap interval of mean(hits_a) - mean(hits_b) for two models on the same test items.

    hits_a, hits_b: the same shape, [items] or [seeds, items] with seed s of a paired with seed s of b; the items
    must be the same queries in the same order. Items (or whole `groups`) are resampled jointly (the same draws
    for both models). Raises ValueError on NaN/inf, values other than 0 and 1, or shapes that differ.
    """
    a, b = _hits(hits_a, "hits_a"), _hits(hits_b, "hits_b")
    if a.shape != b.shape:
        raise ValueError(f"paired hits need the same seeds and items: hits_a has {a.shape[0]} seed(s) x "
                         f"{a.shape[1]} items, hits_b {b.shape[0]} x {b.shape[1]}; evaluate both on the same test "
                         "split with the same seeds")
    return _interval((a - b).mean(axis=0), a.shape[0], resamples, level, seed, groups)


def pack_hits(hits) -> str:
    """Per-item 0/1 hits as a string of '0' and '1' (one character per item): compact, readable JSON."""
    values = _hits(hits, "hits")
    if values.shape[0] != 1:
        raise ValueError(f"pack_hits takes one run's hits [items], got {values.shape[0]} rows")
    return "".join("1" if v else "0" for v in values[0])


def unpack_hits(packed: str) -> np.ndarray:
    """The uint8 array [items] of a `pack_hits` string."""
    if not isinstance(packed, str) or not packed or set(packed) - {"0", "1"}:
        raise ValueError(f"packed hits must be a non-empty string of '0' and '1', got {str(packed)[:40]!r}")
    return np.frombuffer(packed.encode("ascii"), dtype=np.uint8) - ord("0")


def _hits(hits, what: str) -> np.ndarray:
    """hits as float64 [seeds, items], checked."""
    try:
        values = np.asarray(hits, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{what}: expected 0/1 hits per item ([items] or [seeds, items]), got "
                         f"{type(hits).__name__} ({err})") from None
    if values.ndim == 1:
        values = values[None]
    if values.ndim != 2 or values.shape[1] == 0 or values.shape[0] == 0:
        raise ValueError(f"{what}: expected 0/1 hits of shape [items] or [seeds, items] with at least one item, "
                         f"got shape {values.shape}")
    bad = ~np.isfinite(values)
    if bad.any():
        raise ValueError(f"{what}: {int(bad.sum())} of {values.size} values are NaN or infinite; no interval can be "
                         "computed from them (was the model's evaluation non-finite?)")
    other = (values != 0) & (values != 1)
    if other.any():
        raise ValueError(f"{what}: {int(other.sum())} values are neither 0 nor 1 (e.g. {values[other][0]!r}); pass "
                         "per-item hits, not recall percentages or ranks")
    return values


def _interval(per_item: np.ndarray, seeds: int, resamples: int, level: float, seed: int, groups=None) -> Interval:
    if not isinstance(resamples, int) or resamples < 1:
        raise ValueError(f"resamples {resamples!r}: expected a whole number >= 1 (the default is {RESAMPLES})")
    if not 0 < level < 1:
        raise ValueError(f"level {level!r}: expected a coverage between 0 and 1, e.g. 0.95")
    if groups is None:
        means = _bootstrap_means(per_item, np.ones_like(per_item), resamples, seed)
    else:
        sums, counts = _group_totals(per_item, groups)
        means = _bootstrap_means(sums, counts, resamples, seed)
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return Interval(float(per_item.mean()), float(low), float(high), level, len(per_item), seeds)


def _group_totals(per_item: np.ndarray, groups) -> tuple[np.ndarray, np.ndarray]:
    """Per group: the sum of the items' values and the item count, groups in order of first appearance."""
    labels = np.asarray(groups)
    if labels.shape != per_item.shape:
        raise ValueError(f"groups: expected one label per item ({per_item.shape[0]}), got shape {labels.shape}")
    _, first, index = np.unique(labels, return_index=True, return_inverse=True)
    order = np.argsort(np.argsort(first))  # renumber groups by first appearance (stable draws for a given order)
    index = order[index.reshape(-1)]
    return (np.bincount(index, weights=per_item, minlength=len(first)),
            np.bincount(index, minlength=len(first)).astype(np.float64))


def _bootstrap_means(sums: np.ndarray, counts: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """Pooled means (sum of sums / sum of counts) of `resamples` draws of len(sums) units with replacement, drawn
    in blocks of whole resamples. A unit is one item (count 1) or one group of items."""
    n = len(sums)
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    rows = max(1, _CHUNK_ELEMENTS // n)
    for start in range(0, resamples, rows):
        stop = min(start + rows, resamples)
        draw = rng.integers(0, n, size=(stop - start, n))
        means[start:stop] = sums[draw].sum(axis=1) / counts[draw].sum(axis=1)
    return means
