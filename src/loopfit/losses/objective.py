"""The combined healing objective: `ce_scale * CE + kd_scale * KD + hidden_scale * HIDDEN`, every term logged."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ObjectiveWeights:
    """How CE, KD and hidden-state alignment are mixed."""

    alpha: float | None = None
    """Classic blend `alpha * CE + (1 - alpha) * KD`; when set it overrides `ce_scale` and `kd_scale`."""
    ce_scale: float = 1.0
    """Weight of the cross-entropy against the labels (used when `alpha` is None)."""
    kd_scale: float = 1.0
    """Weight of the logit distillation divergence (used when `alpha` is None)."""
    hidden_scale: float = 0.0
    """Weight of the hidden-state alignment loss."""

    def __post_init__(self):
        if self.alpha is not None and not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        for name in ("ce_scale", "kd_scale", "hidden_scale"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    @property
    def scales(self) -> tuple[float, float, float]:
        """(ce_scale, kd_scale, hidden_scale) after resolving `alpha`."""
        if self.alpha is not None:
            return self.alpha, 1.0 - self.alpha, self.hidden_scale
        return self.ce_scale, self.kd_scale, self.hidden_scale


def combine_losses(
    ce: torch.Tensor,
    kd: torch.Tensor | None = None,
    hidden: torch.Tensor | None = None,
    weights: ObjectiveWeights | None = None,
) -> dict[str, torch.Tensor]:
    """Weighted total plus every component, for the optimiser and the logs.

    Args:
        ce: 0-dim cross-entropy. kd: 0-dim distillation divergence or None. hidden: 0-dim alignment loss or None.
        weights: the mix (default: CE + KD, no hidden term).

    Returns:
        `{"total", "ce", "kd", "hidden"}` (only the terms given); `total` keeps the graph, the rest are detached.
    """
    ce_scale, kd_scale, hidden_scale = (weights or ObjectiveWeights()).scales
    total = ce_scale * ce
    out = {"ce": ce.detach()}
    if kd is not None:
        total = total + kd_scale * kd
        out["kd"] = kd.detach()
    if hidden is not None:
        total = total + hidden_scale * hidden
        out["hidden"] = hidden.detach()
    out["total"] = total
    return out
