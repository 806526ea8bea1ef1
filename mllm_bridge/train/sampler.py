"""LLaVA's `--group_by_modality_length`: micro-batches of one modality, mega-batches sorted by length.

As LLaVA's `LengthGroupedSampler(group_by_modality=True)` (llava/train/llava_trainer.py): image samples
(positive lengths) and text-only samples (negative lengths) are shuffled apart and cut into mega-batches of
processes x per-device batch x accumulation samples (LLaVA passes world_size * gradient_accumulation_steps as
its world size: one mega-batch is one optimizer step). Each mega-batch is sorted by length, longest first, and
dealt into its per-device batches so that their summed lengths are balanced (LLaVA's `split_to_even_chunks`);
then the full mega-batches of both modalities are shuffled together and the incomplete ones go last. So every
micro-batch holds one modality, the processes of a step get similar amounts of text, and every sample is seen
once per epoch.

Differences from LLaVA, on purpose:
- LLaVA merges the two incomplete tails into one mega-batch that mixes the modalities; here each modality's
  tail stays its own (image tail, then text tail), cut into micro-batches of near-equal size, so no micro-batch
  ever mixes them.
- The plan comes from numpy seeded with (seed, epoch), identical on every rank, and the sampler yields this
  rank's share of each global micro-batch (like `encoder.training.ClusterBatchSampler`, whose interface it
  shares): a resumed run skips exactly the micro-batches it already trained on. LLaVA draws from torch's global
  RNG and lets the Trainer shard the index stream.
- A tail whose size is not a multiple of the number of processes leaves out its last n mod P samples (a
  different few each epoch) because every rank needs an equal share; `dropped_per_epoch` counts them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler


class ModalityLengthBatchSampler(Sampler[list[int]]):
    """Yields this rank's share of each global micro-batch, planned per epoch from `lengths`.

    lengths: one per sample, > 0 for samples with an image, < 0 for text-only ones (LLaVA's
    `modality_lengths`); the magnitude is the sample's length.
    """

    def __init__(self, lengths: Sequence[int], per_device_batch_size: int, num_replicas: int = 1, rank: int = 0,
                 seed: int = 0, accumulation: int = 1):
        lengths = np.asarray(lengths, dtype=np.int64)
        if lengths.ndim != 1 or (lengths == 0).any():
            raise ValueError("lengths must be one non-zero number per sample (> 0: image, < 0: text only)")
        if per_device_batch_size < 1 or accumulation < 1:
            raise ValueError("per_device_batch_size and accumulation must be positive")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} outside 0..{num_replicas - 1}")
        self.lengths = lengths
        self.per_device_batch_size, self.accumulation = per_device_batch_size, accumulation
        self.num_replicas, self.rank, self.seed = num_replicas, rank, seed
        self.global_batch_size = per_device_batch_size * num_replicas  # samples of one global micro-batch
        self.megabatch_size = self.global_batch_size * accumulation
        self.modalities = [np.flatnonzero(lengths > 0), np.flatnonzero(lengths < 0)]  # image, text only
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Choose the epoch's plan; `start_batch` skips global micro-batches already trained (resume)."""
        self.epoch, self.start_batch = epoch, start_batch

    def _tail_shares(self, n: int) -> list[int]:
        """Per-rank batch sizes of the micro-batches an incomplete mega-batch of n samples is cut into."""
        units = n // self.num_replicas
        if units == 0:
            return []
        num = -(-n // self.global_batch_size)
        return [units // num + (i < units % num) for i in range(num)]

    @property
    def batches_per_epoch(self) -> int:
        """Global micro-batches per epoch (the same every epoch)."""
        total = 0
        for idx in self.modalities:
            full, rest = divmod(len(idx), self.megabatch_size)
            total += full * self.accumulation + len(self._tail_shares(rest))
        return total

    @property
    def dropped_per_epoch(self) -> int:
        return sum(len(idx) % self.megabatch_size % self.num_replicas for idx in self.modalities)

    def _deal(self, megabatch: np.ndarray, shares: list[int]) -> list[np.ndarray]:
        """Sort a mega-batch by length, longest first, and deal it into micro-batches (`shares`: the per-rank batch
        size of each): every sample goes to the per-device batch with the least summed length that still has
        room. Each global micro-batch is returned rank-major (rank r's share is the r-th slice)."""
        size = np.abs(self.lengths[megabatch])
        ordered = megabatch[np.argsort(-size, kind="stable")]
        room = np.repeat(np.asarray(shares), self.num_replicas)  # per-device batches, micro-batch-major
        chunks: list[list[int]] = [[] for _ in room]
        counts, totals = np.zeros(len(room), dtype=np.int64), np.zeros(len(room))
        for index, length in zip(ordered.tolist(), size[np.argsort(-size, kind="stable")].tolist()):
            target = int(np.argmin(np.where(counts < room, totals, np.inf)))
            chunks[target].append(index)
            counts[target] += 1
            totals[target] += length
        P = self.num_replicas
        return [np.asarray(sum(chunks[m * P:(m + 1) * P], []), dtype=np.int64) for m in range(len(shares))]

    def megabatches(self) -> list[list[np.ndarray]]:
        """The epoch's mega-batches (same on every rank) in training order, each a list of global micro-batches."""
        rng = np.random.default_rng([self.seed, self.epoch])
        full, tails = [], []
        per_rank = [self.per_device_batch_size] * self.accumulation
        for idx in self.modalities:
            order = rng.permutation(idx)
            count = len(order) // self.megabatch_size
            for k in range(count):
                full.append(self._deal(order[k * self.megabatch_size:(k + 1) * self.megabatch_size], per_rank))
            rest = order[count * self.megabatch_size:]
            shares = self._tail_shares(len(rest))
            if shares:
                tails.append(self._deal(rest[:sum(shares) * self.num_replicas], shares))
        return [full[i] for i in rng.permutation(len(full))] + tails

    def global_batches(self) -> list[np.ndarray]:
        """The epoch's global micro-batches (same on every rank), in training order."""
        return [batch for mega in self.megabatches() for batch in mega]

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.global_batches()[self.start_batch:]:
            share = len(batch) // self.num_replicas
            yield batch[self.rank * share:(self.rank + 1) * share].tolist()

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start_batch
