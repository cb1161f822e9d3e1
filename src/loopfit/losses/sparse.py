"""Divergences against a sparse teacher: k token ids per position plus their log-probabilities or sample counts.

Three estimators of the teacher distribution (the student always keeps its full-vocabulary normaliser):

- `topk`: the k cached tokens, renormalised among themselves (at temperature T: `softmax(logp_k / T)`). Biased:
  head probabilities are inflated by `1 / P(top-k)` and every other token is pushed towards zero.
- `topk_tail`: the k tokens plus one tail bucket holding the teacher's remaining mass; the student's mass outside
  the k tokens is aggregated into its own tail bucket. Biased for k < V (the tail's shape is lost, and at T != 1
  the tail bucket is softened as if it were one token), exact at k = V.
- `sampled`: ids drawn from the teacher distribution with their counts (random-sampling KD, arXiv:2503.16870);
  `counts / n` is an unbiased estimate of the teacher distribution at the temperature the draws were made with,
  so the forward-KL gradient is unbiased. The other kinds are non-linear in the teacher probabilities and stay
  biased with it. Positions padded with count 0 are ignored.

The comparison runs over the support (the k ids, plus the tail bucket for `topk_tail`) with the student's
full-vocabulary probabilities there. For `topk` and `sampled` the student's mass outside the support appears only
through that normaliser: forward KL stays >= 0 and has the right gradient, while reverse-type kinds are
approximations that can dip slightly below zero.
"""

from __future__ import annotations

import torch

from loopfit.losses.divergences import _LOG_FLOOR, check_kind, divergence_from_logprobs, reduce_tokens

ESTIMATORS = ("topk", "topk_tail", "sampled")
_TAIL_NOISE = -13.815510557964274  # log(1e-6)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """`log(1 - exp(x))` for `x <= 0`, accurate on both sides of `-log 2`; `x` clamped just below 0 so that a
    zero remainder gives a very negative finite value with a zero (not NaN) gradient."""
    x = x.clamp(max=-1e-30)
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def tail_from_logprobs(values: torch.Tensor) -> torch.Tensor:
    """Log of the teacher mass outside the k tokens, from their full-vocabulary log-probabilities `(..., k)`.

    `1 - sum(p_k)` is only as accurate as the rounding of the k values, so a remainder below 1e-6 is taken as
    zero (log-mass `-1e4`): otherwise rounding noise at k = V would become a visible tail once softened by T > 1.
    Whoever has the full distribution (the cache writer) should store the exact tail instead.
    """
    tail = log1mexp(torch.logsumexp(values.float(), dim=-1))
    return torch.where(tail < _TAIL_NOISE, _LOG_FLOOR, tail)


def check_sparse(
    estimator: str, teacher_ids: torch.Tensor, teacher_values: torch.Tensor, vocab_size: int | None = None
) -> None:
    """Raise ValueError for an unknown estimator, mismatched shapes or ids outside the student's vocabulary."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown sparse estimator '{estimator}'; choose one of {', '.join(ESTIMATORS)}")
    if teacher_ids.shape != teacher_values.shape:
        raise ValueError(f"teacher ids {tuple(teacher_ids.shape)} and values {tuple(teacher_values.shape)} differ")
    if teacher_ids.dtype.is_floating_point:
        raise ValueError(f"teacher ids must be an integer tensor, got {teacher_ids.dtype}")
    if vocab_size is not None and teacher_ids.numel() and int(teacher_ids.max()) >= vocab_size:
        raise ValueError(
            f"teacher id {int(teacher_ids.max())} is outside the student vocabulary of size {vocab_size}; "
            "teacher and student must share the vocabulary"
        )


