"""The clusters of Multistage Contrastive Learning: k-means per modality, labels accumulated over stages, and
what becomes of clusters too small to fill one global batch.

After stage s a pair's label encodes the tuple of all its earlier joint assignments
(label = label * K^2 + text_cluster * K + image_cluster), so a stage's batches hold only pairs that every
earlier stage put together. The clusters fragment geometrically (9, 81, 729 labels), so many become smaller
than one global batch; `--small-clusters` chooses the rule (`SMALL_CLUSTER_RULES`):

- merge: fold each small cluster into the cluster with the nearest centroid (no pair lost; the nearest may
  belong to another earlier-stage cluster, so the nesting of the stages can break there).
- drop: leave the small clusters' pairs out of this stage (the reference code's behaviour: data shrinks as the
  clusters fragment). Their batch label is `DROPPED`.
- bin: group the small clusters of one earlier-stage cluster into batch-sized bins (no pair lost, every bin
  inside one earlier-stage cluster); see `bin_small_clusters` for the leftovers.

The accumulated labels themselves are never changed: a rule only decides the *batch labels* a stage trains on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.cluster import MiniBatchKMeans

DROPPED = -1  # the batch label of a pair that `drop` leaves out of the stage


def kmeans_labels(embeddings: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """MiniBatchKMeans cluster index per row (k clusters; fewer distinct rows than k is an error upstream)."""
    km = MiniBatchKMeans(n_clusters=k, random_state=seed, n_init=3, batch_size=max(1024, 3 * k))
    return km.fit_predict(np.asarray(embeddings, dtype=np.float32)).astype(np.int64)


def joint_labels(image_clusters: np.ndarray, text_clusters: np.ndarray, k: int) -> np.ndarray:
    """text_cluster * K + image_cluster: K^2 joint clusters per stage."""
    return np.asarray(text_clusters, dtype=np.int64) * k + np.asarray(image_clusters, dtype=np.int64)


def accumulate_labels(previous: np.ndarray, image_clusters: np.ndarray, text_clusters: np.ndarray,
                      k: int) -> np.ndarray:
    """label * K^2 + this stage's joint label (previous = zeros before stage 1)."""
    return np.asarray(previous, dtype=np.int64) * (k * k) + joint_labels(image_clusters, text_clusters, k)


@dataclass
class SmallClusterReport:
    """What a small-cluster rule did to one stage's clusters (written to clusters.json and the model card)."""

    rule: str
    clusters_found: int  # accumulated clusters of this stage
    clusters_used: int  # clusters the stage's batches are drawn from
    small: int  # clusters found that were smaller than one global batch
    smallest: int  # pairs in the smallest / largest cluster used
    largest: int
    merged: int = 0  # merge: small clusters folded into their nearest neighbour
    dropped: int = 0  # drop: small clusters left out of the stage
    dropped_pairs: int = 0  # drop: their pairs
    bins: int = 0  # bin: bins made of two or more small clusters of one earlier-stage cluster
    folded: int = 0  # bin: leftovers (< one batch) folded into the nearest cluster of the same earlier-stage cluster
    # bin: earlier-stage clusters smaller than one batch, merged with their nearest neighbour inside the cluster
    # the earlier stage trained them in (the raw nesting breaks there; the nesting of the batches holds)
    undersized_earlier: int = 0
    crossed: int = 0  # bin: merges across the earlier stage's batch clusters (only if those were below a batch)


