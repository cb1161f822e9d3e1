"""CE + forward KL of one chunk as a single `torch.compile`d function: the fused loss's elementwise work on GPUs.

Why: `chunk_grad.fkl_grad` is tuned for CPUs (row blocks that stay in cache). On a GPU its ~20 eager ops over a
`(c, V)` chunk are each a pass through device memory over float32 temporaries, several times the time of the chunk's
four matrix products. Written as one expression, inductor fuses it into a few row reductions (the three
log-sum-exps and the KD sum, each row's re-read served from L2) and one pass that writes the gradient over the
logits in their own dtype. Same math as `fkl_grad` (the tests compare the two), the gradient divided by the same
`scale`, so a call may mix both.

When: by default on CUDA (`LOOPFIT_COMPILED_LOSS=auto`) where Triton is installed; `0` never, `1` also on CPU
(tests). If compilation fails, a warning says why and the eager kernel runs from then on. Not on CPU by default:
there inductor's code was slower than the tuned eager kernel (N = 8192, bf16, chunk 1024, 2-core EPYC under load:
1.66x the matmul floor against 1.39x, `benchmarks/kd_loss.py` with `LOOPFIT_COMPILED_LOSS=1` / `0`).

Formula (as `fkl_grad`): `q1 = softmax(s)`, `q = softmax(s / T)`, `p = softmax(t / T)`, `c = kd_scale * T`;
`d loss / ds = ce_scale * (q1 - onehot(y)) + c * (q - p)`; KD per row `sum_j p_j (t_j - s_j) / T + lse(s / T) -
lse(t / T)` (Hinton et al., arXiv:1503.02531, with the T^2 factor applied by the caller's sums).
"""

from __future__ import annotations

import os
import sys

import torch

# Logits of -inf (tokens the teacher never predicts) are clamped to this before the softmax: the probability is
# still exactly 0, and `0 * logit` stays 0 in the dot products that give the KD value (no NaN from 0 * -inf).
_NEG_BIG = -1e30
_STATE: dict = {"fn": None, "off": None}  # the compiled function, or why compiling is off for this process


def fkl_rows(s: torch.Tensor, y: torch.Tensor, t: torch.Tensor | None, temp: float, a_ce: float, c: float,
             scale: float) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Sums `(ce_sum, kl_sum)` (0-dim float32; `kl_sum` without the T^2 factor, 0 without a teacher) of student
    logits `s` `(c, V)`, labels `y` `(c,)` and teacher logits `t` `(c, V)` or None; writes `d loss / ds / scale`
    over `s`, in `s`'s dtype. Eager definition; `compiled_fkl` runs it through inductor."""
    x = s.float()
    lse1 = torch.logsumexp(x, -1)
    ce = (lse1 - x.gather(-1, y[:, None])[:, 0]).sum()
    onehot = torch.arange(x.shape[-1], device=x.device)[None, :] == y[:, None]
    g = a_ce * (torch.exp(x - lse1[:, None]) - onehot.float())
    kl = torch.zeros((), dtype=torch.float32, device=x.device)
    if t is not None:
        z = x.clamp(min=_NEG_BIG) * (1.0 / temp)
        u = t.float().clamp(min=_NEG_BIG) * (1.0 / temp)
        lseq, lsep = torch.logsumexp(z, -1), torch.logsumexp(u, -1)
        p = torch.exp(u - lsep[:, None])
        kl = (p * (u - z)).sum() + (lseq - lsep).sum()
        g = g + c * (torch.exp(z - lseq[:, None]) - p)
    s.copy_(g * (1.0 / scale))
    return ce, kl


def _mode() -> str:
    mode = os.environ.get("LOOPFIT_COMPILED_LOSS", "auto")
    if mode not in ("auto", "0", "1"):
        raise ValueError(f"LOOPFIT_COMPILED_LOSS takes auto, 0 or 1, got '{mode}'")
    return mode


def compiled_fkl_wanted(device: torch.device) -> bool:
    """Whether `fkl_grad` should hand a chunk on `device` to `compiled_fkl` (see the module docstring)."""
    mode = _mode()
    if _STATE["off"] is not None or mode == "0":
        return False
    if mode == "1":
        return True
    if device.type != "cuda":
        return False
    from torch.utils._triton import has_triton

    if not has_triton():
        _STATE["off"] = "inductor on CUDA needs triton, which is not installed"
        return False
    return True


def compiled_fkl(s, y, t, temp: float, a_ce: float, c: float, scale: float):
    """`fkl_rows` compiled (once per process; a new chunk length makes the row count symbolic, once). Returns None,
    with a one-time warning, if inductor cannot compile it: the caller then runs its eager kernel. Compilation
    fails before the function runs, so `s` is untouched then. Out of memory is raised, not caught."""
    if _STATE["fn"] is None:
        _STATE["fn"] = torch.compile(fkl_rows, dynamic=None)
    try:
        return _STATE["fn"](s, y, t, temp, a_ce, c, scale)
    except torch.OutOfMemoryError:
        raise  # not a compiler failure: the eager kernel would need more memory still
    except Exception as e:  # inductor / triton failures come as many types (BackendCompilerFailed, ...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        _STATE["off"] = first
        print(f"loopfit: warning: the compiled fused-loss kernel failed ({first}); using the eager one",
              file=sys.stderr)  # fmt: skip
        return None
