"""The one depth schedule (curricula, the trainer's seeded draw, analytic expectations) and the one training-FLOP
count, checked against the sampler's draws and against torch's flop counter on a tiny looped model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_tiny_model
from torch.utils.flop_counter import FlopCounterMode

from loopfit.convert import Layout, to_looped
from loopfit.flops import flop_params, train_flops_per_token, training_flops
from loopfit.models import sample_num_steps
from loopfit.train import BackpropDepthSchedule, DistillationConfig, MeanRecurrenceSchedule, TrainConfig
from loopfit.train.schedules import DepthSchedule, ramp

pytestmark = pytest.mark.usefixtures("one_thread")


def _ramped(**kw) -> TrainConfig:
    cfg = TrainConfig(max_steps=400, backprop_depth=3, seed=5, **kw)
    cfg.mean_recurrence_schedule = MeanRecurrenceSchedule(
        turn_on=True, warmup=0.5, warmup_type="1-sqrt", max_mean_rec=6
    )
    cfg.backprop_depth_schedule = BackpropDepthSchedule(turn_on=True, warmup=0.25, max_backprop_depth=4)
    return cfg


def test_draws_are_the_trainers_draws():
    """`draw` is bit for bit the draw the trainer made before the schedule existed: ramps, then the sampler on one
    generator seeded `seed + 7919`, one draw per step."""
    cfg = _ramped(min_num_steps=2)
    sched = DepthSchedule.from_config(cfg, model_mean=4)
    g = torch.Generator().manual_seed(cfg.seed + 7919)
    old = []
    for s in range(cfg.max_steps):
        mean = ramp(s, 400, 0.5, "1-sqrt", 6)
        k = ramp(s, 400, 0.25, "linear", 4)
        old.append(sample_num_steps(mean, k, generator=g, min_num_steps=2))
    assert [sched.draw(s) for s in range(cfg.max_steps)] == old
    assert sched.generator.get_state().equal(g.get_state())  # what a checkpoint saves


def test_means_and_final_mean():
    sched = DepthSchedule.from_config(_ramped(), model_mean=4)
    assert [sched.mean_at(s) for s in (0, 100, 199, 200, 399)] == [1, 3, 6, 6, 6]  # ceil(1 + 5·(1 - sqrt(1 - t)))
    assert [sched.backprop_depth_at(s) for s in (0, 50, 100, 399)] == [1, 3, 4, 4]
    assert sched.final_mean == 6
    assert DepthSchedule.from_config(TrainConfig(), model_mean=4).final_mean == 4  # the model's mean
    assert DepthSchedule.from_config(TrainConfig(mean_recurrence=3), model_mean=4).final_mean == 3
    fixed = DepthSchedule.from_config(TrainConfig(fixed_num_steps=5), model_mean=4)
    assert (fixed.final_mean, fixed.draw(0), fixed.expected_depth_at(0), fixed.gradient_depth_at(0)) == (
        5,
        (0, 5),
        5,
        5,
    )


@pytest.mark.parametrize("floor", [1, 3])
def test_expectations_match_the_draws(floor):
    """The analytic `expected_depth_at` / `gradient_depth_at`, averaged over training, against the mean of the
    draws (min_num_steps floors and the backprop-depth ramp included)."""
    cfg = _ramped(min_num_steps=floor)
    cfg.max_steps = 4000
    sched = DepthSchedule.from_config(cfg, model_mean=4)
    draws = np.array([sched.draw(s) for s in range(cfg.max_steps)], dtype=float)
    r_mc, k_mc = draws.sum(1).mean(), draws[:, 1].mean()
    steps = range(cfg.max_steps)
    r = np.mean([sched.expected_depth_at(s) for s in steps])
    k = np.mean([sched.gradient_depth_at(s) for s in steps])
    assert r == pytest.approx(r_mc, rel=0.03) and k == pytest.approx(k_mc, rel=0.02)
    if floor == 3:  # at the first step (mean 1) E[R] = mean + 1 = 2 without a floor; the floor raises it past 3
        assert DepthSchedule(1, 1, 1).expected_depth_at(0) == pytest.approx(2.0) and sched.expected_depth_at(0) > 3


def test_training_flops_integrate_the_schedule():
    """`training_flops` of a schedule = tokens x the per-token count at each midpoint's expected depths."""
    p = {"prelude": 10, "adapter": 2, "block": 100, "coda": 5, "head": 7, "attn_block": 3}
    sched = DepthSchedule.from_config(_ramped(), model_mean=4)
    steps = sched.midpoints(50)
    want = np.mean([train_flops_per_token(p, sched.expected_depth_at(s) - sched.gradient_depth_at(s),
                                          sched.gradient_depth_at(s), seq_len=16) for s in steps])  # fmt: skip
    assert training_flops(p, 1e6, sched, 50, seq_len=16)["flops"] == pytest.approx(1e6 * want)


