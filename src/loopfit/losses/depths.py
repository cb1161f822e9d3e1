"""Loss at every depth: CE + KD on the states after each of the last k loop iterations, through the fused loss.

The weights over the supervised depths sum to 1, so the loss keeps the scale of the single-depth loss (k = 1 is it
exactly):

- `uniform`: `w_j = 1 / k`. Ouro (arXiv:2510.25741) trains on the expected loss over an exit distribution,
  `sum_t p(t) L_t` plus an entropy bonus; with no exit gate, the uniform distribution over the supervised depths
  is the maximum-entropy one that bonus pulls towards. Deeply-supervised nets (arXiv:1409.5185) add every
  companion loss beside the output's in the same way.
- `linear`: `w_j = j / (1 + ... + k)`, j = 1 for the shallowest supervised depth and k for the final one: the
  shallower depths are kept readable while the final depth, the one inference runs, keeps the most weight (as
  deeply-supervised nets weight their companion losses below the output's).

The states after iterations run without gradient (truncated backprop) are supervised too: the loss is the same
function whatever `backprop_depth` is, and their terms train the coda and head (and whatever follows the state),
while the block gets gradient only through the iterations that keep it, as for the final depth.

The exit gate's stage (`exit_gate_loss`, Ouro arXiv:2510.25741) replaces the fixed weights by a per-token exit
distribution `p` over the R iterations: `sum_i p(i) L_i - beta * H(p)`. It needs each token's loss at every depth,
`depth_token_losses` (no gradient: the model is frozen in that stage, only `p` is trained).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from loopfit.losses.autocast import autocast_operands
from loopfit.losses.chunk_grad import chunk_losses
from loopfit.losses.divergences import Divergence
from loopfit.losses.estimators import Estimator
from loopfit.losses.fused import _FusedLinearKD, _prepare

DEPTH_WEIGHTINGS = ("uniform", "linear")


def depth_weights(k: int, weighting: str = "uniform") -> tuple[float, ...]:
    """Weights of `k` supervised depths, shallowest first, summing to 1 (see the module docstring).

    Raises:
        ValueError: `k < 1` or an unknown weighting.
    """
    if k < 1:
        raise ValueError(f"the number of supervised depths must be >= 1, got {k}")
    if weighting == "uniform":
        return (1.0 / k,) * k if k > 1 else (1.0,)
    if weighting == "linear":
        total = k * (k + 1) / 2
        return tuple(j / total for j in range(1, k + 1))
    raise ValueError(f"depth weighting must be one of {', '.join(DEPTH_WEIGHTINGS)}, got {weighting!r}")


@dataclass
class DepthLossOutput:
    """Losses of one multi-depth evaluation."""

    total: torch.Tensor
    """0-dim `sum_d weights[d] * (ce_scale * ce[d] + kd_scale * kd[d])`; the differentiable output."""
    ce: torch.Tensor
    """`(D,)` float32 cross-entropy at each depth, shallowest first (detached)."""
    kd: torch.Tensor | None
    """`(D,)` float32 distillation divergence at each depth (detached), None without a teacher."""


def _prepare_depths(
    student_hiddens, lm_head_weight, labels, lm_head_bias, teacher_hidden, teacher_weight, teacher_bias,
    teacher_ids, teacher_values, teacher_tail, estimator, kind, temperature, ignore_index, kind_params,
    ce_scale, kd_scale, logit_softcap, teacher_logit_softcap, chunk_size,
):  # fmt: skip
    """`fused.py`'s `_prepare` for D hidden states of the same positions: validates them and the chunk size, and
    returns (D valid-token hidden states `(n, H)`, labels, teacher, spec, n)."""
    if not student_hiddens:
        raise ValueError("give at least one student hidden state")
    if any(h.shape != student_hiddens[-1].shape for h in student_hiddens):
        raise ValueError(f"the hidden states' shapes differ: {[tuple(h.shape) for h in student_hiddens]}")
    _, y, teacher, spec, n = _prepare(
        student_hiddens[-1], lm_head_weight, labels, lm_head_bias, teacher_hidden, teacher_weight, teacher_bias,
        teacher_ids, teacher_values, teacher_tail, estimator, kind, temperature, ignore_index, kind_params,
        ce_scale, kd_scale, logit_softcap, teacher_logit_softcap,
    )  # fmt: skip
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    valid = (labels != ignore_index).reshape(-1)
    hsize = student_hiddens[-1].shape[-1]
    return [h.reshape(-1, hsize)[valid] for h in student_hiddens], y, teacher, spec, n


def fused_depth_loss(
    student_hiddens: Sequence[torch.Tensor],
    weights: Sequence[float],
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    teacher_hidden: torch.Tensor | None = None,
    teacher_weight: torch.Tensor | None = None,
    teacher_ids: torch.Tensor | None = None,
    teacher_values: torch.Tensor | None = None,
    teacher_tail: torch.Tensor | None = None,
    estimator: str | Estimator | None = None,
    kind: str | Divergence = "fkl",
    temperature: float = 1.0,
    ce_scale: float = 1.0,
    kd_scale: float = 1.0,
    ignore_index: int = -100,
    chunk_size: int = 1024,
    num_items: int | float | torch.Tensor | None = None,
    lm_head_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    logit_softcap: float | None = None,
    teacher_logit_softcap: float | None = None,
    **kind_params: float,
) -> DepthLossOutput:
    """`fused_kd_loss` on D student hidden states against one set of labels and one teacher, weighted.

    Token chunk by token chunk, the teacher's logits (or its sparse targets' log-probabilities) are computed once
    and every depth is scored against them; no `(tokens, V)` tensor exists for any depth. With one hidden state and
    weight 1 it is `fused_kd_loss` exactly.

    Args:
        student_hiddens: D `(..., H)` final (normed) hidden states of the same positions, e.g. the coda's output
            after iterations R - D + 1 .. R. weights: D floats >= 0 (e.g. `depth_weights`).
        The rest: as `fused_kd_loss`.

    Returns:
        `DepthLossOutput` (`total` differentiable; per-depth `ce` and `kd` detached).

    Raises:
        ValueError: no hidden state, a count of weights other than D, a negative weight, shapes that differ, and
            whatever `fused_kd_loss` refuses.
    """
    if len(weights) != len(student_hiddens) or any(not w >= 0 for w in weights):
        raise ValueError(f"need one weight >= 0 per hidden state ({len(student_hiddens)}), got {list(weights)}")
    *student_hiddens, lm_head_weight, lm_head_bias, teacher_hidden, teacher_weight, teacher_bias = autocast_operands(
        *student_hiddens, lm_head_weight, lm_head_bias, teacher_hidden, teacher_weight, teacher_bias
    )
    hidden, y, teacher, spec, n_valid = _prepare_depths(
        student_hiddens, lm_head_weight, labels, lm_head_bias, teacher_hidden, teacher_weight, teacher_bias,
        teacher_ids, teacher_values, teacher_tail, estimator, kind, temperature, ignore_index, kind_params,
        ce_scale, kd_scale, logit_softcap, teacher_logit_softcap, chunk_size,
    )  # fmt: skip
    hidden = torch.stack(hidden)
    spec.depth_weights = tuple(float(w) for w in weights)
    denom = float(num_items) if num_items is not None else float(max(n_valid, 1))
    total, ce, kd = _FusedLinearKD.apply(hidden, lm_head_weight, lm_head_bias, y, teacher, spec, chunk_size, denom)
    return DepthLossOutput(total=total, ce=ce, kd=kd if teacher is not None else None)


@torch.no_grad()
def depth_token_losses(
    student_hiddens: Sequence[torch.Tensor],
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    teacher_hidden: torch.Tensor | None = None,
    teacher_weight: torch.Tensor | None = None,
    teacher_ids: torch.Tensor | None = None,
    teacher_values: torch.Tensor | None = None,
    teacher_tail: torch.Tensor | None = None,
    estimator: str | Estimator | None = None,
    kind: str | Divergence = "fkl",
    temperature: float = 1.0,
    ignore_index: int = -100,
    chunk_size: int = 1024,
    lm_head_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    logit_softcap: float | None = None,
    teacher_logit_softcap: float | None = None,
    **kind_params: float,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each valid token's CE and KD at each of D depths, without gradient: the fused path's chunks, per token.

    As `fused_depth_loss`, token chunk by token chunk the teacher's log-probabilities are computed once and every
    depth scored against them, so no `(tokens, V)` tensor exists; the per-token values are those whose sums
    `fused_depth_loss` returns (`chunk_grad.chunk_losses`, unreduced).

    Args: as `fused_depth_loss` (no weights, scales or `num_items`: nothing is summed).

    Returns:
        `(ce, kd)`: `(D, n)` float32 over the n tokens whose label is not `ignore_index` (in order); `kd` None
        without a teacher.

    Raises:
        ValueError: no hidden state, shapes that differ, and whatever `fused_kd_loss` refuses.
    """
    *student_hiddens, lm_head_weight, lm_head_bias, teacher_hidden, teacher_weight, teacher_bias = autocast_operands(
        *student_hiddens, lm_head_weight, lm_head_bias, teacher_hidden, teacher_weight, teacher_bias
    )
    hidden, y, teacher, spec, n = _prepare_depths(
        student_hiddens, lm_head_weight, labels, lm_head_bias, teacher_hidden, teacher_weight, teacher_bias,
        teacher_ids, teacher_values, teacher_tail, estimator, kind, temperature, ignore_index, kind_params,
        1.0, 1.0, logit_softcap, teacher_logit_softcap, chunk_size,
    )  # fmt: skip
    ce = torch.empty(len(hidden), n, dtype=torch.float32, device=hidden[0].device)
    kd = torch.empty_like(ce) if teacher is not None else None
    for start in range(0, n, chunk_size):
        rows = slice(start, min(start + chunk_size, n))
        t_chunk = teacher.chunk(rows) if teacher is not None else None
        logp = None
        if t_chunk is not None and t_chunk.hidden is not None:
            logp = torch.log_softmax(t_chunk.logits().float() / spec.temperature, dim=-1)
        for d, h in enumerate(hidden):
            s = F.linear(h[rows], lm_head_weight, lm_head_bias).float()
            ce[d, rows], kd_d = chunk_losses(s, y[rows], t_chunk, spec, logp, reduce=False)
            if kd is not None:
                kd[d, rows] = kd_d
    return ce, kd


