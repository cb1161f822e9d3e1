"""The resumable, rank-aware loader: exact resume mid-epoch and across epochs, disjoint covering rank shares."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.utils.data import Dataset

from loopfit.data import iterate_batches, make_loader
from loopfit.errors import LoopfitError


class Rows(Dataset):
    """Row i is a dict with `input_ids` = [i, i] (so batches show which rows they hold)."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": torch.tensor([i, i]), "labels": torch.tensor([i, -100])}


def rows_of(batch) -> list[int]:
    return batch["input_ids"][:, 0].tolist()


def take(stream, n: int) -> list[list[int]]:
    return [rows_of(b) for b in itertools.islice(stream, n)]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_gives_the_same_batches_as_an_uninterrupted_run(num_workers):
    # 23 rows, batches of 4: 5 batches an epoch (3 rows dropped), so 17 batches span four epochs.
    reference = take(iterate_batches(make_loader(Rows(23), 4, seed=7, num_workers=num_workers)), 17)
    stops = (1, 3, 5, 9) if num_workers == 0 else (3, 5)
    for stop in stops:  # mid-epoch, exactly at an epoch's end, in a later epoch
        loader = make_loader(Rows(23), 4, seed=7, num_workers=num_workers)
        stream = iterate_batches(loader)
        first = take(stream, stop)
        state = loader.state_dict()
        resumed = make_loader(Rows(23), 4, seed=7, num_workers=num_workers)
        resumed.load_state_dict(state)
        assert first + take(iterate_batches(resumed), 17 - stop) == reference, stop


def test_epochs_are_reshuffled_and_seeded():
    batches = take(iterate_batches(make_loader(Rows(20), 5, seed=1)), 8)
    epoch0, epoch1 = sum(batches[:4], []), sum(batches[4:], [])
    assert sorted(epoch0) == sorted(epoch1) == list(range(20))  # every row once per epoch
    assert epoch0 != epoch1
    assert take(iterate_batches(make_loader(Rows(20), 5, seed=1)), 8) == batches
    assert take(iterate_batches(make_loader(Rows(20), 5, seed=2)), 4) != batches[:4]
    assert sum(take(iterate_batches(make_loader(Rows(20), 5, shuffle=False)), 4), []) == list(range(20))


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("epoch", [0, 1])
def test_rank_shares_are_disjoint_and_cover_the_data(world_size, epoch):
    n = 31
    shares = []
    for rank in range(world_size):
        loader = make_loader(Rows(n), 2, seed=4, rank=rank, world_size=world_size, drop_last=False)
        loader.sampler.set_epoch(epoch)
        shares.append(sum((rows_of(b) for b in loader), []))
    everything = sum(shares, [])
    assert sorted(everything) == list(range(n))  # disjoint and complete
    # Training mode: equal shares (same number of steps on every rank), still disjoint.
    even = []
    for rank in range(world_size):
        loader = make_loader(Rows(n), 2, seed=4, rank=rank, world_size=world_size)
        loader.sampler.set_epoch(epoch)
        even.append(sum((rows_of(b) for b in loader), []))
    assert len({len(s) for s in even}) == 1 and len(set(sum(even, []))) == len(sum(even, []))
    assert len(even[0]) == (n // world_size) // 2 * 2


def test_loader_input_errors():
    with pytest.raises(LoopfitError, match="rank 2"):
        make_loader(Rows(10), 2, rank=2, world_size=2)
    with pytest.raises(LoopfitError, match="batch size"):
        make_loader(Rows(10), 0)
    with pytest.raises(LoopfitError, match="fewer than one batch"):
        make_loader(Rows(10), 4, world_size=3)
