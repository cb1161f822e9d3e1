"""CE + distillation fused with the lm_head: token chunks, never a `(N, V)` logits tensor for either model.

Two exact implementations:

- `fused_kd_loss` (the one to use): a `torch.autograd.Function` whose forward loops over chunks of valid tokens,
  computes the chunk's student (and teacher) logits, the losses and `d loss / d logits`, immediately turns that
  into the chunk's gradient for the hidden states and the accumulated gradient for the lm_head weight, and frees the
  chunk (Liger's scheme). Backward only scales the stored gradients. Each logits matmul runs once, so the cost is
  the matmul floor (two logits products, two gradient products) plus a few elementwise passes per chunk; the
  extra memory is one float32 weight-sized gradient (and, below float32, one weight-sized product buffer), two
  `(chunk, V)` logits buffers in the input dtype and five float32 row blocks. Every divergence with a closed-form
  gradient (`Divergence.grad`: all the built-ins) against a dense teacher, and forward KL against any sparse
  estimator, computes its gradient in place (`losses.chunk_grad`), row block by row block: each block is upcast to
  float32, processed while it sits in cache, and its gradient written back over the logits; forward KL (the
  common case) in three softmax passes per row. Everything else takes the chunk's gradient with autograd on the
  chunk alone (exact too, a few more passes and float32 buffers): a divergence without a closed form, the other
  divergences against sparse targets, and a student whose logits are soft-capped (`c * tanh(logits / c)`,
  Gemma 2 / 3), whose cap is differentiated by autograd with the rest.
- `chunked_kd_loss`: per-chunk activation checkpointing (TRL's newer scheme). Same memory class, but the
  student logits matmul runs again in backward; kept as a reference and for the benchmark.

Under `torch.autocast` the products run in the autocast dtype, as `F.linear` would
(`losses.autocast.autocast_operands`: the float32 inputs are cast before the chunk loop, where autocast cannot reach).

The gradient is computed in forward, so `KDLossOutput.total` is the only differentiable output; `.ce` and `.kd`
are detached values for logging. Calling backward twice through `total` works (the gradients are stored), but
the gradients are those of this forward's inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from loopfit.losses.autocast import autocast_operands
from loopfit.losses.chunk_grad import (
    Spec,
    Teacher,
    Workspace,
    chunk_losses,
    divergence_grad,
    fkl_grad,
    logits_into,
    sparse_fkl_grad,
    sparse_support_logprobs,
)
from loopfit.losses.divergences import FKL, Divergence, resolve_kind
from loopfit.losses.estimators import Estimator, get_estimator
from loopfit.losses.sparse import check_sparse


@dataclass
class KDLossOutput:
    """Losses of one fused CE + KD evaluation (0-dim float32 tensors)."""

    total: torch.Tensor
    """`ce_scale * ce + kd_scale * kd`; the differentiable output."""
    ce: torch.Tensor
    """Cross-entropy of the student against the labels (detached)."""
    kd: torch.Tensor | None
    """Distillation divergence (detached), None when no teacher was given."""


class _FusedLinearKD(torch.autograd.Function):
    """`hidden` is `(D, n, H)`: D student hidden states (depths) scored against the same labels and teacher, the
    loss `sum_d depth_weights[d] * (ce_scale * ce_d + kd_scale * kd_d)`. Each chunk's teacher logits (or sparse
    support) are computed once and reused for every depth; D = 1 is the plain fused loss."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, teacher, spec, chunk_size, denom):
        depths, n, dtype = hidden.shape[0], hidden.shape[1], hidden.dtype
        # A frozen lm_head (LoRA, the usual case) needs no weight gradient: skipping it saves one of the four
        # logits-sized matmuls and a float32 weight-sized buffer.
        need_w, need_b = ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2]
        grad_h = torch.zeros_like(hidden)
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if need_b else None
        ce_total = torch.zeros(depths, dtype=torch.float32, device=hidden.device)
        kd_total = torch.zeros(depths, dtype=torch.float32, device=hidden.device)
        dense_teacher = teacher is not None and teacher.hidden is not None
        # Forward KL (and CE alone) has its own in-place kernels, dense and sparse: its gradient T (q - p) is
        # linear in the teacher's probabilities, so a sparse target needs only its support.
        fkl = teacher is None or spec.div is FKL
        autograd = spec.softcap is not None or not (fkl or (dense_teacher and spec.div.grad is not None))
        # Buffers reused by every chunk: the logits (the gradient is written over them), the float32 row-block
        # temporaries, and the bf16 weight-gradient product (a fresh weight-sized tensor per chunk would cost page
        # faults each time).
        rows_max = min(chunk_size, n)
        s_buf = hidden.new_empty(rows_max, weight.shape[0])
        t_buf = teacher.hidden.new_empty(rows_max, weight.shape[0]) if dense_teacher else None
        gw_buf = torch.empty_like(weight) if grad_w is not None and dtype != torch.float32 else None
        ws = Workspace(s_buf)
        w_scale = None
        for start in range(0, n, chunk_size):
            rows = slice(start, min(start + chunk_size, n))
            y = labels[rows]
            c = y.shape[0]
            t_chunk = teacher.chunk(rows) if teacher is not None else None
            # The teacher side of the chunk, once for every depth (the kernels read `t_logits` without writing it).
            t_logits = logp = support = None
            if t_chunk is not None and autograd and dense_teacher and depths > 1:
                logp = torch.log_softmax(t_chunk.logits().float() / spec.temperature, dim=-1)
            elif t_chunk is not None and not autograd and not dense_teacher:
                support = sparse_support_logprobs(t_chunk, spec.temperature)
            elif t_chunk is not None and not autograd:
                t_logits = t_chunk.logits(out=t_buf[:c])
            for d, w_d in enumerate(spec.depth_weights):
                h = hidden[d, rows]
                s = s_buf[:c]
                logits_into(h, weight, bias, s)  # kept in the input dtype; upcast per row block
                if autograd:
                    with torch.enable_grad():
                        s_ = s.detach().float().requires_grad_()
                        ce, kd = chunk_losses(s_, y, t_chunk, spec, logp)
                        loss = spec.ce_scale * ce + (spec.kd_scale * kd if kd is not None else 0.0)
                        (g,) = torch.autograd.grad(loss, s_)
                    ce, kd, scale = ce.detach(), (kd.detach() if kd is not None else None), 1.0
                elif support is not None:
                    ce, kd, scale = sparse_fkl_grad(s, y, t_chunk, spec, support)
                    g = s
                elif fkl:
                    ce, kd, scale = fkl_grad(s, y, t_logits, spec, ws)
                    g = s
                else:
                    ce, kd, scale = divergence_grad(s, y, t_logits, spec, ws)
                    g = s
                w_scale = w_scale if w_scale is not None else scale  # the same for every chunk of one call
                del s
                ce_total[d] += ce
                if kd is not None:
                    kd_total[d] += kd
                if grad_b is not None:
                    grad_b.add_(g.sum(0, dtype=torch.float32), alpha=w_d)
                g = g.to(dtype)
                torch.mm(g, weight, out=grad_h[d, rows])
                grad_h[d, rows] *= scale * w_d / denom
                if grad_w is not None and dtype == torch.float32:
                    grad_w.addmm_(g.t(), h, alpha=w_d)
                elif grad_w is not None:
                    grad_w.add_(torch.mm(g.t(), h, out=gw_buf), alpha=w_d)
                del g
            del t_logits, logp, support
        if w_scale is not None:
            for grad in (grad_w, grad_b):
                if grad is not None:
                    grad *= w_scale / denom
        grad_w = grad_w.to(weight.dtype) if grad_w is not None else None
        grad_b = grad_b.to(bias.dtype) if grad_b is not None else None
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ce_total /= denom
        kd_total /= denom
        per_depth = spec.ce_scale * ce_total + (spec.kd_scale * kd_total if teacher is not None else 0.0)
        weights = torch.tensor(spec.depth_weights, dtype=torch.float32, device=hidden.device)
        total = per_depth[0] if depths == 1 else (weights * per_depth).sum()  # D = 1: exactly the plain loss
        ctx.mark_non_differentiable(ce_total, kd_total)
        return total, ce_total, kd_total

    @staticmethod
    def backward(ctx, grad_total, _grad_ce, _grad_kd):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        gh = grad_h * grad_total.to(grad_h.dtype) if ctx.needs_input_grad[0] else None
        gw = grad_w * grad_total.to(grad_w.dtype) if grad_w is not None else None
        gb = grad_b * grad_total.to(grad_b.dtype) if grad_b is not None else None
        return gh, gw, gb, None, None, None, None, None


