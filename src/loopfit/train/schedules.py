"""Schedules as pure functions of the step: learning rate (WSD, cosine) and the recurrence curricula.

Being pure functions of the step is what makes resuming exact: nothing about a schedule needs to be saved beyond
the step counter itself.
"""

from __future__ import annotations

import math

import torch

from loopfit.train.config import LRSchedule


def lr_factor(step: int, total: int, s: LRSchedule) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based) of a stage of `total` steps."""
    if s.warmup_steps and step < s.warmup_steps:
        return (step + 1) / s.warmup_steps
    if s.kind == "constant":
        return 1.0
    lo = s.min_lr_ratio
    if s.kind == "cosine":
        t = (step - s.warmup_steps) / max(1, total - s.warmup_steps)
        return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    decay = max(1, round(s.decay_fraction * total)) if s.decay_fraction > 0 else 0
    start = total - decay
    if decay == 0 or step < start:
        return 1.0
    t = (step - start + 1) / decay
    return lo + (1 - lo) * (1 - min(1.0, t))


def lr_scheduler(optimizer: torch.optim.Optimizer, total: int, s: LRSchedule) -> torch.optim.lr_scheduler.LambdaLR:
    """A `LambdaLR` following `lr_factor` (its state_dict holds only the step, restored on resume)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total, s))


def ramp(step: int, total: int, warmup: float, kind: str, max_value: int) -> int:
    """Curriculum value at `step`: from 1 to `max_value` over the first `warmup * total` steps, as `ceil`.

    `linear` f(t) = t; `1-sqrt` f(t) = 1 - sqrt(1 - t), which stays below linear (slow at first, fastest at the end).
    """
    span = warmup * total
    t = 1.0 if span <= 0 else min(1.0, step / span)
    f = t if kind == "linear" else 1.0 - math.sqrt(1.0 - t)
    return max(1, math.ceil(1 + (max_value - 1) * f))
