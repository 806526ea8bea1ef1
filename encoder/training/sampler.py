"""Global batches drawn from one cluster each, split into equal, disjoint shares for every process.

Multistage Contrastive Learning needs every *global* batch (all processes together) to come from a single
cluster, so the negatives of a stage are pairs that earlier stages could not tell apart. A per-rank sampler
(DistributedSampler style) would mix clusters across ranks; this sampler plans the global batches once, with
the same seed on every rank, and hands each rank its contiguous share.

Every pair of a cluster is used exactly once per epoch: a cluster of n pairs becomes ceil(n / G) batches
of near-equal size (between G/2 and G pairs once n >= G). Only when n is not a multiple of the number of
processes are its last n mod P pairs (a different few each epoch) left out, because gathered batches must be
equally sized on all ranks; `dropped_per_epoch` counts them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler


class ClusterBatchSampler(Sampler[list[int]]):
    """Yields this rank's share of each global batch; all labels equal = ordinary shuffled batches."""

    def __init__(self, labels: Sequence[int] | np.ndarray, global_batch_size: int, num_replicas: int = 1,
                 rank: int = 0, seed: int = 0):
        if global_batch_size < num_replicas or global_batch_size % num_replicas:
            raise ValueError(f"global batch {global_batch_size} must be a positive multiple of the "
                             f"{num_replicas} processes")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} outside 0..{num_replicas - 1}")
        self.labels = np.asarray(labels)
        self.global_batch_size = global_batch_size
        self.num_replicas, self.rank, self.seed = num_replicas, rank, seed
        self.epoch = 0
        self.start_batch = 0
        self.clusters = {int(c): np.flatnonzero(self.labels == c) for c in np.unique(self.labels)}

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Choose the epoch's shuffle; `start_batch` skips global batches already trained (resume)."""
        self.epoch, self.start_batch = epoch, start_batch

    @property
    def dropped_per_epoch(self) -> int:
        return sum(len(idx) % self.num_replicas for idx in self.clusters.values())

    def _batch_sizes(self, n: int) -> list[int]:
        units = n // self.num_replicas  # batches are built from units of one pair per rank
        if units == 0:
            return []
        num = -(-n // self.global_batch_size)
        return [self.num_replicas * (units // num + (i < units % num)) for i in range(num)]

    def global_batches(self) -> list[np.ndarray]:
        """The epoch's global batches (same on every rank), in training order."""
        rng = np.random.default_rng([self.seed, self.epoch])
        batches = []
        for cluster in sorted(self.clusters):
            order = rng.permutation(self.clusters[cluster])
            start = 0
            for size in self._batch_sizes(len(order)):
                batches.append(order[start:start + size])
                start += size
        return [batches[i] for i in rng.permutation(len(batches))]

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.global_batches()[self.start_batch:]:
            share = len(batch) // self.num_replicas
            yield batch[self.rank * share:(self.rank + 1) * share].tolist()

    @property
    def batches_per_epoch(self) -> int:
        return sum(len(self._batch_sizes(len(idx))) for idx in self.clusters.values())

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start_batch


def endless_batches(loader, sampler: ClusterBatchSampler, batches_done: int):
    """This rank's micro-batches epoch after epoch, starting after the `batches_done` global batches already
    trained on (a resumed run continues mid-epoch exactly where it stopped)."""
    while True:
        epoch, start = divmod(batches_done, sampler.batches_per_epoch)
        sampler.set_epoch(epoch, start)
        for batch in loader:
            batches_done += 1
            yield batch