def _prepare(
    student_hidden, lm_head_weight, labels, lm_head_bias, teacher_hidden, teacher_weight, teacher_bias,
    teacher_ids, teacher_values, teacher_tail, estimator, kind, temperature, ignore_index, kind_params,
    ce_scale, kd_scale, logit_softcap, teacher_logit_softcap,
):  # fmt: skip
    """Validate, flatten to tokens and keep only the valid ones; returns (hidden, labels, teacher, spec, n_valid)."""
    div, params = resolve_kind(kind, kind_params)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    for name, cap in (("logit_softcap", logit_softcap), ("teacher_logit_softcap", teacher_logit_softcap)):
        if cap is not None and not cap > 0:
            raise ValueError(f"{name} must be > 0 (or None for no cap), got {cap}")
    hsize, vocab = student_hidden.shape[-1], lm_head_weight.shape[0]
    if lm_head_weight.shape[1] != hsize:
        raise ValueError(f"lm_head weight {tuple(lm_head_weight.shape)} does not match hidden size {hsize}")
    if labels.shape != student_hidden.shape[:-1]:
        raise ValueError(f"labels {tuple(labels.shape)} do not match hidden states {tuple(student_hidden.shape)}")
    valid = (labels != ignore_index).reshape(-1)
    hidden = student_hidden.reshape(-1, hsize)[valid]
    y = labels.reshape(-1)[valid]
    teacher = None
    if teacher_hidden is not None or teacher_weight is not None:
        if teacher_hidden is None or teacher_weight is None or teacher_ids is not None:
            raise ValueError("give the teacher as teacher_hidden + teacher_weight, or as teacher_ids + teacher_values")
        if teacher_weight.shape[0] != vocab:
            raise ValueError(
                f"teacher vocabulary {teacher_weight.shape[0]} differs from the student's {vocab}; "
                "teacher and student must share the vocabulary"
            )
        if (
            teacher_hidden.shape[:-1] != student_hidden.shape[:-1]
            or teacher_hidden.shape[-1] != teacher_weight.shape[1]
        ):
            raise ValueError(
                f"teacher hidden {tuple(teacher_hidden.shape)} does not fit the student's "
                f"{tuple(student_hidden.shape)} and teacher weight {tuple(teacher_weight.shape)}"
            )
        th = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1])[valid]
        tb = teacher_bias.detach() if teacher_bias is not None else None
        teacher = Teacher(hidden=th, weight=teacher_weight.detach(), bias=tb, softcap=teacher_logit_softcap)
    elif teacher_ids is not None or teacher_values is not None:
        if teacher_ids is None or teacher_values is None:
            raise ValueError("sparse teacher targets need both teacher_ids and teacher_values")
        est = get_estimator(estimator or "topk")
        check_sparse(est, teacher_ids, teacher_values, vocab)
        if teacher_ids.shape[:-1] != labels.shape:
            raise ValueError(f"teacher ids {tuple(teacher_ids.shape)} do not line up with labels {tuple(labels.shape)}")
        k = teacher_ids.shape[-1]
        tail = teacher_tail.reshape(-1)[valid] if teacher_tail is not None else None
        teacher = Teacher(
            ids=teacher_ids.reshape(-1, k)[valid], values=teacher_values.reshape(-1, k)[valid],
            tail=tail, estimator=est,
        )  # fmt: skip
    spec = Spec(div, params, temperature, ce_scale, kd_scale, logit_softcap)
    return hidden, y, teacher, spec, int(y.shape[0])


