"""Next-token divergences between a student and a teacher distribution (dense logits).

Every divergence is computed in float32 on log-probabilities softened by the temperature `T`, summed over the
vocabulary, scaled by `T^2` (so gradient magnitudes do not shrink with `T`, as in Hinton et al.) and averaged over
the positions whose label is not `ignore_index`.
"""

from __future__ import annotations

import inspect
import math

import torch
from torch import nn

DIVERGENCES = ("fkl", "rkl", "skl", "skew", "jsd", "tvd")

# Log-probabilities below this are exactly zero probabilities in float32 (exp(-1e4) == 0); clamping -inf to it keeps
# every difference finite, so `0 * (-inf - -inf)` never turns into NaN, in the forward or the backward.
_LOG_FLOOR = -1e4


def check_kind(kind: str, lam: float = 0.5, alpha: float = 0.1, beta: float = 0.5) -> None:
    """Raise ValueError for an unknown divergence or an out-of-range mixing coefficient."""
    if kind not in DIVERGENCES:
        raise ValueError(f"unknown divergence kind '{kind}'; choose one of {', '.join(DIVERGENCES)}")
    for name, value in (("lam", lam), ("alpha", alpha), ("beta", beta)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}")
    if kind == "skew" and alpha >= 1.0:
        raise ValueError("skew KL with alpha = 1 compares the teacher with itself; use alpha in [0, 1)")


# The parameters each divergence reads (names of `divergence_from_logprobs` parameters) and their valid ranges:
# `(low, high, high_open)`, low always included. A parameter given for a kind that ignores it is refused, since a
# setting that silently does nothing is as misleading as a wrong one.
KIND_PARAMS: dict[str, dict[str, tuple[float, float, bool]]] = {
    "fkl": {},
    "rkl": {},
    "skl": {"lam": (0.0, 1.0, False)},
    "skew": {"alpha": (0.0, 1.0, True)},
    "jsd": {"beta": (0.0, 1.0, False)},
    "tvd": {},
}


def check_kind_params(kind: str, params: dict) -> None:
    """Raise ValueError for an unknown divergence, a parameter `kind` does not take, or a value out of its range.

    Names are checked against the parameters `divergence_from_logprobs` (what every loss ends up calling)
    accepts, so a parameter added there without an entry in `KIND_PARAMS` is refused rather than passed blindly.
    """
    if kind not in DIVERGENCES:
        raise ValueError(f"unknown divergence kind '{kind}'; choose one of {', '.join(DIVERGENCES)}")
    accepted = KIND_PARAMS[kind]
    callable_names = set(inspect.signature(divergence_from_logprobs).parameters) - {"logq", "logp", "kind"}
    for name, value in params.items():
        if name not in accepted or name not in callable_names:
            takes = ", ".join(f"{n} in {_range_text(*r)}" for n, r in accepted.items()) or "no parameters"
            raise ValueError(f"'{name}' is not a parameter of the '{kind}' divergence ({kind} takes {takes})")
        low, high, high_open = accepted[name]
        if not isinstance(value, (int, float)) or not (low <= value and (value < high if high_open else value <= high)):
            raise ValueError(f"{name} of the '{kind}' divergence must be in {_range_text(low, high, high_open)}, "
                             f"got {value}")  # fmt: skip


def _range_text(low: float, high: float, high_open: bool) -> str:
    return f"[{low:g}, {high:g}{')' if high_open else ']'}"


def _kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """`sum_v p_v (log p_v - log q_v)` over the last dim; terms with `p_v = 0` are zero (inputs already floored)."""
    return (logp.exp() * (logp - logq)).sum(-1)


