"""One chunk of the fused lm_head loss (`losses.fused`): CE + distillation sums and `d loss / d logits` in place.

Each function takes a chunk's student logits `s` `(c, V)` in the matmul dtype (bf16/fp16/fp32), the labels and
the teacher side, and returns `(ce_sum, kd_sum, scale)` with the chunk's gradient divided by `scale` written over
`s`; the caller multiplies the (much smaller) matmul results by `scale` instead of the `(c, V)` gradient.

- `fkl_grad`: CE alone, or CE + forward KL against dense teacher logits (the common case). Three softmax kernels
  per row at T != 1 (two at T = 1), into float32 buffers reused across row blocks and chunks; the log-sum-exps come
  from the softmax maxima, the KD value from two dot products, and the gradient is written back in one rounding.
- `divergence_grad`: any divergence with a closed-form gradient (`Divergence.grad`) against a dense teacher.
- `sparse_fkl_grad`: forward KL against sparse targets (ids + values, optional tail bucket).
- `chunk_losses`: the differentiable losses, for per-chunk autograd (a divergence without a closed form, the other
  divergences against sparse targets, a soft-capped student) and for `chunked_kd_loss`.

On CPU rows are processed in small blocks so that the float32 temporaries of a block stay in cache, each op on one
intra-op thread, with a chunk's rows split into one part per thread run side by side (`_rows_over_threads`; the
sparse kernel keeps one part, `_one_thread_on_cpu`); on accelerators a block is the whole chunk (each op is a kernel
launch).
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from loopfit.losses.compiled_fkl import _NEG_BIG, compiled_fkl, compiled_fkl_wanted
from loopfit.losses.divergences import _LOG_FLOOR, Divergence
from loopfit.losses.estimators import Estimator
from loopfit.losses.sparse import sparse_per_token

# Rows per elementwise block on CPU: each op reads and writes a few 8 x V float32 buffers (1.5 MiB at V = 49152),
# within the caches, and the ~20 ops of a block amortise their dispatch. Measured best of 1, 2, 4, 8 (one thread).
_ROW_BLOCK = 8
# Vocabulary columns per logits product on CPU (`logits_into`): a (c, 2048) output block and its (2048, H) weight
# slice stay in cache, where one (c, V) product streams a V-wide output through memory. Measured on the 2-core AVX2
# CPU, (368, 576) x (576, 49152) fp32: one product 141 ms, blocks of 1024 / 2048 / 4096 columns 131 / 131 / 138 ms.
CPU_VOCAB_BLOCK = 2048


def softcap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """`cap * tanh(logits / cap)` (Gemma 2's final logit soft-cap, arXiv:2408.00118), or `logits` when `cap` is None."""
    return torch.tanh(logits / cap) * cap if cap else logits


def logits_into(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
    """`out = h @ weight.T (+ bias)`: `h` `(c, H)`, `weight` `(V, H)`, `bias` `(V,)` or None, `out` `(c, V)` in
    `h`'s dtype; returns `out`. On CPU the product runs in blocks of `CPU_VOCAB_BLOCK` vocabulary columns (each
    written into its slice of `out`, same values as one product), elsewhere as one product."""
    vocab = weight.shape[0]
    block = CPU_VOCAB_BLOCK if h.device.type == "cpu" else vocab
    for start in range(0, vocab, block):
        cols = slice(start, min(start + block, vocab))
        if bias is None:
            torch.mm(h, weight[cols].t(), out=out[:, cols])
        else:
            torch.addmm(bias[cols], h, weight[cols].t(), out=out[:, cols])
    return out


@dataclass
class Teacher:
    """The teacher side of one fused call: dense (hidden + weight) or sparse (ids + values)."""

    hidden: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    ids: torch.Tensor | None = None
    values: torch.Tensor | None = None
    tail: torch.Tensor | None = None
    estimator: Estimator | None = None
    softcap: float | None = None

    def chunk(self, rows: slice) -> Teacher:
        take = lambda x: None if x is None else x[rows]  # noqa: E731
        if self.hidden is not None:
            return Teacher(hidden=take(self.hidden), weight=self.weight, bias=self.bias, softcap=self.softcap)
        return Teacher(ids=take(self.ids), values=take(self.values), tail=take(self.tail), estimator=self.estimator)

    def logits(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """The dense teacher's logits `(c, V)`: in the matmul dtype (into `out` when given), or in float32 when the
        teacher's family soft-caps them (tanh in bf16 would round the teacher's logits)."""
        if out is None:
            t = F.linear(self.hidden, self.weight, self.bias)
        else:
            t = logits_into(self.hidden, self.weight, self.bias, out)
        return softcap(t.float(), self.softcap) if self.softcap is not None else t


@dataclass
class Spec:
    """The loss of one fused call: the divergence resolved at its parameters (e.g. JSD at beta = 0 is FKL itself)."""

    div: Divergence
    params: dict
    temperature: float
    ce_scale: float
    kd_scale: float
    softcap: float | None = None  # the student's logit soft-cap
    depth_weights: tuple[float, ...] = (1.0,)  # one per student hidden of a multi-depth call (`losses.depths`)


class Workspace:
    """Float32 `(rows, V)` buffers reused by every row block of every chunk of one call (no allocation, and no
    page faults, per block)."""

    def __init__(self, like: torch.Tensor):
        self.like, self.bufs, self.parts = like, {}, {}

    def part(self, k: int) -> Workspace:
        """The workspace of the k-th part of a chunk processed on several threads (`_rows_over_threads`)."""
        return self.parts.setdefault(k, Workspace(self.like))

    def get(self, name: str, rows: int) -> torch.Tensor:
        buf = self.bufs.get(name)
        if buf is None or buf.shape[0] < rows:
            buf = self.bufs[name] = torch.empty(rows, self.like.shape[1], dtype=torch.float32, device=self.like.device)
        return buf[:rows]


def _one_thread_on_cpu(kernel):
    """Run a row-block kernel with one intra-op thread on CPU (the thread count restored after).

    An op on a few rows is too small to split: split across threads, each of the ~20 ops of a block ends in a
    barrier that waits for every thread, and on a busy machine a descheduled thread makes each barrier cost a
    scheduler time slice (measured under load at N = 1024: 3.75x the matmul floor with two threads, 1.70x with
    one). The matmuls between the chunks keep every thread.
    """

    @functools.wraps(kernel)
    def run(s: torch.Tensor, *args, **kwargs):
        threads = torch.get_num_threads()
        if s.device.type != "cpu" or threads == 1:
            return kernel(s, *args, **kwargs)
        torch.set_num_threads(1)
        try:
            return kernel(s, *args, **kwargs)
        finally:
            torch.set_num_threads(threads)

    return run


_POOL: tuple[int, int, ThreadPoolExecutor] | None = None  # (pid, workers, pool)


def _worker_pool(workers: int) -> ThreadPoolExecutor:
    """The process's worker threads, made again when more are needed or after a fork (a forked child has the pool
    object but not its threads). Torch's own OpenMP threads do not survive a fork either: a child that runs ops on
    more than one thread hangs with or without this pool, so DataLoader workers run on one (and never get here)."""
    global _POOL
    if _POOL is None or _POOL[0] != os.getpid() or _POOL[1] < workers:
        _POOL = (os.getpid(), workers, ThreadPoolExecutor(workers, thread_name_prefix="loopfit-rows"))
    return _POOL[2]


def _on_one_thread(kernel, *args):
    torch.set_num_threads(1)  # this worker's intra-op threads (the caller restores the global count after)
    return kernel(*args)


def _rows_over_threads(kernel):
    """Run a dense row-block kernel `(s, y, t, spec, ws) -> (ce_sum, kd_sum | None, scale)` on CPU with its rows
    split into one contiguous part per intra-op thread, each part on its own Python thread with one intra-op thread
    (torch releases the GIL inside ops), and the parts' sums added.

    Where one op spread over the threads waits at a barrier per op (`_one_thread_on_cpu`), the parts here meet
    once per chunk, so the elementwise passes, which set the time in bf16, use every core. Each part has its own
    `Workspace`; the rows of `s` they write are disjoint. One thread, an accelerator or a chunk of one row block:
    the kernel as it is.
    """

    @functools.wraps(kernel)
    def run(s, y, t, spec, ws):
        threads, blk = torch.get_num_threads(), row_block(s)
        blocks = -(-s.shape[0] // blk)
        if s.device.type != "cpu" or threads == 1 or blocks < 2:
            return _one_thread_on_cpu(kernel)(s, y, t, spec, ws)
        per = -(-blocks // min(threads, blocks)) * blk
        bounds = [(a, min(a + per, s.shape[0])) for a in range(0, s.shape[0], per)]
        part = lambda a, b, w: (s[a:b], y[a:b], None if t is None else t[a:b], spec, w)  # noqa: E731
        torch.set_num_threads(1)
        futures = []
        try:
            pool = _worker_pool(len(bounds) - 1)
            for k, (a, b) in enumerate(bounds[1:], 1):
                futures.append(pool.submit(_on_one_thread, kernel, *part(a, b, ws.part(k))))
            results = [kernel(*part(*bounds[0], ws))] + [f.result() for f in futures]
        finally:
            wait(futures)  # no worker still writing `s` once this returns or raises
            torch.set_num_threads(threads)
        ce = sum(r[0] for r in results)
        kd = None if results[0][1] is None else sum(r[1] for r in results)
        return ce, kd, results[0][2]

    return run


def row_block(s: torch.Tensor) -> int:
    """Rows per elementwise block: cache-sized on CPU; the whole chunk on accelerators, where each op is a kernel
    launch and small blocks would leave the device idle."""
    return _ROW_BLOCK if s.device.type == "cpu" else max(s.shape[0], 1)


def _blocks(s: torch.Tensor, y: torch.Tensor):
    """Yield `(rows, s_block, labels (b, 1), float32 s_block)` over the row blocks of `s`."""
    blk = row_block(s)
    for i in range(0, s.shape[0], blk):
        s_blk = s[i : i + blk]
        yield slice(i, i + blk), s_blk, y[i : i + blk, None], s_blk.float()


def _softmax_lse(x: torch.Tensor, out: torch.Tensor, x_max: torch.Tensor) -> torch.Tensor:
    """`out = softmax(x)` rows `(b, V)` in one kernel; returns the rows' log-sum-exp `(b,)`.

    The kernel computes `exp(x - max) / sum` in float32, so the largest probability is `1 / sum` (in [1/V, 1]: no
    underflow) and `logsumexp(x) = max(x) - log(max(out))`: two cheap reductions instead of a second exp pass.
    `x_max` is `x.amax(-1)`, passed in by callers that already have it.
    """
    torch.softmax(x, -1, out=out)
    return x_max - out.amax(-1).log()


@_rows_over_threads
@torch.no_grad()
def fkl_grad(s: torch.Tensor, y: torch.Tensor, t: torch.Tensor | None, spec: Spec, ws: Workspace):
    """CE (+ forward KL against dense teacher logits `t`, same shape as `s`) of a chunk: sums, gradient into `s`.

    With `q1 = softmax(s)`, `q = softmax(s / T)`, `p = softmax(t / T)` and `c = kd_scale * T`,
    `d(ce_scale * ce + kd_scale * T^2 * KL(p || q)) / ds = ce_scale * (q1 - onehot(y)) + c * (q - p)` (at T = 1,
    `q = q1`). The KD value per row is `sum_j p_j (t_j - s_j) / T + lse(s / T) - lse(t / T)`, two dot products.
    Returns `(ce_sum, kd_sum (None without a teacher), scale)`; `s` holds the gradient / scale in its own dtype,
    rounded once.
    """
    temp, a_ce, c = spec.temperature, spec.ce_scale, spec.kd_scale * spec.temperature
    separate_q = t is not None and temp != 1.0
    coef_q1 = a_ce if (separate_q or t is None) else a_ce + c  # at T = 1 the KD's q is q1
    coef_q = c if separate_q else 0.0
    scale = next((v for v in (coef_q1, coef_q, c) if v != 0.0), 1.0)
    if compiled_fkl_wanted(s.device):  # accelerators: the same math as one compiled function (compiled_fkl.py)
        sums = compiled_fkl(s, y, t, temp, a_ce, c, scale)
        if sums is not None:
            return sums[0], (sums[1] * temp**2 if t is not None else None), scale
    ce_sum = torch.zeros((), dtype=torch.float32, device=s.device)
    kd_sum = torch.zeros((), dtype=torch.float32, device=s.device)
    blk = row_block(s)
    for i in range(0, s.shape[0], blk):
        s_blk, yb = s[i : i + blk], y[i : i + blk, None]
        b = s_blk.shape[0]
        x, q1 = ws.get("x", b).copy_(s_blk), ws.get("q1", b)
        x_max = x.amax(-1)
        lse1 = _softmax_lse(x, q1, x_max)
        ce_sum += (lse1 - x.gather(-1, yb)[:, 0]).sum()
        if t is not None:
            x.clamp_(min=_NEG_BIG)  # a -inf student logit where p = 0 adds 0, not NaN, to the dot product below
            u, p = ws.get("u", b).copy_(t[i : i + blk]).clamp_(min=_NEG_BIG), ws.get("p", b)
            u_max = u.amax(-1)
            if temp != 1.0:
                u.mul_(1.0 / temp)
            lsep = _softmax_lse(u, p, u_max * (1.0 / temp))
            if separate_q:
                x.mul_(1.0 / temp)
                q = ws.get("q", b)
                lseq = _softmax_lse(x, q, x_max * (1.0 / temp))
            else:
                lseq = lse1
            kd_sum += torch.dot(p.view(-1), u.view(-1)) - torch.dot(p.view(-1), x.view(-1)) + (lseq - lsep).sum()
        # gradient / scale = (coef_q1 q1 + coef_q q - c p - a_ce onehot) / scale, written in one rounding.
        if coef_q1 != scale:
            q1.mul_(coef_q1 / scale)
        q1.scatter_add_(-1, yb, q1.new_full(yb.shape, -a_ce / scale))
        if t is None:
            s_blk.copy_(q1)
        elif separate_q:
            torch.add(q1, q.sub_(p), alpha=c / scale, out=s_blk)
        else:
            torch.add(q1, p, alpha=-c / scale, out=s_blk)
    return ce_sum, (kd_sum * temp**2 if t is not None else None), scale


@_rows_over_threads
@torch.no_grad()
def divergence_grad(s: torch.Tensor, y: torch.Tensor, t: torch.Tensor, spec: Spec, ws: Workspace):
    """CE + a divergence with a closed-form gradient (`Divergence.grad`) against dense teacher logits `t`: sums and
    the gradient written into `s` (scale 1).

    Row blocks keep the float32 temporaries in cache, so the memory is that of the logits alone, where autograd
    would keep several `(c, V)` float32 tensors per chunk. With `z = s / T`, `d (T^2 D) / ds = T * d D / dz`.
    """
    temp, a_ce, a_kd = spec.temperature, spec.ce_scale, spec.kd_scale
    ce_sum = torch.zeros((), dtype=torch.float32, device=s.device)
    kd_sum = torch.zeros((), dtype=torch.float32, device=s.device)
    blk = row_block(s)
    for i in range(0, s.shape[0], blk):
        s_blk, yb = s[i : i + blk], y[i : i + blk, None]
        b = s_blk.shape[0]
        sb, tb = ws.get("x", b).copy_(s_blk), ws.get("u", b).copy_(t[i : i + blk])
        logq1 = torch.log_softmax(sb, -1)
        ce_sum -= logq1.gather(-1, yb).sum()
        logq = (torch.log_softmax(sb.div_(temp), -1) if temp != 1.0 else logq1).clamp(min=_LOG_FLOOR)
        logp = torch.log_softmax(tb.div_(temp) if temp != 1.0 else tb, -1).clamp(min=_LOG_FLOOR)
        q, p = logq.exp(), logp.exp()
        value, g = spec.div.grad(logq, q, logp, p, **spec.params)
        kd_sum += value.sum()
        g.mul_(a_kd * temp).add_(logq1.exp_(), alpha=a_ce)
        g.scatter_add_(-1, yb, g.new_full(yb.shape, -a_ce))
        s_blk.copy_(g)
    return ce_sum, kd_sum * temp**2, 1.0


@torch.no_grad()
def sparse_support_logprobs(teacher: Teacher, temp: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Teacher log-probabilities over the k ids `(c, k)` (floored where absent) and the tail bucket `(c,)` or None."""
    logp, tail = teacher.estimator.teacher_logprobs(teacher.values.float(), teacher.tail, temp)
    return logp.clamp(min=_LOG_FLOOR), (tail.clamp(min=_LOG_FLOOR) if tail is not None else None)


@_one_thread_on_cpu
@torch.no_grad()
def sparse_fkl_grad(s: torch.Tensor, y: torch.Tensor, teacher: Teacher, spec: Spec, support=None):
    """Forward KL against sparse targets (+ CE): sums and the gradient written into `s` (scale 1); `support`: the
    chunk's `sparse_support_logprobs` when already computed (multi-depth calls).

    With `P` the teacher's distribution over the support spread onto the vocabulary (the tail bucket's mass
    distributed like the student's own mass outside the k ids), `d KD / ds = T * (softmax(s / T) - P)`.
    """
    temp, a_ce, a_kd = spec.temperature, spec.ce_scale, spec.kd_scale
    logp_all, ptail_all = support if support is not None else sparse_support_logprobs(teacher, temp)
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


def chunk_losses(s: torch.Tensor, y: torch.Tensor, teacher: Teacher | None, spec: Spec, logp=None, reduce=True):
    """Differentiable (ce_sum, kd_sum) of one chunk of float32 student logits `s` (c, V), before any soft-cap;
    `logp`: the dense teacher's tempered log-probabilities of the chunk when already computed (multi-depth calls).
    `reduce=False`: the per-token values `(c,)` instead of their sums (the exit gate's per-depth token losses)."""
    s = softcap(s, spec.softcap)
    ce = F.cross_entropy(s, y, reduction="sum" if reduce else "none")
    if teacher is None:
        return ce, None
    t_ = spec.temperature
    logq = torch.log_softmax(s / t_, dim=-1)
    if teacher.hidden is not None:
        logp = logp if logp is not None else torch.log_softmax(teacher.logits().float() / t_, dim=-1)
        per_token = spec.div(logq, logp, **spec.params) * t_**2
    else:
        per_token = sparse_per_token(
            logq, teacher.ids, teacher.values, spec.div, teacher.estimator, t_, teacher.tail, **spec.params
        )
    return ce, (per_token.sum() if reduce else per_token)
