"""Confidence intervals for recall from per-query hits, honest at small n.

A single model's recall (the mean of per-query 0/1 hits, `upcycle.eval.retrieval.retrieval_hits`) gets a Wilson
score interval (Wilson 1927): unlike a percentile bootstrap it never collapses to a point (50 hits of 50 give
[92.9, 100], not [100, 100]) and it keeps close to its nominal coverage at small n (at n=10, p=0.9 the bootstrap
covers the truth ~70% of the time). When the items are not independent 0/1 draws -- several seeds averaged, or
`groups` of items (the questions asked about one image) -- the Wilson interval is taken at the effective number of
items, p(1-p) / var, with var the variance of the recall over a (cluster) bootstrap of the items: the design-effect
approach of Korn & Graubard (1998), with Wilson in place of Clopper-Pearson.

Two models scored on the same items are compared pair by pair: every resample draws the same items (or whole
groups) for both, which cancels what the items have in common (an easy item is easy for both) and gives a far
narrower interval than two separate ones would; the interval is the resamples' percentiles. Only the items on which
the two differ carry information about the difference, and with few of them the percentile bootstrap calls
differences far more often than its level says, so `verdict` calls a difference only when at least MIN_INFORMATIVE
of the resampled units differ and the interval excludes 0.

Several seeds per model are given as hits of shape [seeds, items]; seed s of one model is paired with seed s of the
other. A resample draws items (the same items for every seed) and averages over the seeds, so the interval is for
the seed-averaged recall on this test set's population of items.

Hits must be 0 or 1 and finite: a NaN, a percentage or a rank passed by mistake is refused, never averaged.
"""

from __future__ import annotations

from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

RESAMPLES = 10_000
LEVEL = 0.95
# The fewest resampled units (items, or groups) on which two models differ for their paired difference to be called
# higher or lower. Computed exactly (the percentile bootstrap of d differing items is a Binomial(d, wins/d); the
# false-call rate is its chance of excluding 0 when each item favours either model with probability 1/2), the
# nominal 5% is 25% at d = 3, 12.5% at 4 and 7, and between 2% and 9.3% for every d from 8 to 40; below 10 the
# table says the number is too small to call instead. The same count is the least a cluster bootstrap needs to
# estimate a variance from: with fewer units a single recall's interval treats each unit as one draw.
MIN_INFORMATIVE = 10
_CHUNK_ELEMENTS = 1 << 21  # resampled indices drawn per block: bounds memory at ~16 MB whatever the item count


@dataclass(frozen=True)
class Interval:
    """A point estimate with its interval, all as fractions (0.3 = 30%)."""

    estimate: float  # the observed mean over items (and seeds), or the observed difference of two such means
    low: float
    high: float
    level: float  # e.g. 0.95
    items: int  # test items
    seeds: int  # seeds averaged
    method: str = "percentile bootstrap"  # or "Wilson score", "Wilson score at the bootstrap's effective n"
    units: int = 0  # the independent units resampled: items, or groups of items
    informative: int = 0  # units that carry information: for a difference, those on which the two models differ

    def excludes_zero(self) -> bool:
        return excludes_zero(self)


def excludes_zero(interval: Interval) -> bool:
    """True when the whole interval lies on one side of 0 (a difference may be called only then; see `verdict`)."""
    return interval.low > 0 or interval.high < 0


def verdict(difference: Interval) -> str:
    """How a report may word a paired difference: "higher" or "lower" only when its interval excludes 0 and at least
    MIN_INFORMATIVE units differ; "CI includes 0"; or "n too small to call" with the count that fell short."""
    if difference.informative < MIN_INFORMATIVE:
        return (f"n too small to call ({difference.informative} of {difference.units} differ, "
                f"{MIN_INFORMATIVE} needed)")
    if not difference.excludes_zero():
        return "CI includes 0"
    return "higher" if difference.estimate > 0 else "lower"


def proportion_ci(hits, resamples: int = RESAMPLES, level: float = LEVEL, seed: int = 0, groups=None) -> Interval:
    """Wilson score interval of the mean of per-item 0/1 hits (see the module docstring).

    hits: [items] or [seeds, items]. One seed without groups: the plain Wilson interval over the items. Seeds
    averaged or `groups` (optional [items] labels; items sharing a label are resampled together): Wilson at the
    effective number of draws that a (cluster) bootstrap of `resamples` draws finds (at most seeds x items; the
    item count when every unit is alike); with fewer than MIN_INFORMATIVE units, at the number of units.
    Raises ValueError on NaN/inf, values other than 0 and 1, no items, bad groups or bad resamples/level.
    """
    values = _hits(hits, "hits")
    per_item = values.mean(axis=0)
    _check(resamples, level)
    estimate, items = float(per_item.mean()), len(per_item)
    if values.shape[0] == 1 and groups is None:
        effective, units, method = float(items), items, "Wilson score"
    else:
        means, units = _resampled_means(per_item, resamples, seed, groups)
        spread = float(means.var())
        if units < MIN_INFORMATIVE:
            effective = float(units)
        elif spread == 0:  # every unit alike (e.g. all hits in every seed): the seeds add nothing to the items
            effective = float(items)
        else:  # at most one draw per observed 0/1 hit
            effective = min(float(items * values.shape[0]), estimate * (1 - estimate) / spread)
        method = "Wilson score at the bootstrap's effective n"
    low, high = _wilson(estimate, effective, level)
    return Interval(estimate, low, high, level, items, values.shape[0], method, units, units)


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
    _check(resamples, level)
    per_item = (a - b).mean(axis=0)
    means, units = _resampled_means(per_item, resamples, seed, groups)
    # units on which the models differ, counted on whole-number sums over the seeds (exact, unlike their means)
    informative = int(np.count_nonzero(_unit_totals((a - b).sum(axis=0), groups)[0]))
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return Interval(float(per_item.mean()), float(low), float(high), level, len(per_item), a.shape[0],
                    "percentile bootstrap", units, informative)


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


def _check(resamples: int, level: float) -> None:
    if not isinstance(resamples, int) or resamples < 1:
        raise ValueError(f"resamples {resamples!r}: expected a whole number >= 1 (the default is {RESAMPLES})")
    if not 0 < level < 1:
        raise ValueError(f"level {level!r}: expected a coverage between 0 and 1, e.g. 0.95")


def _wilson(p: float, n: float, level: float) -> tuple[float, float]:
    """The Wilson score interval of a proportion p observed on n (possibly effective, fractional) draws."""
    z = NormalDist().inv_cdf(1 - (1 - level) / 2)
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, float(centre - half)), min(1.0, float(centre + half))


def _resampled_means(per_item: np.ndarray, resamples: int, seed: int, groups) -> tuple[np.ndarray, int]:
    """The (cluster) bootstrap's means of `per_item`, and the number of units it resampled."""
    sums, counts = _unit_totals(per_item, groups)
    return _bootstrap_means(sums, counts, resamples, seed), len(sums)


def _unit_totals(per_item: np.ndarray, groups) -> tuple[np.ndarray, np.ndarray]:
    """Per resampled unit: the sum of its items' values and its item count (one item per unit without groups)."""
    if groups is None:
        return per_item, np.ones_like(per_item)
    return _group_totals(per_item, groups)


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
