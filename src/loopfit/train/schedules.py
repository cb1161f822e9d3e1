"""Schedules of the step: learning rate (WSD, cosine) and the loop depth (`DepthSchedule`).

The lr and the curricula are pure functions of the step, which is what makes resuming exact: nothing about them
needs saving beyond the step counter. The only state is the depth sampler's generator, which checkpoints save.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from loopfit.models import sample_num_steps
from loopfit.train.config import BackpropDepthSchedule, LRSchedule, MeanRecurrenceSchedule, TrainConfig


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


@functools.lru_cache(maxsize=4096)
def _depth_pmf(mean: int, min_num_steps: int) -> tuple:
    """`(R values, P(R))` of `loopfit.models.sample_num_steps(mean, ., min_num_steps=min_num_steps)`, numpy arrays.

    The sampler (arXiv:2511.07384) draws `rate ~ LogNormal(log(mean) - sigma^2 / 2, sigma = 0.5)`,
    `R = max(Poisson(rate) + 1, min_num_steps)`; the Poisson pmf is mixed over the log-rate by 64-point
    Gauss-Hermite quadrature (without a floor E[R] = mean + 1 to ~1e-9).
    """
    sigma = 0.5
    mu = math.log(max(mean, 1e-6)) - sigma**2 / 2
    nodes, weights = np.polynomial.hermite_e.hermegauss(64)
    rates = np.exp(mu + sigma * nodes)
    weights = weights / weights.sum()
    j = np.arange(0, int(rates.max() * 3 + 50))
    log_pmf = j[None, :] * np.log(rates[:, None]) - rates[:, None] - np.array([math.lgamma(x + 1) for x in j])[None, :]
    pmf = (weights[:, None] * np.exp(log_pmf)).sum(0)  # P(Poisson = j), mixed over the rate
    return np.maximum(j + 1, min_num_steps), pmf


@functools.lru_cache(maxsize=4096)
def _expected_depth(mean: int, backprop_depth: int, min_num_steps: int) -> tuple[float, float]:
    """`(E[R], E[k])` under `loopfit.models.sample_num_steps(mean, backprop_depth, min_num_steps=min_num_steps)`,
    where `k = min(backprop_depth, mean, R)` (`_depth_pmf`)."""
    r, pmf = _depth_pmf(mean, min_num_steps)
    k = np.minimum(min(backprop_depth, max(1, math.ceil(mean))), r)
    return float((pmf * r).sum()), float((pmf * k).sum())


@dataclass
class DepthSchedule:
    """The loop depth of every training step: the curricula of the mean and of the backprop depth, the seeded
    per-step draw the trainer makes (the Poisson-lognormal sampler of arXiv:2511.07384,
    `loopfit.models.sample_num_steps`), and the analytic expectations that FLOP counts and budgets integrate.

    Steps are optimizer steps, 0-based, of a run of `total_steps`; the analytic methods also take fractional steps
    (`midpoints`). Build it from a training config with `from_config`.
    """

    total_steps: int
    """Optimizer steps of the run (the ramps are fractions of it)."""
    base_mean: int
    """Mean depth without a mean ramp."""
    backprop_depth: int
    """Iterations with gradient (at most) without a backprop-depth ramp."""
    mean_schedule: MeanRecurrenceSchedule = field(default_factory=MeanRecurrenceSchedule)
    """Ramp of the mean (used when `turn_on`)."""
    backprop_schedule: BackpropDepthSchedule = field(default_factory=BackpropDepthSchedule)
    """Ramp of the backprop depth (used when `turn_on`)."""
    min_num_steps: int = 1
    """Floor of the sampled depth (`--min_num_steps`)."""
    fixed: int | None = None
    """Train at exactly this depth, all with gradient, no sampling (`--fixed_num_steps`)."""
    sampled: bool = True
    """Draw depths from the sampler; False: the nominal `R = mean`, `k = min(k, mean)` (FLOP estimates only)."""
    seed: int = 0
    """Training seed; the depth generator is seeded with `seed + 7919`."""
    generator: torch.Generator = field(init=False, repr=False, compare=False)
    """The sampler's generator: the only state (checkpoints save and restore it)."""

    def __post_init__(self):
        self.generator = torch.Generator().manual_seed(self.seed + 7919)

    @classmethod
    def from_config(cls, cfg: TrainConfig, model_mean: int) -> DepthSchedule:
        """The schedule `loopfit train` follows with `cfg`; `model_mean` is the model config's `mean_recurrence`
        (the mean when neither `cfg.mean_recurrence` nor a mean ramp sets it)."""
        return cls(
            total_steps=cfg.total_steps,
            base_mean=cfg.mean_recurrence or model_mean,
            backprop_depth=cfg.backprop_depth,
            mean_schedule=cfg.mean_recurrence_schedule,
            backprop_schedule=cfg.backprop_depth_schedule,
            min_num_steps=cfg.min_num_steps,
            fixed=cfg.fixed_num_steps,
            seed=cfg.seed,
        )

    def mean_at(self, step: float) -> int:
        """Mean depth at `step` (`fixed` with `--fixed_num_steps`)."""
        if self.fixed:
            return self.fixed
        ms = self.mean_schedule
        if ms.turn_on:
            return ramp(step, self.total_steps, ms.warmup, ms.warmup_type, ms.max_mean_rec)
        return self.base_mean

    def backprop_depth_at(self, step: float) -> int:
        """Backprop depth setting at `step`, before the sampler caps it at the mean and at the drawn R."""
        if self.fixed:
            return self.fixed
        bs = self.backprop_schedule
        if bs.turn_on:
            return ramp(step, self.total_steps, bs.warmup, bs.warmup_type, bs.max_backprop_depth)
        return self.backprop_depth

    @property
    def final_mean(self) -> int:
        """The mean depth at the end of training: the depth of the final validation and the sweep's metric."""
        return self.mean_at(self.total_steps)

    def draw(self, step: int) -> tuple[int, int]:
        """`(n_no_grad, k_grad)` of training step `step`, drawn from `generator` (one draw per step, in step order,
        as the trainer makes them; `(0, fixed)` without drawing under `fixed`)."""
        if self.fixed:
            return 0, self.fixed
        mean, k = self.mean_at(step), self.backprop_depth_at(step)
        if not self.sampled:
            k = min(k, mean)
            return mean - k, k
        return sample_num_steps(mean, k, generator=self.generator, min_num_steps=self.min_num_steps)

    def _expected(self, step: float) -> tuple[float, float]:
        if self.fixed:
            return float(self.fixed), float(self.fixed)
        mean, k = self.mean_at(step), self.backprop_depth_at(step)
        if not self.sampled:
            return float(mean), float(min(k, mean))
        return _expected_depth(mean, k, self.min_num_steps)

    def expected_depth_at(self, step: float) -> float:
        """Expected loop iterations `E[n_no_grad + k_grad]` at `step`, over the sampler's draws (analytic)."""
        return self._expected(step)[0]

    def gradient_depth_at(self, step: float) -> float:
        """Expected iterations with gradient `E[k_grad]` at `step` (analytic); the fixed-point loss's extra
        iteration is not one of them (`loopfit.flops.train_flops_per_token` adds it)."""
        return self._expected(step)[1]

    def supervised_depths_at(self, step: float, every_depth: int) -> float:
        """Expected depths the loss at every depth scores at `step`, `E[min(every_depth, R)]` (analytic)."""
        k = max(every_depth, 1)
        if self.fixed:
            return float(min(k, self.fixed))
        mean = self.mean_at(step)
        if not self.sampled:
            return float(min(k, mean))
        r, pmf = _depth_pmf(mean, self.min_num_steps)
        return float((pmf * r.clip(max=k)).sum())

    def midpoints(self, points: int) -> list[float]:
        """The (fractional) steps at the middles of `points` equal slices of training: integrating a quantity of
        the step by the midpoint rule averages it over these."""
        return [(i + 0.5) * self.total_steps / points for i in range(points)]
