"""Next-token divergences between a student and a teacher distribution: one `Divergence` definition per kind.

A `Divergence` is everything about one kind in one place: its name, its typed parameters with their ranges, its
value from (student, teacher) log-probabilities, the source of its formula, the parameter values at which it
equals another kind, and optionally the closed-form gradient with respect to the student's logits that the fused
lm_head loss (`loopfit.losses.fused`) computes in place. A divergence without a closed form is differentiated by
autograd there, chunk by chunk (exact, a few more float32 buffers).

`DIVERGENCE_REGISTRY` maps the names the config accepts (`--distillation.kind`) to the built-in definitions;
every loss function also takes a `Divergence` object instead of a name, so a new divergence needs no edit here.

Every divergence is computed in float32 on log-probabilities softened by the temperature `T`, summed over the
vocabulary, scaled by `T^2` (so gradient magnitudes do not shrink with `T`, as in Hinton et al.) and averaged over
the positions whose label is not `ignore_index`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

# Log-probabilities below this are exactly zero probabilities in float32 (exp(-1e4) == 0); clamping -inf to it keeps
# every difference finite, so `0 * (-inf - -inf)` never turns into NaN, in the forward or the backward.
_LOG_FLOOR = -1e4


@dataclass(frozen=True)
class Param:
    """A float parameter of a divergence and its valid range `[low, high]` (`high_open`: `[low, high)`)."""

    name: str
    default: float
    low: float = 0.0
    high: float = 1.0
    high_open: bool = False
    doc: str = ""

    @property
    def range_text(self) -> str:
        return f"[{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"

    def contains(self, value) -> bool:
        """In range; NaN and non-numbers never are (a NaN passes no comparison)."""
        if not isinstance(value, (int, float)):
            return False
        return self.low <= value and (value < self.high if self.high_open else value <= self.high)


ValueFn = Callable[..., torch.Tensor]
"""`(logq, logp, **params) -> (...)`: the divergence at each position from floored float32 log-probabilities
`(..., K)` of student and teacher at temperature T (no `T^2`, no reduction)."""
GradFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]
"""`(logq, q, logp, p, **params) -> (value (c,), d value / d z (c, V))`, with `z = student logits / T` and `q`,
`p` the floored probabilities at T (and their logs). May overwrite its temporaries, never its inputs."""


@dataclass(frozen=True, eq=False)
class Divergence:
    """One divergence between a student distribution `q` and a teacher distribution `p`.

    Args:
        name: what `--distillation.kind` and the loss functions' `kind` call it.
        value: the per-position value (`ValueFn`); it never sees parameters at which `reduces_to` applies.
        params: its typed parameters; a value outside a parameter's range, or a parameter it does not declare,
            is refused by `check_params`.
        grad: closed-form `(value, d value / d z)` (`GradFn`) for the fused loss, or None for autograd.
        reduces_to: `params -> (other divergence, its params)` where the two are equal (e.g. JSD at beta = 0 is
            forward KL), so the exact special case is computed instead of a formula that degenerates there.
        formula, source: what it computes and where the formula comes from (documentation, `repr`).
    """

    name: str
    value: ValueFn
    params: tuple[Param, ...] = ()
    grad: GradFn | None = None
    reduces_to: Callable[[dict], tuple[Divergence, dict] | None] | None = None
    formula: str = ""
    source: str = ""

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)

    def check_params(self, given: dict) -> dict:
        """All parameters (defaults filled in) after refusing one this divergence does not take or one out of range.

        Raises:
            ValueError: naming the parameter, what this divergence takes, or the valid range.
        """
        for name, value in given.items():
            p = self.param(name)
            if p is None:
                takes = ", ".join(f"{q.name} in {q.range_text}" for q in self.params) or "no parameters"
                raise ValueError(f"'{name}' is not a parameter of the '{self.name}' divergence ({self.name} takes "
                                 f"{takes})")  # fmt: skip
            if not p.contains(value):
                raise ValueError(f"{name} of the '{self.name}' divergence must be in {p.range_text}, got {value}")
        return {p.name: given.get(p.name, p.default) for p in self.params}

    def resolve(self, params: dict) -> tuple[Divergence, dict]:
        """The divergence actually computed at `params` (all of them, checked) and its parameters."""
        div = self
        while div.reduces_to is not None:
            other = div.reduces_to(params)
            if other is None:
                break
            div, params = other
        return div, params

    def __call__(self, logq: torch.Tensor, logp: torch.Tensor, **params: float) -> torch.Tensor:
        """Per-position value from log-probabilities `(..., K)` (`-inf` allowed); `params` checked, defaults filled."""
        div, params = self.resolve(self.check_params(params))
        return div.value(logq.clamp(min=_LOG_FLOOR), logp.clamp(min=_LOG_FLOOR), **params)

    def __repr__(self) -> str:
        ps = ", ".join(f"{p.name}={p.default:g} in {p.range_text}" for p in self.params)
        return f"Divergence({self.name}: {self.formula}{'; ' + ps if ps else ''})"


# ------------------------------------------------------------------------------------------- building blocks
def _kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """`sum_v p_v (log p_v - log q_v)` over the last dim; terms with `p_v = 0` are zero (inputs already floored)."""
    return (logp.exp() * (logp - logq)).sum(-1)


def _log_mix(w: float, logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """`log(w * p + (1 - w) * q)`, stable in log space."""
    return torch.logaddexp(logp + math.log(w), logq + math.log1p(-w))


def softmax_backward_(q: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """`d D / d z` from `g = d D / d q` for `q = softmax(z)`: `q * (g - <q, g>)` (the softmax Jacobian
    `diag(q) - q q^T`), written into `g`. Adding a constant per row to `g` changes nothing."""
    return g.sub_((q * g).sum(-1, keepdim=True)).mul_(q)


# --------------------------------------------------------------------------------------------- the built-ins
def _fkl_grad(logq, q, logp, p):
    return (p * (logp - logq)).sum(-1), q - p


FKL = Divergence(
    "fkl", lambda logq, logp: _kl(logp, logq), grad=_fkl_grad,
    formula="KL(p || q)", source="Hinton et al. 2015, arXiv:1503.02531",
)  # fmt: skip


def _rkl_grad(logq, q, logp, p):
    g = logq - logp  # d/dq of sum q log(q/p), less the constant 1
    return (q * g).sum(-1), softmax_backward_(q, g)


RKL = Divergence(
    "rkl", lambda logq, logp: _kl(logq, logp), grad=_rkl_grad,
    formula="KL(q || p)", source="MiniLLM, Gu et al. 2023, arXiv:2306.08543",
)  # fmt: skip


def _skl_grad(logq, q, logp, p, lam):
    g = logq - logp
    value = lam * (p * (logp - logq)).sum(-1) + (1.0 - lam) * (q * g).sum(-1)
    # Only the RKL part goes through d/dq; the FKL part's z-gradient lam * (q - p) is added directly (its d/dq,
    # -p / q, overflows where q underflows).
    return value, softmax_backward_(q, g.mul_(1.0 - lam)).add_(q, alpha=lam).sub_(p, alpha=lam)


SKL = Divergence(
    "skl", lambda logq, logp, lam: lam * _kl(logp, logq) + (1.0 - lam) * _kl(logq, logp),
    params=(Param("lam", 0.5, doc="weight of the forward KL"),), grad=_skl_grad,
    formula="lam * KL(p || q) + (1 - lam) * KL(q || p)", source="linear blend of forward and reverse KL",
)  # fmt: skip


def _skew_value(logq, logp, alpha):
    return _kl(logp, _log_mix(alpha, logp, logq))


def _skew_grad(logq, q, logp, p, alpha):
    logm = _log_mix(alpha, logp, logq)
    # d/dq KL(p || alpha p + (1 - alpha) q) = -(1 - alpha) p / m
    return (p * (logp - logm)).sum(-1), softmax_backward_(q, (logp - logm).exp_().mul_(alpha - 1.0))


SKEW = Divergence(
    "skew", _skew_value, params=(Param("alpha", 0.1, high_open=True, doc="teacher share of the mixture"),),
    grad=_skew_grad, reduces_to=lambda kp: (FKL, {}) if kp["alpha"] == 0.0 else None,
    formula="KL(p || alpha p + (1 - alpha) q)", source="skew KL of DistiLLM, Ko et al. 2024, arXiv:2402.03898",
)  # fmt: skip


def _jsd_value(logq, logp, beta):
    logm = _log_mix(beta, logp, logq)
    return beta * _kl(logp, logm) + (1.0 - beta) * _kl(logq, logm)


def _jsd_grad(logq, q, logp, p, beta):
    logm = _log_mix(beta, logp, logq)
    g = logq - logm
    value = beta * (p * (logp - logm)).sum(-1) + (1.0 - beta) * (q * g).sum(-1)
    # With m = beta p + (1 - beta) q the terms of d/dq that involve p / m collapse to a constant, leaving
    # (1 - beta) log(q / m).
    return value, softmax_backward_(q, g.mul_(1.0 - beta))


JSD = Divergence(
    "jsd", _jsd_value, params=(Param("beta", 0.5, doc="teacher share of the mixture m"),), grad=_jsd_grad,
    reduces_to=lambda kp: (FKL, {}) if kp["beta"] == 0.0 else (RKL, {}) if kp["beta"] == 1.0 else None,
    formula="beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q",
    source="generalized JSD of GKD, Agarwal et al. 2024, arXiv:2306.13649 (TRL's convention: FKL at beta = 0)",
)  # fmt: skip


def _tvd_grad(logq, q, logp, p):
    diff = q - p
    return 0.5 * diff.abs().sum(-1), softmax_backward_(q, diff.sign_().mul_(0.5))


TVD = Divergence(
    "tvd", lambda logq, logp: 0.5 * (logp.exp() - logq.exp()).abs().sum(-1), grad=_tvd_grad,
    formula="0.5 * sum |p - q|", source="total variation, f-distill, Wen et al. 2023, arXiv:2307.15190",
)  # fmt: skip

DIVERGENCE_REGISTRY: dict[str, Divergence] = {d.name: d for d in (FKL, RKL, SKL, SKEW, JSD, TVD)}
DIVERGENCES = tuple(DIVERGENCE_REGISTRY)
# The parameters each built-in divergence takes, by name (what `--distillation.kind_params` accepts).
KIND_PARAMS: dict[str, dict[str, Param]] = {d.name: {p.name: p for p in d.params} for d in DIVERGENCE_REGISTRY.values()}
# Every parameter name of a built-in: the loss functions take them for any kind (and ignore the ones it lacks).
_ALL_PARAMS = frozenset(p for params in KIND_PARAMS.values() for p in params)


def get_divergence(kind: str | Divergence) -> Divergence:
    """The definition of `kind` (a registered name, or a `Divergence` passed through). ValueError if unknown."""
    if isinstance(kind, Divergence):
        return kind
    if kind not in DIVERGENCE_REGISTRY:
        raise ValueError(f"unknown divergence kind '{kind}'; choose one of {', '.join(DIVERGENCES)}")
    return DIVERGENCE_REGISTRY[kind]


def check_kind_params(kind: str | Divergence, params: dict) -> None:
    """Raise ValueError for an unknown divergence, a parameter `kind` does not take, or a value out of its range."""
    get_divergence(kind).check_params(params)


def resolve_kind(kind: str | Divergence, kind_params: dict) -> tuple[Divergence, dict]:
    """The loss functions' lenient reading of `(kind, **kind_params)`: the divergence computed and its parameters.

    The loss functions take `lam`, `alpha` and `beta` whatever the kind (their signatures predate the registry), so a
    built-in parameter `kind` lacks is ignored here; the config refuses it (`check_kind_params`). Any other name is
    a TypeError, as an unexpected keyword argument.
    """
    div = get_divergence(kind)
    unknown = set(kind_params) - _ALL_PARAMS - {p.name for p in div.params}
    if unknown:
        raise TypeError(f"unexpected keyword arguments: {', '.join(sorted(unknown))}")
    own = {k: v for k, v in kind_params.items() if div.param(k) is not None}
    return div.resolve(div.check_params(own))


def check_kind(kind: str | Divergence, lam: float = 0.5, alpha: float = 0.1, beta: float = 0.5, **params) -> None:
    """Raise ValueError for an unknown divergence or an out-of-range parameter of it (the loss modules' check)."""
    resolve_kind(kind, dict(lam=lam, alpha=alpha, beta=beta, **params))


def divergence_from_logprobs(
    logq: torch.Tensor,
    logp: torch.Tensor,
    kind: str | Divergence = "fkl",
    lam: float = 0.5,
    alpha: float = 0.1,
    beta: float = 0.5,
    **params: float,
) -> torch.Tensor:
    """Per-position divergence between student `q` and teacher `p`, both given as log-probabilities.

    Args:
        logq: student log-probabilities, shape `(..., K)`, float32.
        logp: teacher log-probabilities, same shape; `-inf` marks zero probability.
        kind: a name in `DIVERGENCES` or a `Divergence`: `fkl` KL(p||q), `rkl` KL(q||p), `skl` lam*FKL +
            (1-lam)*RKL, `skew` KL(p || alpha*p + (1-alpha)*q), `jsd` beta*KL(p||m) + (1-beta)*KL(q||m) with
            m = beta*p + (1-beta)*q (exactly FKL at beta=0 and RKL at beta=1), `tvd` 0.5*sum|p - q|.
        lam, alpha, beta, params: the divergence's parameters (those it does not take are ignored).

    Returns:
        Tensor of shape `(...)`: the divergence at each position (no temperature scaling, no reduction).
    """
    div, kp = resolve_kind(kind, dict(lam=lam, alpha=alpha, beta=beta, **params))
    return div.value(logq.clamp(min=_LOG_FLOOR), logp.clamp(min=_LOG_FLOOR), **kp)


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
    kind: str | Divergence = "fkl",
    temperature: float = 1.0,
    ignore_index: int = -100,
    lam: float = 0.5,
    alpha: float = 0.1,
    beta: float = 0.5,
    num_items: int | float | torch.Tensor | None = None,
    **params: float,
) -> torch.Tensor:
    """Distillation divergence between dense student and teacher logits, averaged over valid tokens.

    Args:
        student_logits: `(..., V)`, any float dtype; upcast to float32 inside.
        teacher_logits: `(..., V)`, same shape; gradients are not taken through it unless it requires them.
        labels: `(...)` integer tensor aligned with the logits (position i is scored with label i; no shift
            inside). Positions equal to `ignore_index` are excluded.
        kind: a name in `DIVERGENCES` or a `Divergence` (see `divergence_from_logprobs`).
        temperature: both distributions are `softmax(logits / T)`; the result is multiplied by `T^2`.
        lam, alpha, beta, params: the divergence's parameters (`skl`, `skew`, `jsd`; a `Divergence`'s own).
        num_items: if given, the sum over valid tokens is divided by this (the global number of valid tokens,
            so that gradient accumulation and data parallelism average correctly) instead of the local count.

    Returns:
        0-dim float32 tensor. Zero (still attached to the graph) when no position is valid.
    """
    div, kp = resolve_kind(kind, dict(lam=lam, alpha=alpha, beta=beta, **params))
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
    logq = torch.log_softmax(s / temperature, dim=-1).clamp(min=_LOG_FLOOR)
    logp = torch.log_softmax(t / temperature, dim=-1).clamp(min=_LOG_FLOOR)
    per_token = div.value(logq, logp, **kp) * temperature**2
    return reduce_tokens(per_token, per_token.shape[0], num_items)


class KDLoss(nn.Module):
    """`kd_divergence` with its settings fixed at construction, for config-driven use.

    Example:
        >>> loss_fn = KDLoss("jsd", temperature=2.0, beta=0.5)
        >>> loss = loss_fn(student_logits, teacher_logits, labels)
    """

    def __init__(
        self,
        kind: str | Divergence = "fkl",
        temperature: float = 1.0,
        ignore_index: int = -100,
        lam: float = 0.5,
        alpha: float = 0.1,
        beta: float = 0.5,
        **params: float,
    ):
        super().__init__()
        check_kind(kind, lam, alpha, beta, **params)
        self.kind, self.temperature, self.ignore_index = kind, temperature, ignore_index
        self.params = dict(lam=lam, alpha=alpha, beta=beta, **params)

    def forward(self, student_logits, teacher_logits, labels, num_items=None) -> torch.Tensor:
        return kd_divergence(
            student_logits, teacher_logits, labels, self.kind, self.temperature, self.ignore_index,
            num_items=num_items, **self.params,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return f"kind={get_divergence(self.kind).name}, temperature={self.temperature}"
