"""Intervals of recall from per-item hits: coverage of a known rate, paired differences, seeds, groups, refusals."""

import math
from dataclasses import replace

import numpy as np
import pytest

from upcycle.research.intervals import proportion_ci, excludes_zero, pack_hits, paired_difference_ci, unpack_hits


def hits_at(n: int, rate: float, seed: int = 0) -> np.ndarray:
    """n items of which exactly round(rate * n) hit, in a shuffled order."""
    hits = np.zeros(n, dtype=np.uint8)
    hits[: round(rate * n)] = 1
    return np.random.default_rng(seed).permutation(hits)


def test_interval_of_a_known_rate_matches_the_normal_approximation():
    ci = proportion_ci(hits_at(1000, 0.30))
    assert ci.estimate == pytest.approx(0.30)
    assert ci.low < 0.30 < ci.high
    normal_width = 2 * 1.96 * math.sqrt(0.3 * 0.7 / 1000)  # 0.0568
    assert ci.high - ci.low == pytest.approx(normal_width, rel=0.08)
    assert (ci.level, ci.items, ci.seeds) == (0.95, 1000, 1)
    # a lower level gives a narrower interval inside the 95% one
    narrow = proportion_ci(hits_at(1000, 0.30), level=0.5)
    assert ci.low < narrow.low < narrow.high < ci.high


def test_the_bootstrap_is_seeded():
    hits = np.stack([hits_at(500, 0.4), hits_at(500, 0.4, seed=1)])
    assert proportion_ci(hits, seed=3) == proportion_ci(hits, seed=3)
    assert paired_difference_ci(hits[0], hits[1], seed=3) == paired_difference_ci(hits[0], hits[1], seed=3)
    assert paired_difference_ci(hits[0], hits[1], seed=3) != paired_difference_ci(hits[0], hits[1], seed=4)
    one = hits_at(500, 0.4)
    assert proportion_ci(one, seed=3) == proportion_ci(one, seed=4)  # one seed: the Wilson interval, no draws


def test_identical_arms_differ_by_exactly_zero():
    hits = hits_at(400, 0.55)
    ci = paired_difference_ci(hits, hits.copy())
    assert (ci.estimate, ci.low, ci.high) == (0.0, 0.0, 0.0)
    assert not excludes_zero(ci) and not ci.excludes_zero()


def test_an_arm_better_on_ten_percent_more_items_excludes_zero():
    a = np.zeros(1000, dtype=np.uint8)
    a[:400] = 1
    b = a.copy()
    b[400:500] = 1  # b also hits 100 items a misses
    ci = paired_difference_ci(b, a)
    assert ci.estimate == pytest.approx(0.10)
    assert 0 < ci.low < 0.10 < ci.high and excludes_zero(ci)
    reverse = paired_difference_ci(a, b)
    assert reverse.high < 0 and excludes_zero(reverse)


def test_a_difference_within_the_noise_includes_zero():
    a = hits_at(400, 0.5)
    b = a.copy()
    misses, hits = np.flatnonzero(a == 0), np.flatnonzero(a == 1)
    b[misses[:12]] = 1  # better on 12 items, worse on 10: +0.5 points
    b[hits[:10]] = 0
    ci = paired_difference_ci(b, a)
    assert ci.estimate == pytest.approx(2 / 400)
    assert ci.low < 0 < ci.high and not excludes_zero(ci)


def test_pairing_narrows_the_interval_of_a_difference():
    # b = a with 20 more hits: the paired interval sees 20 changed items, two separate intervals see 400 noisy ones
    a = hits_at(400, 0.5)
    b = a.copy()
    b[np.flatnonzero(a == 0)[:20]] = 1
    paired = paired_difference_ci(b, a)
    separate_a, separate_b = proportion_ci(a), proportion_ci(b)
    assert excludes_zero(paired)
    assert separate_b.low < separate_a.high  # the separate intervals overlap: they could not tell b from a
    assert paired.high - paired.low < (separate_a.high - separate_a.low) / 2


