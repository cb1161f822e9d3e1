"""Divergences against a sparse teacher: k token ids per position plus their log-probabilities or sample counts.

How a record becomes targets, and the bias of each way, is the estimator's (`loopfit.losses.estimators`: `topk`,
`topk_tail`, `sampled`); this module scores a student against those targets with any divergence.
"""

from __future__ import annotations

import torch

from loopfit.losses.divergences import Divergence, reduce_tokens, resolve_kind
from loopfit.losses.estimators import ESTIMATORS, Estimator, get_estimator, log1mexp, tail_from_logprobs

__all__ = ["ESTIMATORS", "SparseKDLoss", "log1mexp", "sparse_kd_divergence", "sparse_per_token", "tail_from_logprobs"]


def check_sparse(
    estimator: str | Estimator, teacher_ids: torch.Tensor, teacher_values: torch.Tensor, vocab_size: int | None = None
) -> None:
    """Raise ValueError for an unknown estimator, mismatched shapes or ids outside the student's vocabulary."""
    get_estimator(estimator)
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
    kind: str | Divergence,
    estimator: str | Estimator,
    temperature: float,
    tail_logmass: torch.Tensor | None = None,
    **kind_params: float,
) -> torch.Tensor:
    """Per-position divergence (times `T^2`) from the student's full log-probabilities at temperature T.

    Args:
        logq_full: `(n, V)` float32 `log_softmax(student_logits / T)`.
        teacher_ids: `(n, k)` integer ids. teacher_values: `(n, k)` log-probabilities at T = 1 (`topk`,
            `topk_tail`) or counts (`sampled`). tail_logmass: `(n,)` log of the teacher mass outside the k ids
            (`topk_tail` only; derived from the values when None).
        kind, kind_params: the divergence and its parameters, as in `kd_divergence`.

    Returns:
        `(n,)` float32.
    """
    div, kp = resolve_kind(kind, kind_params)
    est = get_estimator(estimator)
    ids, values = teacher_ids.long(), teacher_values.float()
    logp, logp_tail = est.teacher_logprobs(values, tail_logmass, temperature)
    logq, logq_tail = est.student_logprobs(logq_full, ids, values)
    if logp_tail is not None:
        logp = torch.cat([logp, logp_tail.unsqueeze(-1)], dim=-1)
        logq = torch.cat([logq, logq_tail.unsqueeze(-1)], dim=-1)
    return div(logq, logp, **kp) * temperature**2


def sparse_kd_divergence(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_values: torch.Tensor,
    labels: torch.Tensor,
    kind: str | Divergence = "fkl",
    estimator: str | Estimator = "topk",
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
        kind: a name in `DIVERGENCES` or a `Divergence`; estimator: `topk` | `topk_tail` | `sampled` or an
            `Estimator` (see `loopfit.losses.estimators`).
        tail_logmass: `(...)` log teacher mass outside the k ids for `topk_tail`; derived from the values if None.
        num_items: global count of valid tokens to divide by instead of the local count.
        kind_params: the divergence's parameters (`lam`, `alpha`, `beta` for `skl`, `skew`, `jsd`).

    Returns:
        0-dim float32 tensor.
    """
    resolve_kind(kind, kind_params)
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
        self, kind: str | Divergence = "fkl", estimator: str | Estimator = "topk", temperature: float = 1.0,
        ignore_index: int = -100, **kind_params: float,
    ):  # fmt: skip
        super().__init__()
        resolve_kind(kind, kind_params)
        get_estimator(estimator)
        self.kind, self.estimator, self.temperature = kind, estimator, temperature
        self.ignore_index, self.kind_params = ignore_index, kind_params

    def forward(self, student_logits, teacher_ids, teacher_values, labels, tail_logmass=None, num_items=None):
        return sparse_kd_divergence(
            student_logits, teacher_ids, teacher_values, labels, self.kind, self.estimator, self.temperature,
            self.ignore_index, tail_logmass, num_items, **self.kind_params,
        )  # fmt: skip