def exit_gate_loss(
    log_p: torch.Tensor, token_losses: torch.Tensor, entropy_scale: float, num_items: float | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The exit gate's objective (Ouro, arXiv:2510.25741): `sum_t [sum_i p_t(i) L_t,i - beta * H(p_t)] / num_items`.

    Args:
        log_p: `(n, D)` log exit distribution of n tokens over D iterations (`models.exit_gate.exit_log_probs`),
            differentiable. token_losses: `(n, D)` each token's loss after each iteration (constants).
        entropy_scale: beta >= 0. The entropy `H(p) = -sum_i p(i) log p(i)` (nats, at most log D) keeps the gate
            from collapsing onto one depth early in training (without it the optimum puts all mass on each token's
            best depth, which the gate cannot yet tell); larger beta, a flatter exit distribution.
        num_items: what the sums are divided by (the step's global count of scored tokens).

    Returns:
        `(total, entropy)`: 0-dim differentiable objective, and the detached entropy term `sum_t H(p_t) / num_items`.
    """
    if log_p.shape != token_losses.shape:
        raise ValueError(f"exit log-probabilities {tuple(log_p.shape)} and token losses "
                         f"{tuple(token_losses.shape)} differ in shape")  # fmt: skip
    p = log_p.exp()
    expected = (p * token_losses.detach()).sum()
    entropy = -(p * log_p).sum()
    total = (expected - entropy_scale * entropy) / num_items
    return total, (entropy / num_items).detach()
