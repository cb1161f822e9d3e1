"""Training batches: an endless, seeded, rank-aware stream whose position resumes on any number of ranks.

Each epoch is a seeded permutation of all rows, cut into global batches of `batch_size x world_size` rows (the
incomplete last one is dropped, so every rank runs the same number of steps); rank `r` takes rows
`[r * batch_size, (r + 1) * batch_size)` of each global batch, so the ranks' shares are disjoint and together are
the global batch. The position is (epoch, samples consumed globally in the epoch), which does not depend on how
the global batch is laid out over ranks: a checkpoint written by 2 ranks with batch b resumes on 1 rank with
batch 2b at exactly the same data.
"""

from __future__ import annotations

from collections.abc import Sized

import torch
from torch.utils.data import default_collate

from loopfit.errors import LoopfitError


class BatchStream:
    """Endless, seeded batches; rank `rank` takes its slice of each global batch of a per-epoch permutation."""

    def __init__(self, dataset: Sized, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.dataset, self.batch_size, self.seed, self.rank = dataset, batch_size, seed, rank
        self.global_batch = batch_size * world_size
        self.per_epoch = len(dataset) // self.global_batch  # the incomplete last global batch is dropped
        self.epoch, self.consumed = 0, 0
        self._perm: tuple[int, torch.Tensor] | None = None

    def _permutation(self) -> torch.Tensor:
        # Cached for the current epoch: a permutation of every row costs O(rows), drawn once per epoch, not per batch.
        if self._perm is None or self._perm[0] != self.epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            self._perm = (self.epoch, torch.randperm(len(self.dataset), generator=g))
        return self._perm[1]

    def next(self) -> dict:
        """This rank's share of the next global batch, collated (a dict of stacked tensors)."""
        if self.consumed >= self.per_epoch:
            self.epoch, self.consumed = self.epoch + 1, 0
        start = self.consumed * self.global_batch + self.rank * self.batch_size
        idx = self._permutation()[start : start + self.batch_size].tolist()
        self.consumed += 1
        return default_collate([self.dataset[i] for i in idx])

    def state_dict(self) -> dict:
        """The position in samples, not batches: the same on any world size with the same global batch."""
        return {"epoch": self.epoch, "samples": self.consumed * self.global_batch}

    def load_state_dict(self, state: dict) -> None:
        if state["samples"] % self.global_batch:
            raise LoopfitError(
                f"the checkpoint stopped {state['samples']} samples into an epoch, not a multiple of this run's global "
                f"batch ({self.global_batch}); resume with a global batch (batch_size x ranks) that divides it"
            )
        self.epoch, self.consumed = state["epoch"], state["samples"] // self.global_batch
