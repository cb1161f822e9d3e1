"""Loop depth: the `num_steps` argument and the training-time depth sampler (arXiv:2511.07384, Huginn)."""

from __future__ import annotations

import math

import torch


def parse_num_steps(num_steps) -> tuple[int, int]:
    """Normalise `num_steps` (an int R, or a pair `(n_no_grad, k_grad)`) to the pair form."""
    if isinstance(num_steps, torch.Tensor):
        num_steps = num_steps.tolist()
    if isinstance(num_steps, (list, tuple)):
        if len(num_steps) != 2:
            raise ValueError(f"num_steps must be an int or a pair (n_no_grad, k_grad), got {num_steps!r}")
        n, k = int(num_steps[0]), int(num_steps[1])
    else:
        n, k = 0, int(num_steps)
    if n < 0 or k < 0 or n + k < 1:
        raise ValueError(f"num_steps must give at least one iteration (R >= 1), got {num_steps!r}")
    return n, k


def sample_num_steps(
    mean: float, backprop_depth: int, generator: torch.Generator | None = None, min_num_steps: int = 1
) -> tuple[int, int]:
    """Draw (n_no_grad, k_grad) from the Poisson-lognormal depth sampler of arXiv:2502.05171 / 2511.07384.

    `rate ~ LogNormal(log(mean) - sigma^2 / 2, sigma = 0.5)`, `R = max(Poisson(rate) + 1, min_num_steps)`; the last
    `min(k, R)` iterations keep gradients, with `k = min(backprop_depth, mean)`.
    """
    sigma = 0.5
    mu = math.log(max(mean, 1e-6)) - sigma**2 / 2
    rate = torch.exp(mu + sigma * torch.randn((), generator=generator, dtype=torch.float64))
    r = max(int(torch.poisson(rate.reshape(1), generator=generator).item()) + 1, min_num_steps)
    k = min(backprop_depth, max(1, math.ceil(mean)), r)
    return r - k, k


def generation_depth(model) -> int | None:
    """The depth R a looped model decodes at when none is given, as its `generate` picks it: the generation
    config's `num_steps` (a looped folder's default depth), else `config.mean_recurrence`; None for a plain model."""
    depth = getattr(getattr(model, "generation_config", None), "num_steps", None)
    return depth if depth is not None else getattr(model.config, "mean_recurrence", None)
