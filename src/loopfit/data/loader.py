"""Resumable, rank-aware batches: torchdata's `StatefulDataLoader` over a small stateful sampler.

Each epoch is a seeded permutation of all rows (or the identity without shuffling); rank `r` of `w` takes
positions `r, r + w, r + 2w, ...` of it, so the shares are disjoint and together cover every row. With
`drop_last=True` (training) every share is cut to `len // w` rows, so all ranks run the same number of steps
(the few rows cut differ from epoch to epoch); with `drop_last=False` (evaluation) nothing is cut. The sampler's
epoch and position travel in `loader.state_dict()`, so restoring it resumes mid-epoch on the exact next batch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sized
from typing import Any

import torch
from torch.utils.data import Sampler
from torchdata.stateful_dataloader import StatefulDataLoader

from loopfit.errors import LoopfitError


class RankSampler(Sampler[int]):
    """Rank `rank`'s share of a per-epoch seeded permutation; stateful (epoch, position)."""

    def __init__(self, size: int, rank: int = 0, world_size: int = 1, shuffle: bool = True, seed: int = 0, even=True):
        self.size, self.rank, self.world_size = size, rank, world_size
        self.shuffle, self.seed, self.even = shuffle, seed, even
        self.epoch = 0
        self.yielded = 0
        self._resume: int | None = None

    def set_epoch(self, epoch: int) -> None:
        """Start epoch `epoch` from its beginning at the next iteration."""
        self.epoch, self.yielded, self._resume = epoch, 0, None

    def share(self, epoch: int | None = None) -> list[int]:
        """The row indices this rank visits in `epoch` (default: the current one), in order."""
        epoch = self.epoch if epoch is None else epoch
        if self.shuffle:
            key = hashlib.sha256(f"loopfit-sampler:{self.seed}:{epoch}".encode()).digest()
            g = torch.Generator().manual_seed(int.from_bytes(key[:8], "little") & (2**63 - 1))
            order = torch.randperm(self.size, generator=g).tolist()
        else:
            order = list(range(self.size))
        mine = order[self.rank :: self.world_size]
        return mine[: self.size // self.world_size] if self.even else mine

    def __len__(self) -> int:
        return self.size // self.world_size if self.even else len(range(self.rank, self.size, self.world_size))

    def __iter__(self) -> Iterator[int]:
        start = self._resume or 0
        self._resume = None
        self.yielded = start
        for idx in self.share()[start:]:
            self.yielded += 1
            yield idx

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "yielded": self.yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch = int(state["epoch"])
        self.yielded = self._resume = int(state["yielded"])


def make_loader(
    dataset: Sized,
    batch_size: int,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    shuffle: bool = True,
    drop_last: bool = True,
    num_workers: int = 0,
) -> StatefulDataLoader:
    """A `StatefulDataLoader` over this rank's share of `dataset` (see the module docstring).

    `loader.sampler` is the `RankSampler` (its `.epoch`, `.set_epoch`); `loader.state_dict()` /
    `load_state_dict()` capture and restore the exact position, mid-epoch included.
    """
    if batch_size < 1:
        raise LoopfitError(f"the batch size must be >= 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise LoopfitError(f"rank {rank} is not in a world of {world_size}")
    sampler = RankSampler(len(dataset), rank, world_size, shuffle, seed, even=drop_last)
    if drop_last and len(sampler) < batch_size:
        raise LoopfitError(
            f"the data has {len(dataset)} rows: {len(sampler)} per rank, fewer than one batch of {batch_size}"
        )
    return StatefulDataLoader(
        dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last, num_workers=num_workers
    )


def iterate_batches(loader: StatefulDataLoader) -> Iterator[Any]:
    """Batches forever, epoch after epoch (the sampler's epoch advances at each epoch's end).

    The position is `loader.state_dict()`: restore it with `loader.load_state_dict(state)` before calling this
    on a fresh loader and the stream continues exactly where it stopped.
    """
    sampler: RankSampler = loader.sampler
    while True:
        got = False
        for batch in loader:
            got = True
            yield batch
        if not got and sampler.yielded == 0:
            raise LoopfitError("the data loader yields no batches")
        sampler.set_epoch(sampler.epoch + 1)