class _Units:
    """Clusters being combined: per unit its pair count and feature sum; a folded unit hands its pairs to another.

    `ids[u]` is the original label of unit u; after folding, `labels()` gives every pair the label of the unit
    that now holds it (a merged cluster takes its neighbour's label, so labels stay inside the original range)."""

    def __init__(self, labels: np.ndarray, features: np.ndarray):
        self.ids, self.first, inverse, counts = np.unique(labels, return_index=True, return_inverse=True,
                                                          return_counts=True)
        self.inverse = inverse.reshape(-1)
        features = np.asarray(features, dtype=np.float64)
        self.sums = np.zeros((len(self.ids), features.shape[1]))
        np.add.at(self.sums, self.inverse, features)
        self.found = counts.astype(np.int64)  # sizes as found, before any folding
        self.counts = self.found.copy()
        self.alive = np.ones(len(self.ids), dtype=bool)
        self.owner = np.arange(len(self.ids))

    def everything(self) -> np.ndarray:
        return np.ones(len(self.ids), dtype=bool)

    def fold(self, i: int, j: int) -> None:
        self.sums[j] += self.sums[i]
        self.counts[j] += self.counts[i]
        self.alive[i] = False
        self.owner[self.owner == i] = j

    def nearest(self, i: int, candidates: np.ndarray) -> int:
        """The unit among `candidates` (indices without i) whose centroid is nearest to i's."""
        centroids = self.sums[candidates] / self.counts[candidates, None]
        return int(candidates[np.argmin(((centroids - self.sums[i] / self.counts[i]) ** 2).sum(axis=1))])

    def fold_small(self, group: np.ndarray, min_size: int, into_small_only: bool = False) -> int:
        """Fold the smallest unit of `group` (a unit mask) below `min_size` into its nearest other unit of the
        group until none is below or no other unit is left; `into_small_only` folds only into units still below
        (so bins of small clusters stay near one batch instead of swelling a large cluster). Returns the folds."""
        folds = 0
        while True:
            members = self.alive & group
            small = np.flatnonzero(members & (self.counts < min_size))
            targets = small if into_small_only else np.flatnonzero(members)
            if len(small) == 0 or len(targets) < 2:
                return folds
            i = small[np.argmin(self.counts[small])]
            self.fold(i, self.nearest(i, targets[targets != i]))
            folds += 1

    def labels(self) -> np.ndarray:
        return self.ids[self.owner[self.inverse]]

    def report(self, rule: str, min_size: int, **done: int) -> SmallClusterReport:
        kept = self.counts[self.alive]
        return SmallClusterReport(rule, len(self.ids), int(self.alive.sum()), int((self.found < min_size).sum()),
                                  int(kept.min()), int(kept.max()), **done)


def merge_small_clusters(labels: np.ndarray, features: np.ndarray,
                         min_size: int) -> tuple[np.ndarray, SmallClusterReport]:
    """Fold every cluster smaller than `min_size` into the cluster with the nearest centroid, smallest first.

    `features` [N, D] locate the clusters (e.g. image and text embeddings side by side). Returns new labels
    (a merged cluster takes its neighbour's label) and what was done. A single remaining cluster is kept
    whatever its size; the caller checks that the data fill one batch at all.
    """
    units = _Units(np.asarray(labels, dtype=np.int64), features)
    merged = units.fold_small(units.everything(), min_size)
    return units.labels(), units.report("merge", min_size, merged=merged)


def drop_small_clusters(labels: np.ndarray, min_size: int) -> tuple[np.ndarray, SmallClusterReport]:
    """The reference code's rule: pairs of clusters smaller than `min_size` get the batch label `DROPPED` and
    sit this stage out. Every cluster may be small (then nothing is left to train: the caller refuses)."""
    labels = np.asarray(labels, dtype=np.int64)
    ids, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    small = counts < min_size
    batch_labels = np.where(small[inverse.reshape(-1)], DROPPED, labels)
    kept = counts[~small]
    return batch_labels, SmallClusterReport(
        "drop", len(ids), int((~small).sum()), int(small.sum()), int(kept.min()) if len(kept) else 0,
        int(kept.max()) if len(kept) else 0, dropped=int(small.sum()), dropped_pairs=int(counts[small].sum()))