def fused_kd_loss(
    student_hidden: torch.Tensor,
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
) -> KDLossOutput:
    """Cross-entropy plus distillation over the lm_head, chunked, with the gradient computed in forward.

    Args:
        student_hidden: `(..., H)` final (normed) student hidden states; bf16/fp16/fp32 (matmuls run in this
            dtype, everything after the logits in float32).
        lm_head_weight: `(V, H)` student lm_head weight (tied embeddings are fine). lm_head_bias: optional `(V,)`.
        labels: `(...)` targets aligned with the hidden states (no shift inside); `ignore_index` rows are skipped.
        teacher_hidden, teacher_weight, teacher_bias: dense teacher as `(..., H_t)` final hidden states and its
            `(V, H_t)` lm_head (no gradient flows to them).
        teacher_ids, teacher_values, teacher_tail, estimator: sparse teacher targets `(..., k)` and optional
            `(...)` tail log-mass, as in `sparse_kd_divergence`.
        kind, temperature, kind_params (`lam`, `alpha`, `beta`): the divergence (a name or a `Divergence`), as in
            `kd_divergence`. CE always uses temperature 1.
        ce_scale, kd_scale: `total = ce_scale * ce + kd_scale * kd`.
        chunk_size: tokens per chunk; peak extra memory is a few `chunk_size x V` float32 buffers.
        num_items: global number of valid tokens to divide by (gradient accumulation, DDP); default local count.
        logit_softcap, teacher_logit_softcap: `c` of a final logit soft-cap `c * tanh(logits / c)` (Gemma 2 / 3)
            on the student's / teacher's logits; None for none. Any logit scaling folds into the hidden states.

    Returns:
        `KDLossOutput` (`total` differentiable; `ce`, `kd` detached; `kd` None without a teacher).
    """
    student_hidden, lm_head_weight, lm_head_bias, teacher_hidden, teacher_weight, teacher_bias = autocast_operands(
        student_hidden, lm_head_weight, lm_head_bias, teacher_hidden, teacher_weight, teacher_bias
    )
    hidden, y, teacher, spec, n_valid = _prepare(
        student_hidden, lm_head_weight, labels, lm_head_bias, teacher_hidden, teacher_weight, teacher_bias,
        teacher_ids, teacher_values, teacher_tail, estimator, kind, temperature, ignore_index, kind_params,
        ce_scale, kd_scale, logit_softcap, teacher_logit_softcap,
    )  # fmt: skip
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    denom = float(num_items) if num_items is not None else float(max(n_valid, 1))
    total, ce, kd = _FusedLinearKD.apply(hidden[None], lm_head_weight, lm_head_bias, y, teacher, spec, chunk_size,
                                         denom)  # fmt: skip
    return KDLossOutput(total=total, ce=ce[0], kd=kd[0] if teacher is not None else None)


