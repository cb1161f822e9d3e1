"""The training batch stream: exact resume mid-epoch and across epochs, disjoint rank shares that make up the
global batch, and a position that resumes on another number of ranks."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import Dataset

from loopfit.data import BatchStream
from loopfit.errors import LoopfitError


class Rows(Dataset):
    """Row i is a dict with `input_ids` = [i, i] (so batches show which rows they hold)."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": torch.tensor([i, i]), "labels": torch.tensor([i, -100])}


def take(stream: BatchStream, n: int) -> list[list[int]]:
    return [stream.next()["input_ids"][:, 0].tolist() for _ in range(n)]


def test_resume_gives_the_same_batches_as_an_unbroken_stream():
    # 23 rows, batches of 4: 5 batches an epoch (3 rows dropped), so 17 batches span four epochs.
    reference = take(BatchStream(Rows(23), 4, seed=7), 17)
    for stop in (1, 3, 5, 9, 10):  # mid-epoch, exactly at an epoch's end, in a later epoch, at a later end
        stream = BatchStream(Rows(23), 4, seed=7)
        first = take(stream, stop)
        resumed = BatchStream(Rows(23), 4, seed=7)
        resumed.load_state_dict(stream.state_dict())
        assert first + take(resumed, 17 - stop) == reference, stop


def test_epochs_are_reshuffled_and_seeded():
    batches = take(BatchStream(Rows(20), 5, seed=1), 8)
    epoch0, epoch1 = sum(batches[:4], []), sum(batches[4:], [])
    assert sorted(epoch0) == sorted(epoch1) == list(range(20))  # every row once per epoch
    assert epoch0 != epoch1
    assert take(BatchStream(Rows(20), 5, seed=1), 8) == batches
    assert take(BatchStream(Rows(20), 5, seed=2), 4) != batches[:4]


def test_the_incomplete_last_global_batch_is_dropped():
    stream = BatchStream(Rows(23), 2, seed=0, rank=0, world_size=2)
    assert stream.per_epoch == 5  # 23 // 4: three rows sit out each epoch
    take(stream, 5)
    assert stream.state_dict() == {"epoch": 0, "samples": 20}
    take(stream, 1)
    assert stream.state_dict() == {"epoch": 1, "samples": 4}


@pytest.mark.parametrize("world_size", [2, 3])
def test_rank_shares_are_disjoint_and_make_up_the_global_batch(world_size):
    n, b, steps = 31, 2, 12  # several epochs: the shares hold in every one
    single = take(BatchStream(Rows(n), b * world_size, seed=4), steps)
    shares = [take(BatchStream(Rows(n), b, seed=4, rank=r, world_size=world_size), steps) for r in range(world_size)]
    for step in range(steps):
        parts = [shares[r][step] for r in range(world_size)]
        assert all(len(p) == b for p in parts)  # every rank runs the same batch size
        assert sum(parts, []) == single[step]  # disjoint, and together exactly the 1-rank global batch


@pytest.mark.parametrize("stop", [2, 5, 7])  # mid-epoch, at an epoch boundary, in the next epoch
def test_two_rank_positions_resume_on_one_rank_with_twice_the_batch(stop):
    n, b = 21, 2  # 5 global batches of 4 an epoch
    ranks = [BatchStream(Rows(n), b, seed=3, rank=r, world_size=2) for r in range(2)]
    for s in ranks:
        take(s, stop)
    assert ranks[0].state_dict() == ranks[1].state_dict()  # the position is global, not per rank
    one = BatchStream(Rows(n), 2 * b, seed=3)
    one.load_state_dict(ranks[0].state_dict())
    expected = [sum(parts, []) for parts in zip(*(take(s, 6) for s in ranks))]
    assert take(one, 6) == expected


def test_a_position_the_global_batch_does_not_divide_is_refused():
    two = BatchStream(Rows(20), 2, seed=0, rank=0, world_size=2)
    take(two, 1)  # 4 samples into the epoch
    with pytest.raises(LoopfitError, match="not a multiple of this run's global batch"):
        BatchStream(Rows(20), 3, seed=0).load_state_dict(two.state_dict())