def bin_small_clusters(labels: np.ndarray, earlier: np.ndarray, earlier_batches: np.ndarray, features: np.ndarray,
                       min_size: int) -> tuple[np.ndarray, SmallClusterReport]:
    """Group small clusters into batch-sized bins inside their earlier-stage cluster, so no pair is lost and the
    stages stay nested.

    `labels`: this stage's accumulated labels; `earlier`: the accumulated labels before this stage (zeros before
    stage 1: one earlier cluster holds everything); `earlier_batches`: the batch labels the earlier stage trained
    on (zeros before stage 1). Every cluster of `labels` lies inside one `earlier` cluster by construction.

    Inside each earlier cluster, clusters of `min_size` or more stay as they are. The small ones are binned:
    the smallest is joined with the nearest (by centroid) small one, again and again, until at most one unit
    below `min_size` is left, so a bin holds from `min_size` to under 2 x `min_size` pairs. That leftover is
    folded into the nearest cluster or bin of the same earlier cluster (it adds less than one batch).

    An earlier cluster smaller than `min_size` as a whole cannot fill a batch by itself: it is merged with its
    nearest neighbour inside the batch cluster the earlier stage trained it in (these merges are counted as
    `undersized_earlier`), so the batches of successive stages still nest. Only if that batch cluster too is
    below `min_size` (not expected: each batch cluster of an earlier `bin` stage fills a batch) is it merged
    with its nearest neighbour anywhere (`crossed`). The labels returned keep the label of one cluster inside
    each bin, so a bin's label still names its earlier cluster.

    Nesting has a price: an earlier cluster holding less than two batches cannot be split into two batch-sized
    groups, so its subclusters are binned back into the whole earlier cluster. When that holds for all of them,
    the stage trains on the earlier stage's batches again (the diagnostics report NMI 1 and warn).
    """
    units = _Units(np.asarray(labels, dtype=np.int64), features)
    parent, parent_batch = np.asarray(earlier)[units.first], np.asarray(earlier_batches)[units.first]
    bins = folded = 0
    for p in np.unique(parent):
        group = parent == p
        units.fold_small(group, min_size, into_small_only=True)
        bins += int((units.alive & group & (units.found < min_size) & (units.counts > units.found)).sum())
        folded += units.fold_small(group, min_size)  # the one leftover, into the nearest unit of its earlier cluster
    undersized = sum(units.fold_small(parent_batch == b, min_size) for b in np.unique(parent_batch))
    crossed = units.fold_small(units.everything(), min_size)
    return units.labels(), units.report("bin", min_size, bins=bins, folded=folded, undersized_earlier=undersized,
                                        crossed=crossed)


def plan_batches(rule: str, labels: np.ndarray, earlier: np.ndarray, earlier_batches: np.ndarray,
                 features: np.ndarray, min_size: int) -> tuple[np.ndarray, SmallClusterReport]:
    """The batch labels of one stage under `rule` (one of `SMALL_CLUSTER_RULES`) and what the rule did.

    Arguments as for `bin_small_clusters`; each rule uses what it needs."""
    if rule not in SMALL_CLUSTER_RULES:
        raise ValueError(f"unknown small-cluster rule {rule!r}; expected one of {', '.join(SMALL_CLUSTER_RULES)}")
    return SMALL_CLUSTER_RULES[rule](labels, earlier, earlier_batches, features, min_size)


# The `--small-clusters` choices, name -> rule; the first is the default.
SMALL_CLUSTER_RULES = {
    "merge": lambda labels, earlier, earlier_batches, features, n: merge_small_clusters(labels, features, n),
    "drop": lambda labels, earlier, earlier_batches, features, n: drop_small_clusters(labels, n),
    "bin": bin_small_clusters,
}


def describe(report: dict) -> str:
    """One line on what the rule did to a stage's clusters, for the log (`report`: a SmallClusterReport's dict)."""
    used = (f"{report['clusters_used']} clusters used ({report['clusters_found']} found, "
            f"{report.get('small', '?')} small")
    rule = report.get("rule", "merge")  # a clusters.json written before the rules existed: merge
    if rule == "drop":
        return f"{used}: {report['dropped']} dropped with {report['dropped_pairs']} pairs)"
    if rule == "bin":
        return (f"{used}: {report['bins']} bins, {report['folded']} leftovers folded, {report['undersized_earlier']} "
                f"merges of earlier clusters below a batch, {report['crossed']} across earlier batches)")
    return f"{used}: {report['merged']} merged)"
