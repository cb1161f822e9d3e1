"""CE + distillation fused with the lm_head: token chunks, never a `(N, V)` logits tensor for either model.

Two exact implementations:

- `fused_kd_loss` (the one to use): a `torch.autograd.Function` whose forward loops over chunks of valid tokens,
  computes the chunk's student (and teacher) logits, the losses and `d loss / d logits`, immediately turns that
  into the chunk's gradient for the hidden states and the accumulated gradient for the lm_head weight, and frees the
  chunk (Liger's scheme). Backward only scales the stored gradients. Each logits matmul runs once, so the cost is
  the matmul floor (two logits products, two gradient products) plus a few elementwise passes per chunk; the
  extra memory is one float32 weight-sized gradient plus two `(chunk, V)` logits buffers in the input dtype.
  Every divergence with a closed-form gradient (`Divergence.grad`: all the built-ins) against a dense teacher, and
  forward KL against any sparse estimator, uses it in place, row block by row block: each block is upcast to
  float32, processed while it sits in cache, and its gradient written back over the logits. Everything else takes
  the chunk's gradient with autograd on the chunk alone (exact too, a few more passes and float32 buffers): a
  divergence without a closed form, the other divergences against sparse targets, and a student whose logits are
  soft-capped (`c * tanh(logits / c)`, Gemma 2 / 3), whose cap is differentiated by autograd with the rest.
- `chunked_kd_loss`: per-chunk activation checkpointing (TRL's newer scheme). Same memory class, but the
  student logits matmul runs again in backward; kept as a reference and for the benchmark.

The gradient is computed in forward, so `KDLossOutput.total` is the only differentiable output; `.ce` and `.kd`
are detached values for logging. Calling backward twice through `total` works (the gradients are stored), but
the gradients are those of this forward's inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from loopfit.losses.divergences import _LOG_FLOOR, FKL, Divergence, resolve_kind
from loopfit.losses.estimators import Estimator, get_estimator
from loopfit.losses.sparse import check_sparse, sparse_per_token

_ROW_BLOCK = 4  # rows per elementwise block in the closed-form path on CPU: a few 4 x V float32 buffers stay in L2


def _row_block(s: torch.Tensor) -> int:
    """Rows per elementwise block: cache-sized on CPU; the whole chunk on accelerators, where each op is a kernel
    launch and small blocks would leave the device idle."""
    return _ROW_BLOCK if s.device.type == "cpu" else max(s.shape[0], 1)


def _blocks(s: torch.Tensor, y: torch.Tensor):
    """Yield `(rows, s_block, labels (b, 1), float32 s_block)` over the row blocks of `s`."""
    blk = _row_block(s)
    for i in range(0, s.shape[0], blk):
        s_blk = s[i : i + blk]
        yield slice(i, i + blk), s_blk, y[i : i + blk, None], s_blk.float()


@dataclass
class KDLossOutput:
    """Losses of one fused CE + KD evaluation (0-dim float32 tensors)."""

    total: torch.Tensor
    """`ce_scale * ce + kd_scale * kd`; the differentiable output."""
    ce: torch.Tensor
    """Cross-entropy of the student against the labels (detached)."""
    kd: torch.Tensor | None
    """Distillation divergence (detached), None when no teacher was given."""


@dataclass
class _Teacher:
    """The teacher side of one fused call: dense (hidden + weight) or sparse (ids + values)."""

    hidden: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    ids: torch.Tensor | None = None
    values: torch.Tensor | None = None
    tail: torch.Tensor | None = None
    estimator: Estimator | None = None
    softcap: float | None = None

    def chunk(self, rows: torch.Tensor) -> _Teacher:
        take = lambda x: None if x is None else x[rows]  # noqa: E731
        if self.hidden is not None:
            return _Teacher(hidden=take(self.hidden), weight=self.weight, bias=self.bias, softcap=self.softcap)
        return _Teacher(ids=take(self.ids), values=take(self.values), tail=take(self.tail), estimator=self.estimator)

    def logits(self) -> torch.Tensor:
        """The dense teacher's float32 logits, soft-capped where the teacher's family caps them."""
        return softcap(F.linear(self.hidden, self.weight, self.bias).float(), self.softcap)


def softcap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """`cap * tanh(logits / cap)` (Gemma 2's final logit soft-cap, arXiv:2408.00118), or `logits` when `cap` is None."""
    return torch.tanh(logits / cap) * cap if cap else logits


@dataclass
class _Spec:
    div: Divergence  # resolved: at the parameters given (e.g. JSD at beta = 0 is FKL itself)
    params: dict
    temperature: float
    ce_scale: float
    kd_scale: float
    softcap: float | None = None  # the student's logit soft-cap
    depth_weights: tuple[float, ...] = (1.0,)  # one per student hidden of a multi-depth call (`losses.depths`)


def _chunk_losses(s: torch.Tensor, y: torch.Tensor, teacher: _Teacher | None, spec: _Spec, logp=None):
    """Differentiable (ce_sum, kd_sum) of one chunk of float32 student logits `s` (c, V), before any soft-cap;
    `logp`: the dense teacher's tempered log-probabilities of the chunk when already computed (multi-depth calls)."""
    s = softcap(s, spec.softcap)
    ce = F.cross_entropy(s, y, reduction="sum")
    if teacher is None:
        return ce, None
    t_ = spec.temperature
    logq = torch.log_softmax(s / t_, dim=-1)
    if teacher.hidden is not None:
        logp = logp if logp is not None else torch.log_softmax(teacher.logits() / t_, dim=-1)
        per_token = spec.div(logq, logp, **spec.params) * t_**2
    else:
        per_token = sparse_per_token(
            logq, teacher.ids, teacher.values, spec.div, teacher.estimator, t_, teacher.tail, **spec.params
        )
    return ce, per_token.sum()


@torch.no_grad()
def _closed_form_grad(s: torch.Tensor, y: torch.Tensor, t: torch.Tensor | None, spec: _Spec):
    """Forward KL (+ CE) sums, and `d(ce_scale*ce + kd_scale*kd)/ds / scale` written into `s` in place.

    Returns `(ce_sum, kd_sum, scale)`; the caller multiplies the (much smaller) matmul results by `scale` instead
    of the `(c, V)` gradient. `t` (teacher logits, same shape) is overwritten too. Rows are processed in small
    blocks so that the elementwise passes per row hit cache instead of memory; each row-wise softmax is one fused
    kernel.
    """
    temp, a_ce, a_kd = spec.temperature, spec.ce_scale, spec.kd_scale
    ce_sum = torch.zeros((), dtype=torch.float32, device=s.device)
    kd_sum = torch.zeros((), dtype=torch.float32, device=s.device)
    scale = a_ce + a_kd if (t is not None and temp == 1.0) else 1.0
    # Half-precision logits are upcast block by block (in cache), and the gradient written back in place.
    for rows, s_blk, yb, sb in _blocks(s, y):
        if t is None:
            logq = torch.log_softmax(sb, -1)
            ce_sum -= logq.gather(-1, yb).sum()
            torch.exp(logq, out=sb)
            sb.scatter_add_(-1, yb, sb.new_full(yb.shape, -1.0)).mul_(a_ce)
            if sb is not s_blk:
                s_blk.copy_(sb)
            continue
        tb = t[rows].float()
        if temp != 1.0:
            logq1 = torch.log_softmax(sb, -1)
            ce_sum -= logq1.gather(-1, yb).sum()
            q1 = logq1.exp_()  # softmax(s), for the CE gradient
            logq = torch.log_softmax(sb.div_(temp), -1)
            logp = torch.log_softmax(tb.div_(temp), -1)
        else:
            logq = torch.log_softmax(sb, -1)
            ce_sum -= logq.gather(-1, yb).sum()
            logp = torch.log_softmax(tb, -1)
        p = logp.exp()
        # 0 * (-inf - -inf) is NaN exactly where p == 0; those terms are 0, so nansum is the right sum.
        kd_sum += torch.nansum(torch.sub(logp, logq, out=tb).mul_(p))
        torch.exp(logq, out=sb)
        if temp != 1.0:
            # a_ce * (softmax(s) - onehot) + a_kd * T * (softmax(s / T) - p)
            sb.sub_(p).mul_(a_kd * temp).add_(q1, alpha=a_ce)
            sb.scatter_add_(-1, yb, sb.new_full(yb.shape, -a_ce))
        else:
            # (a_ce + a_kd) * [q - a_kd / (a_ce + a_kd) * p - a_ce / (a_ce + a_kd) * onehot]
            sb.sub_(p, alpha=a_kd / scale)
            sb.scatter_add_(-1, yb, sb.new_full(yb.shape, -a_ce / scale))
        if sb is not s_blk:
            s_blk.copy_(sb)
    return ce_sum, kd_sum * temp**2, scale


@torch.no_grad()
def _closed_form_divergence_grad(s: torch.Tensor, y: torch.Tensor, t: torch.Tensor, spec: _Spec):
    """CE + a divergence with a closed-form gradient (`Divergence.grad`) against dense teacher logits `t`: sums and
    the gradient written into `s`.

    Same contract as `_closed_form_grad` (scale 1). Row blocks keep the float32 temporaries (a few `4 x V`
    buffers) in cache, so the memory is that of the logits alone, where autograd would keep several `(c, V)`
    float32 tensors per chunk. With `z = s / T`, `d (T^2 D) / ds = T * d D / dz`.
    """
    temp, a_ce, a_kd = spec.temperature, spec.ce_scale, spec.kd_scale
    ce_sum = torch.zeros((), dtype=torch.float32, device=s.device)
    kd_sum = torch.zeros((), dtype=torch.float32, device=s.device)
    for rows, s_blk, yb, sb in _blocks(s, y):
        logq1 = torch.log_softmax(sb, -1)
        ce_sum -= logq1.gather(-1, yb).sum()
        logq = (torch.log_softmax(sb / temp, -1) if temp != 1.0 else logq1).clamp(min=_LOG_FLOOR)
        logp = torch.log_softmax(t[rows].float() / temp, -1).clamp(min=_LOG_FLOOR)
        q, p = logq.exp(), logp.exp()
        value, g = spec.div.grad(logq, q, logp, p, **spec.params)
        kd_sum += value.sum()
        g.mul_(a_kd * temp).add_(logq1.exp_(), alpha=a_ce)
        g.scatter_add_(-1, yb, g.new_full(yb.shape, -a_ce))
        s_blk.copy_(g)
    return ce_sum, kd_sum * temp**2, 1.0


@torch.no_grad()
def _sparse_support_logprobs(teacher: _Teacher, temp: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Teacher log-probabilities over the k ids `(c, k)` (floored where absent) and the tail bucket `(c,)` or None."""
    logp, tail = teacher.estimator.teacher_logprobs(teacher.values.float(), teacher.tail, temp)
    return logp.clamp(min=_LOG_FLOOR), (tail.clamp(min=_LOG_FLOOR) if tail is not None else None)


@torch.no_grad()
def _closed_form_sparse_grad(s: torch.Tensor, y: torch.Tensor, teacher: _Teacher, spec: _Spec, support=None):
    """Forward KL against sparse targets (+ CE): sums and the gradient written into `s` (scale 1); `support`: the
    chunk's `_sparse_support_logprobs` when already computed (multi-depth calls).

    With `P` the teacher's distribution over the support spread onto the vocabulary (the tail bucket's mass
    distributed like the student's own mass outside the k ids), `d KD / ds = T * (softmax(s / T) - P)`.
    """
    temp, a_ce, a_kd = spec.temperature, spec.ce_scale, spec.kd_scale
    logp_all, ptail_all = support if support is not None else _sparse_support_logprobs(teacher, temp)
    ids_all = teacher.ids.long()
    ce_sum = torch.zeros((), dtype=torch.float32, device=s.device)
    kd_sum = torch.zeros((), dtype=torch.float32, device=s.device)
    for rows, s_blk, yb, sb in _blocks(s, y):
        ids, logp = ids_all[rows], logp_all[rows]
        logq1 = torch.log_softmax(sb, -1)
        ce_sum -= logq1.gather(-1, yb).sum()
        logq = torch.log_softmax(sb.div_(temp), -1) if temp != 1.0 else logq1
        lq = logq.gather(-1, ids).clamp(min=_LOG_FLOOR)
        p = logp.exp()
        kd_sum += (p * (logp - lq)).sum()
        if ptail_all is not None:
            lq_tail = logq.scatter(-1, ids, _LOG_FLOOR).logsumexp(-1).clamp(min=_LOG_FLOOR)
            lp_tail = ptail_all[rows]
            p_tail = lp_tail.exp()
            kd_sum += (p_tail * (lp_tail - lq_tail)).sum()
            # Outside the support: q_j - p_tail * q_j / q_tail; the ratio is <= 1 there (clamped for the ids,
            # which are overwritten below), so no overflow when the student's tail is empty.
            share = (logq - lq_tail[:, None]).clamp_(max=0.0).exp_().mul_(p_tail[:, None])
        g = torch.exp(logq, out=sb)  # softmax(s / T); logq is not read after this
        if ptail_all is not None:
            g.sub_(share)
            g.scatter_(-1, ids, lq.exp())
        g.scatter_add_(-1, ids, -p)
        g.mul_(a_kd * temp).add_(logq1.exp_(), alpha=a_ce)  # + a_ce * softmax(s)
        g.scatter_add_(-1, yb, g.new_full(yb.shape, -a_ce))
        if sb is not s_blk:
            s_blk.copy_(sb)
    return ce_sum, kd_sum * temp**2, 1.0


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
        w_scale = None
        for start in range(0, n, chunk_size):
            rows = slice(start, min(start + chunk_size, n))
            y = labels[rows]
            t_chunk = teacher.chunk(rows) if teacher is not None else None
            # The teacher side of the chunk, once for every depth.
            t_logits = logp = support = None
            if t_chunk is not None and autograd and dense_teacher and depths > 1:
                logp = torch.log_softmax(t_chunk.logits() / spec.temperature, dim=-1)
            elif t_chunk is not None and not autograd and not dense_teacher:
                support = _sparse_support_logprobs(t_chunk, spec.temperature)
            elif t_chunk is not None and not autograd:
                t_logits = F.linear(t_chunk.hidden, t_chunk.weight, t_chunk.bias)
                if t_chunk.softcap is not None:  # in float32: tanh in bf16 would round the teacher's logits
                    t_logits = softcap(t_logits.float(), t_chunk.softcap)
            for d, w_d in enumerate(spec.depth_weights):
                h = hidden[d, rows]
                s = F.linear(h, weight, bias)  # kept in the input dtype; upcast per row block or below
                if autograd:
                    with torch.enable_grad():
                        s_ = s.detach().float().requires_grad_()
                        ce, kd = _chunk_losses(s_, y, t_chunk, spec, logp)
                        loss = spec.ce_scale * ce + (spec.kd_scale * kd if kd is not None else 0.0)
                        (g,) = torch.autograd.grad(loss, s_)
                    ce, kd, scale = ce.detach(), (kd.detach() if kd is not None else None), 1.0
                elif support is not None:
                    ce, kd, scale = _closed_form_sparse_grad(s, y, t_chunk, spec, support)
                    g = s
                else:
                    # The kernels overwrite the teacher's logits in place: every depth but the last reads a copy.
                    t = t_logits.clone() if t_logits is not None and d < depths - 1 else t_logits
                    grad_fn = _closed_form_grad if fkl else _closed_form_divergence_grad
                    ce, kd, scale = grad_fn(s, y, t, spec)
                    del t
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
                    grad_w.add_(g.t() @ h, alpha=w_d)
                del g
            del t_logits
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
        teacher = _Teacher(hidden=th, weight=teacher_weight.detach(), bias=tb, softcap=teacher_logit_softcap)
    elif teacher_ids is not None or teacher_values is not None:
        if teacher_ids is None or teacher_values is None:
            raise ValueError("sparse teacher targets need both teacher_ids and teacher_values")
        est = get_estimator(estimator or "topk")
        check_sparse(est, teacher_ids, teacher_values, vocab)
        if teacher_ids.shape[:-1] != labels.shape:
            raise ValueError(f"teacher ids {tuple(teacher_ids.shape)} do not line up with labels {tuple(labels.shape)}")
        k = teacher_ids.shape[-1]
        tail = teacher_tail.reshape(-1)[valid] if teacher_tail is not None else None
        teacher = _Teacher(
            ids=teacher_ids.reshape(-1, k)[valid], values=teacher_values.reshape(-1, k)[valid],
            tail=tail, estimator=est,
        )  # fmt: skip
    spec = _Spec(div, params, temperature, ce_scale, kd_scale, logit_softcap)
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
    hidden, y, teacher, spec, n_valid = _prepare(
        student_hidden, lm_head_weight, labels, lm_head_bias, teacher_hidden, teacher_weight, teacher_bias,
        teacher_ids, teacher_values, teacher_tail, estimator, kind, temperature, ignore_index, kind_params,
        ce_scale, kd_scale, logit_softcap, teacher_logit_softcap,
    )  # fmt: skip
    denom = float(num_items) if num_items is not None else float(max(n_valid, 1))

    def run(h, w, b, rows, teacher_chunk):
        ce, kd = _chunk_losses(F.linear(h, w, b).float(), y[rows], teacher_chunk, spec)
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