def chunked_kd_loss(
    student_hidden: torch.Tensor,
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
) -> KDLossOutput:
    """Same arguments and result as `fused_kd_loss`, by per-chunk activation checkpointing (logits recomputed in
    backward); `ce` and `kd` are differentiable here."""
    student_hidden, lm_head_weight, lm_head_bias, teacher_hidden, teacher_weight, teacher_bias = autocast_operands(
        student_hidden, lm_head_weight, lm_head_bias, teacher_hidden, teacher_weight, teacher_bias
    )
    hidden, y, teacher, spec, n_valid = _prepare(
        student_hidden, lm_head_weight, labels, lm_head_bias, teacher_hidden, teacher_weight, teacher_bias,
        teacher_ids, teacher_values, teacher_tail, estimator, kind, temperature, ignore_index, kind_params,
        ce_scale, kd_scale, logit_softcap, teacher_logit_softcap,
    )  # fmt: skip
    denom = float(num_items) if num_items is not None else float(max(n_valid, 1))

    def run(h, w, b, rows, teacher_chunk):
        ce, kd = chunk_losses(F.linear(h, w, b).float(), y[rows], teacher_chunk, spec)
        return ce, (kd if kd is not None else ce.new_zeros(()))

    ce = hidden.new_zeros((), dtype=torch.float32)
    kd = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_size):
        rows = slice(start, min(start + chunk_size, hidden.shape[0]))
        t_chunk = teacher.chunk(rows) if teacher is not None else None
        c, k = checkpoint(run, hidden[rows], lm_head_weight, lm_head_bias, rows, t_chunk, use_reentrant=False)
        ce, kd = ce + c, kd + k
    ce, kd = ce / denom, kd / denom
    if hidden.shape[0] == 0:  # keep the graph connected so backward() works on an all-masked batch
        ce = ce + 0.0 * student_hidden.sum()
    total = ce_scale * ce + (kd_scale * kd if teacher is not None else 0.0)
    return KDLossOutput(total=total, ce=ce, kd=kd if teacher is not None else None)


class FusedKDLoss(torch.nn.Module):
    """`fused_kd_loss` with its settings fixed at construction, for config-driven use.

    Example:
        >>> loss_fn = FusedKDLoss(kind="fkl", temperature=2.0, ce_scale=0.5, kd_scale=0.5)
        >>> out = loss_fn(hidden, model.lm_head.weight, labels, teacher_hidden=t_hidden, teacher_weight=t_w)
        >>> out.total.backward()
    """

    def __init__(
        self, kind: str | Divergence = "fkl", temperature: float = 1.0, ce_scale: float = 1.0, kd_scale: float = 1.0,
        ignore_index: int = -100, chunk_size: int = 1024, estimator: str | Estimator | None = None,
        **kind_params: float,
    ):  # fmt: skip
        super().__init__()
        resolve_kind(kind, kind_params)
        self.settings = dict(
            kind=kind, temperature=temperature, ce_scale=ce_scale, kd_scale=kd_scale, ignore_index=ignore_index,
            chunk_size=chunk_size, estimator=estimator, **kind_params,
        )  # fmt: skip

    def forward(self, student_hidden, lm_head_weight, labels, **teacher_and_bias) -> KDLossOutput:
        return fused_kd_loss(student_hidden, lm_head_weight, labels, **teacher_and_bias, **self.settings)