def _log_mix(w: float, logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """`log(w * p + (1 - w) * q)`, stable in log space."""
    return torch.logaddexp(logp + math.log(w), logq + math.log1p(-w))


def divergence_from_logprobs(
    logq: torch.Tensor,
    logp: torch.Tensor,
    kind: str = "fkl",
    lam: float = 0.5,
    alpha: float = 0.1,
    beta: float = 0.5,
) -> torch.Tensor:
    """Per-position divergence between student `q` and teacher `p`, both given as log-probabilities.

    Args:
        logq: student log-probabilities, shape `(..., K)`, float32.
        logp: teacher log-probabilities, same shape; `-inf` marks zero probability.
        kind: one of `DIVERGENCES`: `fkl` KL(p||q), `rkl` KL(q||p), `skl` lam*FKL + (1-lam)*RKL,
            `skew` KL(p || alpha*p + (1-alpha)*q), `jsd` beta*KL(p||m) + (1-beta)*KL(q||m) with
            m = beta*p + (1-beta)*q (exactly FKL at beta=0 and RKL at beta=1), `tvd` 0.5*sum|p - q|.

    Returns:
        Tensor of shape `(...)`: the divergence at each position (no temperature scaling, no reduction).
    """
    logq = logq.clamp(min=_LOG_FLOOR)
    logp = logp.clamp(min=_LOG_FLOOR)
    if kind == "fkl" or (kind == "jsd" and beta == 0.0):
        return _kl(logp, logq)
    if kind == "rkl" or (kind == "jsd" and beta == 1.0):
        return _kl(logq, logp)
    if kind == "skl":
        return lam * _kl(logp, logq) + (1.0 - lam) * _kl(logq, logp)
    if kind == "skew":
        return _kl(logp, _log_mix(alpha, logp, logq)) if alpha > 0.0 else _kl(logp, logq)
    if kind == "jsd":
        logm = _log_mix(beta, logp, logq)
        return beta * _kl(logp, logm) + (1.0 - beta) * _kl(logq, logm)
    if kind == "tvd":
        return 0.5 * (logp.exp() - logq.exp()).abs().sum(-1)
    raise ValueError(f"unknown divergence kind '{kind}'; choose one of {', '.join(DIVERGENCES)}")


def reduce_tokens(
    per_token: torch.Tensor, num_valid: int, num_items: int | float | torch.Tensor | None
) -> torch.Tensor:
    """Sum of per-token losses divided by `num_items` (global valid count) if given, else by the local count."""
    denom = num_items if num_items is not None else max(num_valid, 1)
    if isinstance(denom, torch.Tensor):
        denom = denom.to(device=per_token.device, dtype=torch.float32)
    return per_token.sum() / denom


def kd_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    kind: str = "fkl",
    temperature: float = 1.0,
    ignore_index: int = -100,
    lam: float = 0.5,
    alpha: float = 0.1,
    beta: float = 0.5,
    num_items: int | float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Distillation divergence between dense student and teacher logits, averaged over valid tokens.

    Args:
        student_logits: `(..., V)`, any float dtype; upcast to float32 inside.
        teacher_logits: `(..., V)`, same shape; gradients are not taken through it unless it requires them.
        labels: `(...)` integer tensor aligned with the logits (position i is scored with label i; no shift
            inside). Positions equal to `ignore_index` are excluded.
        kind: one of `DIVERGENCES` (see `divergence_from_logprobs`).
        temperature: both distributions are `softmax(logits / T)`; the result is multiplied by `T^2`.
        lam, alpha, beta: mixing coefficients of `skl`, `skew` and `jsd`.
        num_items: if given, the sum over valid tokens is divided by this (the global number of valid tokens,
            so that gradient accumulation and data parallelism average correctly) instead of the local count.

    Returns:
        0-dim float32 tensor. Zero (still attached to the graph) when no position is valid.
    """
    check_kind(kind, lam, alpha, beta)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ; "
            "teacher and student must share the vocabulary (no silent truncation)"
        )
    if labels.shape != student_logits.shape[:-1]:
        raise ValueError(f"labels {tuple(labels.shape)} do not match logits {tuple(student_logits.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    valid = labels != ignore_index
    # Selecting the valid rows first keeps fully masked (possibly all -inf) rows out of every computation.
    s = student_logits[valid].float()
    t = teacher_logits[valid].float()
    logq = torch.log_softmax(s / temperature, dim=-1)
    logp = torch.log_softmax(t / temperature, dim=-1)
    per_token = divergence_from_logprobs(logq, logp, kind, lam, alpha, beta) * temperature**2
    return reduce_tokens(per_token, per_token.shape[0], num_items)


class KDLoss(nn.Module):
    """`kd_divergence` with its settings fixed at construction, for config-driven use.

    Example:
        >>> loss_fn = KDLoss("jsd", temperature=2.0, beta=0.5)
        >>> loss = loss_fn(student_logits, teacher_logits, labels)
    """

    def __init__(
        self,
        kind: str = "fkl",
        temperature: float = 1.0,
        ignore_index: int = -100,
        lam: float = 0.5,
        alpha: float = 0.1,
        beta: float = 0.5,
    ):
        super().__init__()
        check_kind(kind, lam, alpha, beta)
        self.kind, self.temperature, self.ignore_index = kind, temperature, ignore_index
        self.lam, self.alpha, self.beta = lam, alpha, beta

    def forward(self, student_logits, teacher_logits, labels, num_items=None) -> torch.Tensor:
        return kd_divergence(
            student_logits, teacher_logits, labels, self.kind, self.temperature, self.ignore_index,
            self.lam, self.alpha, self.beta, num_items,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return f"kind={self.kind}, temperature={self.temperature}"
