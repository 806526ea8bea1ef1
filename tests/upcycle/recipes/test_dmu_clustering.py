"""DMU's small-cluster rules (merge, drop, bin), the diagnostics of how different the stages came out, and the
--small-clusters option from the command line to the model card."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from encoder.utils.errors import UserError
from upcycle.cli import main
from upcycle.recipes.dmu import DMUConfig
from upcycle.recipes.dmu.clustering import (
    DROPPED,
    SMALL_CLUSTER_RULES,
    bin_small_clusters,
    drop_small_clusters,
    merge_small_clusters,
    plan_batches,
)
from upcycle.recipes.dmu.config import recorded_settings
from upcycle.recipes.dmu.diagnostics import successive_nmi, update_similarity


def clusters(*spec):
    """labels, earlier labels and 1-D features from (label, earlier label, size, position) tuples."""
    labels, earlier, features = [], [], []
    for label, parent, size, position in spec:
        labels += [label] * size
        earlier += [parent] * size
        features += [[position]] * size
    return np.array(labels), np.array(earlier), np.array(features, dtype=float)


def members(labels: np.ndarray) -> dict[int, set[int]]:
    return {int(c): set(np.flatnonzero(labels == c).tolist()) for c in np.unique(labels)}


# Two earlier clusters, 0 and 1. Cluster 13 (small, earlier 1) sits right next to cluster 2 (earlier 0), so the
# nearest-centroid merge pulls it across the earlier boundary; bin must keep it inside earlier cluster 1.
NESTED = clusters((1, 0, 20, 0.0), (2, 0, 5, 10.0), (3, 0, 4, 11.0), (4, 0, 6, 30.0),
                  (11, 1, 12, 50.0), (12, 1, 3, 40.0), (13, 1, 2, 12.0), (14, 1, 4, 41.0))


def test_bin_loses_no_pair_and_keeps_every_bin_inside_one_earlier_cluster():
    labels, earlier, features = NESTED
    batch, report = bin_small_clusters(labels, earlier, np.zeros_like(earlier), features, min_size=8)
    assert len(batch) == len(labels) and DROPPED not in batch  # no pair lost
    for c, pairs in members(batch).items():
        assert len({int(earlier[i]) for i in pairs}) == 1, c  # inside one earlier cluster
        assert len(pairs) >= 8, c  # fills a batch
    found = members(labels)
    assert members(batch)[1] == found[1] and members(batch)[11] >= found[11]  # large clusters are kept whole
    # earlier 0: 3 + 2 make a bin of 9; 4 (6 pairs) is the leftover, folded into that bin (nearer than 1).
    # earlier 1: 13 + 12 -> 5, + 14 -> 9 (one bin); nothing left over.
    assert (report.clusters_found, report.small, report.bins, report.folded) == (8, 6, 2, 1)
    assert (report.clusters_used, report.undersized_earlier, report.crossed) == (4, 0, 0)
    assert members(batch)[2] == found[2] | found[3] | found[4]


def test_merge_is_unchanged_and_crosses_earlier_clusters_where_bin_does_not():
    labels, earlier, features = NESTED
    merged, report = merge_small_clusters(labels, features, min_size=8)
    # 13 went to its nearest centroid (cluster 3, in earlier cluster 0): its batches mix earlier clusters
    assert set(earlier[merged == merged[labels == 13][0]].tolist()) == {0, 1}
    assert (report.rule, report.small, report.merged) == ("merge", 6, report.clusters_found - report.clusters_used)
    assert all(len(pairs) >= 8 for pairs in members(merged).values()) and len(merged) == len(labels)
    planned, _ = plan_batches("merge", labels, earlier, np.zeros_like(earlier), features, 8)
    assert np.array_equal(planned, merged)  # the default rule is exactly merge_small_clusters


def test_bin_merges_an_earlier_cluster_below_one_batch_inside_the_batch_it_trained_in():
    # Earlier clusters 0, 1, 2; the earlier stage trained 1 and 2 in one batch cluster (label 1), 0 alone (0).
    # Earlier cluster 2 holds 5 pairs in all: it cannot fill a batch, and its nearest neighbour is in earlier 0.
    labels, earlier, features = clusters((1, 0, 10, 0.0), (11, 1, 9, 20.0), (21, 2, 3, 1.0), (22, 2, 2, 1.5))
    earlier_batches = np.where(earlier == 2, 1, earlier)
    batch, report = bin_small_clusters(labels, earlier, earlier_batches, features, min_size=8)
    assert len(batch) == len(labels)
    for pairs in members(batch).values():
        assert len({int(earlier_batches[i]) for i in pairs}) == 1 and len(pairs) >= 8  # batches still nest
    assert members(batch)[11] == set(np.flatnonzero(earlier_batches == 1).tolist())
    assert (report.undersized_earlier, report.crossed, report.clusters_used) == (1, 0, 2)
    # the same data with earlier cluster 2 trained alone before (impossible from a `bin` stage): merged anywhere
    _, alone = bin_small_clusters(labels, earlier, earlier, features, min_size=8)
    assert (alone.undersized_earlier, alone.crossed) == (0, 1)


def test_drop_leaves_out_exactly_the_pairs_of_small_clusters():
    labels = NESTED[0]
    batch, report = drop_small_clusters(labels, min_size=8)
    sizes = dict(zip(*np.unique(labels, return_counts=True)))
    small = np.array([sizes[c] < 8 for c in labels])
    assert np.array_equal(batch == DROPPED, small)
    assert np.array_equal(batch[~small], labels[~small])  # the kept pairs keep their clusters
    assert (report.dropped, report.dropped_pairs) == (6, int(small.sum())) and report.dropped_pairs == 24
    assert (report.clusters_used, report.smallest, report.largest) == (2, 12, 20)
    none, all_small = drop_small_clusters(labels, min_size=100)
    assert (none == DROPPED).all() and all_small.clusters_used == 0


def test_unknown_rule_is_refused_by_the_config_and_the_planner():
    assert tuple(SMALL_CLUSTER_RULES) == ("merge", "drop", "bin")
    assert DMUConfig(base="b", train_data="d", out="o").small_clusters == "merge"
    with pytest.raises(UserError, match="--small-clusters must be one of merge, drop, bin"):
        DMUConfig(base="b", train_data="d", out="o", small_clusters="split")
    with pytest.raises(ValueError, match="unknown small-cluster rule"):
        labels, earlier, features = NESTED
        plan_batches("split", labels, earlier, earlier, features, 8)


def test_the_rule_is_a_resume_setting_and_older_manifests_count_as_merge():
    cfg = DMUConfig(base="b", train_data="d", out="o", small_clusters="bin")
    assert cfg.fingerprint()["small_clusters"] == "bin"
    old = {"settings": {k: v for k, v in DMUConfig(base="b", train_data="d", out="o").fingerprint().items()
                        if k != "small_clusters"}}
    assert recorded_settings(old)["small_clusters"] == "merge"
    assert recorded_settings({"settings": cfg.fingerprint()})["small_clusters"] == "bin"


def test_nmi_of_successive_batch_labels():
    a = np.array([0, 0, 1, 1] * 5)
    assert successive_nmi({1: a, 2: a.copy()}) == {"1-2": pytest.approx(1.0)}
    assert successive_nmi({1: a, 2: 7 - a})["1-2"] == pytest.approx(1.0)  # renamed clusters: the same grouping
    assert successive_nmi({1: a, 2: np.array([0, 1] * 10)})["1-2"] == pytest.approx(0.0, abs=1e-12)
    # pairs a stage left out form a group of their own: leaving some out is a different grouping
    dropped = a.copy()
    dropped[:4] = DROPPED
    three = successive_nmi({1: a, 2: dropped, 3: dropped.copy()})
    assert three["1-2"] < 0.9 and three["2-3"] == pytest.approx(1.0) and set(three) == {"1-2", "2-3"}


def test_cosine_of_stage_updates():
    base = {"w": torch.zeros(2, 2), "b": torch.ones(2)}
    step = {"w": torch.tensor([[1.0, 0.0], [0.0, 0.0]]), "b": torch.ones(2)}
    other = {"w": torch.zeros(2, 2), "b": torch.tensor([1.0, 3.0])}
    result = update_similarity(base, {1: step, 2: {k: v.clone() for k, v in step.items()},
                                      3: {"w": -step["w"], "b": torch.ones(2)}, 4: other, 5: base})
    cos = result["cosine"]
    assert cos["1-2"] == pytest.approx(1.0) and cos["1-3"] == pytest.approx(-1.0)
    assert cos["1-4"] == pytest.approx(0.0)  # w moved in one, b in the other: orthogonal updates
    assert cos["1-5"] is None  # stage 5 did not move: undefined, not 0
    assert result["norm"] == {"1": pytest.approx(1.0), "2": pytest.approx(1.0), "3": pytest.approx(1.0),
                              "4": pytest.approx(2.0), "5": 0.0}


def dmu_args(base, grids, out, rule, batch):
    return ["dmu", "--base", str(base), "--train-data", str(grids / "train.json"), "--out", str(out),
            "--num-experts", "3", "--top-k", "2", "--clusters-per-modality", "2", "--batch-size", str(batch),
            "--stage-max-steps", "2", "--router-max-steps", "1", "--lr", "1e-3", "--small-clusters", rule]


@pytest.mark.parametrize("rule, batch", [("drop", 16), ("bin", 4)])
def test_the_rule_runs_through_dmu_into_the_model_card(rule, batch, base_clip_dir, grids_dir, tmp_path, capsys):
    out = tmp_path / "moe"
    assert main(dmu_args(base_clip_dir, grids_dir, out, rule, batch)) == 0
    work = tmp_path / "moe.dmu-work"
    recipe = json.loads((out / "clip_moe_recipe.json").read_text())["details"]
    assert recipe["settings"]["small_clusters"] == rule
    earlier_batches = np.zeros(96, dtype=np.int64)
    for s in ("1", "2"):
        stats = recipe["stages"][s]["clusters"]
        labels = np.load(work / f"stage-{s}" / "labels.npy")
        batches = np.load(work / f"stage-{s}" / "batch_labels.npy")
        sizes = dict(zip(*np.unique(labels, return_counts=True)))
        small = np.array([sizes[c] < batch for c in labels])
        assert stats["rule"] == rule and stats["small"] == len({c for c in labels if sizes[c] < batch})
        if rule == "drop":
            assert np.array_equal(batches == DROPPED, small)
            assert stats["dropped_pairs"] == small.sum() and stats["pairs_used_per_epoch"] == 96 - small.sum()
        else:
            assert stats["pairs_used_per_epoch"] == 96 and DROPPED not in batches
            for c in np.unique(batches):  # inside one of the batch clusters the earlier stage trained on
                assert len(np.unique(earlier_batches[batches == c])) == 1 and (batches == c).sum() >= batch
        earlier_batches = batches
    if rule == "drop":  # the case means something only if a stage dropped pairs
        assert sum(recipe["stages"][s]["clusters"]["dropped_pairs"] for s in ("1", "2")) > 0
    else:  # ... and if stage 2 binned small clusters
        assert recipe["stages"]["2"]["clusters"]["bins"] > 0
    diagnostics = recipe["diagnostics"]
    # the stages batched the data differently, so their updates differ too
    assert set(diagnostics["batch_label_nmi"]) == {"1-2"} and 0 <= diagnostics["batch_label_nmi"]["1-2"] < 1
    assert set(diagnostics["update_cosine"]) == {"1-2"} and -1 <= diagnostics["update_cosine"]["1-2"] < 1
    assert all(n > 0 for n in diagnostics["update_norm"].values())
    printed = capsys.readouterr().out
    assert "stages 1-2: batch-label NMI" in printed and "stages 1-2: FFN update cosine" in printed
    card = (out / "README.md").read_text()
    assert "stages 1-2 batch-label NMI" in card and "stages 1-2 FFN update cosine" in card


def test_bin_warns_when_a_stage_repeats_the_earlier_stages_batches(base_clip_dir, grids_dir, tmp_path, caplog):
    # 96 pairs, 2 x 2 clusters: each stage-1 cluster holds under two batches of 16, so bin puts every one of
    # them back together in stage 2, which then trains on stage 1's batches again
    out = tmp_path / "moe"
    assert main(dmu_args(base_clip_dir, grids_dir, out, "bin", 16)) == 0
    diagnostics = json.loads((out / "clip_moe_recipe.json").read_text())["details"]["diagnostics"]
    assert diagnostics["batch_label_nmi"]["1-2"] == pytest.approx(1.0)
    assert diagnostics["update_cosine"]["1-2"] == pytest.approx(1.0)  # same batches, same seed: same update
    assert "stages 1-2 batched the data identically" in caplog.text