def test_per_token_formula_by_hand():
    p = {"prelude": 10, "adapter": 2, "block": 100, "coda": 5, "head": 7, "attn_prelude": 1, "attn_block": 3,
         "attn_coda": 1, "teacher": 50, "teacher_head": 7, "attn_teacher": 4}  # fmt: skip
    # g = k + 1 = 3 gradient iterations (fixed point), n = 2 forward-only ones, T = 8.
    n1 = 10 + 3 * 102 + 5 + 7
    attn = 8 * (12 * (1 + 3 * 3 + 1) + 4 * 2 * 3)
    teacher = 2 * (50 + 7) + 4 * 8 * 4
    got = train_flops_per_token(p, 2, 2, seq_len=8, fixed_point=True, teacher=True)
    assert got == 6 * n1 + 2 * 2 * 102 + attn + teacher
    assert train_flops_per_token(p, 2, 2) == 6 * (10 + 2 * 102 + 5 + 7) + 2 * 2 * 102  # no T: no attention term


@pytest.fixture(scope="module")
def tiny():
    # Eager attention: torch's flop counter does not count the CPU kernel of scaled_dot_product_attention.
    src = make_tiny_model("llama", num_layers=6, hidden=64, attn_implementation="eager")
    return src, to_looped(src, Layout([0], [2, 3], [5])).train()


@pytest.mark.parametrize(
    "num_steps, fixed_point, kd",
    [
        ((0, 1), False, False),
        ((3, 2), False, False),
        ((3, 2), True, False),
        ((2, 2), False, True),
        (None, False, False),
    ],
)
def test_per_token_count_matches_torch_flop_counter(tiny, num_steps, fixed_point, kd):
    """One training micro-step (the trainer's `micro_batch_loss`, forward and backward, every weight trained) at a
    fixed depth, counted by `torch.utils.flop_counter.FlopCounterMode`, within 3% of `train_flops_per_token`
    (measured: 0.3-0.4%, the gap being norm weights counted as matmul weights and the unscored last position).
    `num_steps=None`: the plain source model as the student."""
    from loopfit.train.student import Student, micro_batch_loss

    src, looped = tiny
    model = looped if num_steps is not None else src
    batch, seq = 2, 64
    ids = torch.randint(4, 260, (batch, seq), generator=torch.Generator().manual_seed(0))
    dc = DistillationConfig(enabled=kd)
    # The fused loss accumulates the head's weight gradient in place (`addmm_`), which the counter does not know.
    inplace = {torch.ops.aten.addmm_: lambda _c, a, b, **_: 2 * a[0] * a[1] * b[1]}
    with FlopCounterMode(display=False, custom_mapping=inplace) as counter:
        parts = micro_batch_loss(Student(model), src if kd else None, {"input_ids": ids, "labels": ids},
                                 num_steps, dc, torch.tensor(float(batch * (seq - 1))),
                                 fixed_point_scale=0.1 if fixed_point else 0.0)  # fmt: skip
        parts.total.backward()
    model.zero_grad(set_to_none=True)
    n, k = num_steps or (0, 0)
    want = train_flops_per_token(flop_params(model, src if kd else None), n, k, seq, fixed_point, teacher=kd)
    assert counter.get_total_flops() == pytest.approx(want * batch * seq, rel=0.03)