def sparse_per_token(
    logq_full: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_values: torch.Tensor,
    kind: str,
    estimator: str,
    temperature: float,
    tail_logmass: torch.Tensor | None = None,
    lam: float = 0.5,
    alpha: float = 0.1,
    beta: float = 0.5,
) -> torch.Tensor:
    """Per-position divergence (times `T^2`) from the student's full log-probabilities at temperature T.

    Args:
        logq_full: `(n, V)` float32 `log_softmax(student_logits / T)`.
        teacher_ids: `(n, k)` integer ids. teacher_values: `(n, k)` log-probabilities at T = 1 (`topk`,
            `topk_tail`) or counts (`sampled`). tail_logmass: `(n,)` log of the teacher mass outside the k ids
            (`topk_tail` only; derived from the values when None).

    Returns:
        `(n,)` float32.
    """
    ids = teacher_ids.long()
    values = teacher_values.float()
    logq = logq_full.gather(-1, ids)
    if estimator == "sampled":
        present = values > 0
        logp = torch.where(present, values.clamp(min=1e-30).log(), _LOG_FLOOR)
        logp = logp - torch.logsumexp(logp, dim=-1, keepdim=True)
        # Padding entries (count 0) are outside the support for both sides.
        logq = torch.where(present, logq, _LOG_FLOOR)
    elif estimator == "topk":
        logp = torch.log_softmax(values / temperature, dim=-1)
    elif estimator == "topk_tail":
        tail = tail_from_logprobs(values) if tail_logmass is None else tail_logmass.float()
        logp = torch.log_softmax(torch.cat([values, tail.unsqueeze(-1)], dim=-1) / temperature, dim=-1)
        # The student's tail as a sum over the other tokens, not 1 - sum(q_k), which is rounding noise at k = V.
        # Filling the k ids with a finite floor keeps an empty tail's gradient finite.
        q_tail = logq_full.scatter(-1, ids, _LOG_FLOOR).logsumexp(-1)
        logq = torch.cat([logq, q_tail.unsqueeze(-1)], dim=-1)
    else:
        raise ValueError(f"unknown sparse estimator '{estimator}'; choose one of {', '.join(ESTIMATORS)}")
    return divergence_from_logprobs(logq, logp, kind, lam, alpha, beta) * temperature**2


def sparse_kd_divergence(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_values: torch.Tensor,
    labels: torch.Tensor,
    kind: str = "fkl",
    estimator: str = "topk",
    temperature: float = 1.0,
    ignore_index: int = -100,
    tail_logmass: torch.Tensor | None = None,
    num_items: int | float | torch.Tensor | None = None,
    **kind_params: float,
) -> torch.Tensor:
    """Distillation divergence against sparse teacher targets, averaged over valid tokens.

    Args:
        student_logits: `(..., V)`, any float dtype (computed in float32).
        teacher_ids: `(..., k)` integer token ids.
        teacher_values: `(..., k)`: full-vocabulary teacher log-probabilities at T = 1 of those ids (`topk`,
            `topk_tail`; training's temperature is applied here), or sample counts (`sampled`; drawn at the
            temperature that must equal `temperature`).
        labels: `(...)`, aligned with the logits; `ignore_index` positions are excluded.
        kind: one of `DIVERGENCES`; estimator: `topk` | `topk_tail` | `sampled` (see the module docstring).
        tail_logmass: `(...)` log teacher mass outside the k ids for `topk_tail`; derived from the values if None.
        num_items: global count of valid tokens to divide by instead of the local count.
        kind_params: `lam`, `alpha`, `beta` for `skl`, `skew`, `jsd`.

    Returns:
        0-dim float32 tensor.
    """
    unknown = set(kind_params) - {"lam", "alpha", "beta"}
    if unknown:
        raise TypeError(f"unexpected keyword arguments: {', '.join(sorted(unknown))}")
    check_kind(kind, **kind_params)
    check_sparse(estimator, teacher_ids, teacher_values, student_logits.shape[-1])
    if labels.shape != student_logits.shape[:-1] or teacher_ids.shape[:-1] != labels.shape:
        raise ValueError(
            f"labels {tuple(labels.shape)}, logits {tuple(student_logits.shape)} and teacher ids "
            f"{tuple(teacher_ids.shape)} do not line up"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    valid = labels != ignore_index
    logq = torch.log_softmax(student_logits[valid].float() / temperature, dim=-1)
    tail = tail_logmass[valid] if tail_logmass is not None else None
    per_token = sparse_per_token(
        logq, teacher_ids[valid], teacher_values[valid], kind, estimator, temperature, tail, **kind_params
    )
    return reduce_tokens(per_token, per_token.shape[0], num_items)


class SparseKDLoss(torch.nn.Module):
    """`sparse_kd_divergence` with its settings fixed at construction, for config-driven use."""

    def __init__(
        self, kind: str = "fkl", estimator: str = "topk", temperature: float = 1.0, ignore_index: int = -100,
        **kind_params: float,
    ):  # fmt: skip
        super().__init__()
        check_kind(kind, **kind_params)
        if estimator not in ESTIMATORS:
            raise ValueError(f"unknown sparse estimator '{estimator}'; choose one of {', '.join(ESTIMATORS)}")
        self.kind, self.estimator, self.temperature = kind, estimator, temperature
        self.ignore_index, self.kind_params = ignore_index, kind_params

    def forward(self, student_logits, teacher_ids, teacher_values, labels, tail_logmass=None, num_items=None):
        return sparse_kd_divergence(
            student_logits, teacher_ids, teacher_values, labels, self.kind, self.estimator, self.temperature,
            self.ignore_index, tail_logmass, num_items, **self.kind_params,
        )  # fmt: skip
