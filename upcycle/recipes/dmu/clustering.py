"""The clusters of Multistage Contrastive Learning: k-means per modality, labels accumulated over stages.

After stage s a pair's label encodes the tuple of all its earlier joint assignments
(label = label * K^2 + text_cluster * K + image_cluster), so a stage's batches hold only pairs that every
earlier stage put together. Clusters smaller than one global batch are merged into their nearest
neighbour for batching instead of being dropped, so no stage loses data to fragmentation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.cluster import MiniBatchKMeans


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
class MergeReport:
    clusters_found: int
    clusters_used: int
    merged: int  # clusters folded into a neighbour because they were smaller than one global batch
    smallest: int
    largest: int


def merge_small_clusters(labels: np.ndarray, features: np.ndarray, min_size: int) -> tuple[np.ndarray, MergeReport]:
    """Fold every cluster smaller than `min_size` into the cluster with the nearest centroid, smallest first.

    `features` [N, D] locate the clusters (e.g. image and text embeddings side by side). Returns new labels
    (a merged cluster takes its neighbour's label) and what was done. A single remaining cluster is kept
    whatever its size; the caller checks that the data fill one batch at all.
    """
    labels = np.asarray(labels, dtype=np.int64).copy()
    ids, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    features = np.asarray(features, dtype=np.float64)
    sums = np.zeros((len(ids), features.shape[1]))
    np.add.at(sums, inverse, features)
    counts = counts.astype(np.int64)
    alive = np.ones(len(ids), dtype=bool)
    owner = np.arange(len(ids))
    merged = 0
    while alive.sum() > 1:
        small = np.flatnonzero(alive & (counts < min_size))
        if len(small) == 0:
            break
        i = small[np.argmin(counts[small])]
        others = np.flatnonzero(alive & (np.arange(len(ids)) != i))
        centroids = sums[others] / counts[others, None]
        j = others[np.argmin(((centroids - sums[i] / counts[i]) ** 2).sum(axis=1))]
        sums[j] += sums[i]
        counts[j] += counts[i]
        alive[i] = False
        owner[owner == i] = j
        merged += 1
    new_labels = ids[owner[inverse]]
    kept = counts[alive]
    return new_labels, MergeReport(len(ids), int(alive.sum()), merged, int(kept.min()), int(kept.max()))