def test_seeds_are_paired_and_averaged_over_with_items_resampled_jointly():
    base = hits_at(300, 0.4, seed=1)
    better = base.copy()
    better[np.flatnonzero(base == 0)[:30]] = 1
    # the same per-item picture in every seed: pooling three seeds gives the one-seed interval exactly
    three = paired_difference_ci(np.stack([better] * 3), np.stack([base] * 3))
    assert three == replace(paired_difference_ci(better, base), seeds=3)
    # per-seed differences of +10, 0 and +5 points pool to their mean, +5 points
    a = np.stack([better, base, base.copy()])
    b = np.stack([base, base, base.copy()])
    a[2, np.flatnonzero(base == 0)[:15]] = 1
    pooled = paired_difference_ci(a, b)
    assert pooled.estimate == pytest.approx(np.mean([0.10, 0.0, 0.05])) and pooled.seeds == 3
    assert pooled.low < pooled.estimate < pooled.high
    # one arm's recall over seeds: the mean over seeds and items
    assert proportion_ci(a).estimate == pytest.approx(a.mean())
    with pytest.raises(ValueError, match="same seeds and items: hits_a has 3 seed"):
        paired_difference_ci(a, b[:2])
    with pytest.raises(ValueError, match="hits_b 1 x 299"):
        paired_difference_ci(better, base[:299])


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_hits_are_refused(bad):
    hits = hits_at(100, 0.5).astype(float)
    hits[7] = bad
    with pytest.raises(ValueError, match="1 of 100 values are NaN or infinite"):
        proportion_ci(hits)
    with pytest.raises(ValueError, match="hits_b: 1 of 100 values are NaN"):
        paired_difference_ci(hits_at(100, 0.5), hits)


def test_anything_but_per_item_hits_is_refused():
    with pytest.raises(ValueError, match="neither 0 nor 1"):
        proportion_ci([45.0, 50.0, 55.0])  # recall percentages, not hits
    with pytest.raises(ValueError, match="at least one item"):
        proportion_ci([])
    with pytest.raises(ValueError, match="shape"):
        proportion_ci(np.zeros((2, 2, 2)))
    with pytest.raises(ValueError, match="resamples"):
        proportion_ci([0, 1], resamples=0)
    with pytest.raises(ValueError, match="level"):
        proportion_ci([0, 1], level=95)


def test_packed_hits_round_trip():
    hits = hits_at(37, 0.3)
    packed = pack_hits(hits)
    assert len(packed) == 37 and packed.count("1") == 11
    assert np.array_equal(unpack_hits(packed), hits)
    assert pack_hits([True, False, True]) == "101"
    for bad in ("", "0120", None):
        with pytest.raises(ValueError, match="string of '0' and '1'"):
            unpack_hits(bad)


def test_whole_groups_are_resampled_together():
    """Each item copied 4 times as one group: resampling the groups is resampling the originals (the same draws,
    so the same interval to rounding), while treating the copies as independent items would halve the width."""
    originals = hits_at(500, 0.4)
    copies, groups = np.repeat(originals, 4), np.repeat(np.arange(500), 4)
    grouped, plain = proportion_ci(copies, groups=groups), proportion_ci(originals)
    assert (grouped.estimate, grouped.items, grouped.units) == (pytest.approx(plain.estimate), 2000, 500)
    # the grouped interval: Wilson at the effective n the cluster bootstrap finds (about the 500 originals)
    assert (grouped.low, grouped.high) == (pytest.approx(plain.low, rel=0.02), pytest.approx(plain.high, rel=0.02))
    as_independent = proportion_ci(copies)
    assert (as_independent.high - as_independent.low) == pytest.approx((plain.high - plain.low) / 2, rel=0.15)
    # the same for a paired difference, and any labels (strings, unequal group sizes) work
    other = hits_at(500, 0.5, seed=3)
    diff = paired_difference_ci(copies, np.repeat(other, 4), groups=[f"img{g}" for g in groups])
    want = paired_difference_ci(originals, other)
    assert (diff.low, diff.high) == (pytest.approx(want.low), pytest.approx(want.high))
    # two groups are too few to estimate a spread from: Wilson on 2 draws, nearly the whole range
    uneven = proportion_ci([1, 1, 1, 0], groups=["a", "a", "a", "b"], resamples=2000)
    assert uneven.estimate == 0.75 and uneven.units == 2 and uneven.low < 0.25 and uneven.high > 0.95


def test_groups_must_label_every_item():
    with pytest.raises(ValueError, match="one label per item"):
        proportion_ci([1, 0, 1], groups=[0, 0])
