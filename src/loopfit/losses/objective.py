"""The healing objective, built once: `ce_scale * CE + kd_scale * KD + hidden_scale * HIDDEN + fixed_point_scale * FP
+ router_aux_scale * AUX`, every term returned by name.

`Objective` holds every decision about the loss (which teacher: live or a cache estimator; the weights; the
divergence and its parameters; the temperature; hidden-state alignment and which loop states meet which teacher
layers; the fixed-point and router terms; each model's logit scaling and soft-cap; fused or not) and scores one
micro-batch from tensors: the student's final hidden states, loop states, fixed-point residual and router loss,
and the teacher's final hidden states and layer outputs, or its cached sparse targets. Running the models is the
caller's (`loopfit.train.student.objective_loss` for `loopfit train` and `loopfit.hf.DistillationTrainer`).

Every term scores the same positions, `t` in `0..S-2` where `labels[:, t + 1] != -100` (the state at `t`
predicts token `t + 1`), and is a sum over them divided by `num_items`, so summing micro-batches (and ranks) gives
the step's mean.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn

from loopfit.losses.chunk_grad import softcap
from loopfit.losses.depths import (
    DEPTH_WEIGHTINGS,
    depth_token_losses,
    depth_weights,
    exit_gate_loss,
    fused_depth_loss,
)
from loopfit.losses.divergences import Divergence, get_divergence, kd_divergence
from loopfit.losses.estimators import Estimator, get_estimator
from loopfit.losses.fused import fused_kd_loss
from loopfit.losses.hidden import loop_layer_map
from loopfit.losses.sparse import sparse_kd_divergence

TEACHER_SOURCES = ("live", "cache")
HIDDEN_MAPS = ("spread", "last")


@dataclass
class ObjectiveWeights:
    """How the terms are mixed."""

    ce_scale: float = 1.0
    """Weight of the cross-entropy against the labels (the classic blend `alpha * CE + (1 - alpha) * KD` is
    `ce_scale = alpha`, `kd_scale = 1 - alpha`)."""
    kd_scale: float = 1.0
    """Weight of the logit distillation divergence."""
    hidden_scale: float = 0.0
    """Weight of the hidden-state alignment loss."""
    fixed_point_scale: float = 0.0
    """Weight of the fixed-point residual of the loop's final state."""
    router_aux_scale: float = 0.0
    """Weight of an MoE student's load-balancing loss (the source config's `router_aux_loss_coef`)."""

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"{f.name} must be a finite number >= 0, got {value}")

    @property
    def scales(self) -> tuple[float, float, float]:
        """(ce_scale, kd_scale, hidden_scale)."""
        return self.ce_scale, self.kd_scale, self.hidden_scale


def combine_losses(
    ce: torch.Tensor,
    kd: torch.Tensor | None = None,
    hidden: torch.Tensor | None = None,
    weights: ObjectiveWeights | None = None,
) -> dict[str, torch.Tensor]:
    """Weighted total plus every component, for the optimiser and the logs (differentiable CE / KD given apart).

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


@dataclass(frozen=True)
class LogitTransform:
    """A model family's map from the head's output to its logits: `cap * tanh(scale * logits / cap)`.

    The scale (Granite, Cohere) folds into the hidden state exactly (`head(s * h) = s * head(h)`); the soft-cap
    (Gemma 2 / 3, arXiv:2408.00118) does not and is applied to the logits.
    """

    scale: float | None = None
    softcap: float | None = None

    def hidden(self, h: torch.Tensor) -> torch.Tensor:
        return h * self.scale if self.scale is not None else h

    def logits(self, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """`(..., H)` -> `(..., V)` logits in the input dtype."""
        return softcap(F.linear(self.hidden(h), weight, bias), self.softcap)


@dataclass
class Terms:
    """The terms of one micro-batch: `total` differentiable, the rest detached 0-dim tensors (None when off), each a
    share of the step's per-token mean (summing micro-batches and ranks gives the step's value)."""

    total: torch.Tensor
    ce: torch.Tensor
    kd: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    fixed_point: torch.Tensor | None = None
    router_aux: torch.Tensor | None = None
    depths: dict[str, torch.Tensor] = field(default_factory=dict)
    """With the loss at every depth: `ce_R-j` / `kd_R-j`, the CE / KD after iteration R - j (j >= 1; `ce` and `kd`
    are the final depth's)."""

    NAMES = ("ce", "kd", "hidden", "fixed_point", "router_aux")

    def named(self) -> dict[str, torch.Tensor]:
        """The detached terms that are on, by name (the per-depth ones after the others)."""
        return {n: getattr(self, n) for n in self.NAMES if getattr(self, n) is not None} | self.depths


@dataclass
class Objective:
    """The whole loss of a run, decided once; `objective(...)` scores one micro-batch.

    Args:
        weights: the terms' weights.
        teacher: `live` (the caller runs a teacher and gives its hidden states), `cache` (the batch carries cached
            sparse targets) or None (CE alone; the KD weight is then ignored).
        divergence, divergence_params: the KD divergence (a name or a `Divergence`) and its parameters, checked here.
        temperature: of the divergence (CE always at 1).
        estimator: how cached targets are read (`teacher="cache"` only).
        hidden_loss: a `HiddenStateLoss` aligning loop states with teacher layers (a live teacher and
            `block_span` needed), or None.
        hidden_map: `spread` (iteration i of R -> a teacher layer spread over `block_span`) or `last` (the final
            state only, against the output of the block's last source layer).
        block_span: `(first, last)` source layers the loop replaced (see `loop_layer_map`).
        student_logits, teacher_logits: each model's `LogitTransform`.
        fused: CE + KD fused with the lm_head in chunks (`fused_kd_loss`); otherwise full logits (reference).
        chunk_size: tokens per chunk of the fused loss.
        every_depth: CE / KD on the coda's output after each of the last `every_depth` loop iterations (the caller
            gives the earlier ones as `depth_hidden`); 1: the final depth only.
        depth_weighting: how those depths are weighted (`loopfit.losses.depths`: `uniform` or `linear`).
        exit_gate_entropy: None, or the exit gate's stage with this entropy weight beta: the loss is
            `exit_gate_loss` over every depth the caller gives (`depth_hidden` + `hidden`) under the exit distribution
            `exit_log_probs`, `ce` / `kd` report their expectations under it, and `exit_entropy` / `exit_depth` the
            distribution's entropy and mean exit iteration. Hidden, fixed-point and router terms do not apply.
    """

    weights: ObjectiveWeights = field(default_factory=ObjectiveWeights)
    teacher: str | None = None
    divergence: str | Divergence = "fkl"
    divergence_params: dict = field(default_factory=dict)
    temperature: float = 1.0
    estimator: str | Estimator | None = None
    hidden_loss: nn.Module | None = None
    hidden_map: str = "spread"
    block_span: tuple[int, int] | None = None
    student_logits: LogitTransform = field(default_factory=LogitTransform)
    teacher_logits: LogitTransform = field(default_factory=LogitTransform)
    fused: bool = True
    chunk_size: int = 1024
    every_depth: int = 1
    depth_weighting: str = "uniform"
    exit_gate_entropy: float | None = None

    def __post_init__(self):
        if self.teacher not in (None, *TEACHER_SOURCES):
            raise ValueError(f"teacher must be None or one of {', '.join(TEACHER_SOURCES)}, got {self.teacher!r}")
        self.divergence = get_divergence(self.divergence)
        self.divergence_params = self.divergence.check_params(dict(self.divergence_params))
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.teacher == "cache":
            self.estimator = get_estimator(self.estimator or "topk")
        elif self.estimator is not None:
            raise ValueError("an estimator reads cached targets: it needs teacher='cache'")
        if self.hidden_map not in HIDDEN_MAPS:
            raise ValueError(f"hidden_map must be one of {', '.join(HIDDEN_MAPS)}, got {self.hidden_map!r}")
        if self.hidden_loss is not None and self.teacher != "live":
            raise ValueError("hidden-state alignment needs a live teacher (a teacher cache holds no states)")
        if self.hidden_loss is not None and self.block_span is None:
            raise ValueError("hidden-state alignment needs block_span: a looped student (states per loop iteration)")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")
        if self.every_depth < 1:
            raise ValueError(f"every_depth must be >= 1, got {self.every_depth}")
        if self.exit_gate_entropy is not None and not (self.exit_gate_entropy >= 0 and math.isfinite(
                self.exit_gate_entropy)):  # fmt: skip
            raise ValueError(f"exit_gate_entropy must be a finite number >= 0, got {self.exit_gate_entropy}")
        if self.depth_weighting not in DEPTH_WEIGHTINGS:
            raise ValueError(f"depth_weighting must be one of {', '.join(DEPTH_WEIGHTINGS)}, got "
                             f"{self.depth_weighting!r}")  # fmt: skip

    @property
    def scales(self) -> tuple[float, float]:
        """(CE weight, KD weight) as applied: CE alone without a teacher."""
        ce, kd, _ = self.weights.scales
        return (ce, kd) if self.teacher is not None else (1.0, 0.0)

    def states_to_align(self, states: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The loop states the hidden term reads (all of them for `spread`, the final one for `last`)."""
        return list(states)[-1:] if self.hidden_map == "last" else list(states)

    def teacher_layers(self, num_states: int) -> list[int]:
        """The teacher layers (0-based source indices) whose outputs the hidden term reads, given the number of loop
        states the student returned; [] without a hidden term."""
        if self.hidden_loss is None:
            return []
        n = 1 if self.hidden_map == "last" else num_states
        return loop_layer_map(n, self.block_span)

    @property
    def term_names(self) -> tuple[str, ...]:
        """Every term this objective can report (`Terms.named`'s keys at the deepest), in a fixed order."""
        kinds = ("ce", "kd") if self.teacher is not None else ("ce",)
        if self.exit_gate_entropy is not None:
            return (*Terms.NAMES, "exit_entropy", "exit_depth")
        extra = [f"{t}_R-{j}" for j in range(1, self.every_depth) for t in kinds]
        return (*Terms.NAMES, *extra)

    def __call__(
        self,
        labels: torch.Tensor,
        hidden: torch.Tensor,
        head_weight: torch.Tensor,
        num_items: torch.Tensor | float,
        *,
        teacher_hidden: torch.Tensor | None = None,
        teacher_weight: torch.Tensor | None = None,
        teacher_states: dict[int, torch.Tensor] | None = None,
        teacher_targets: dict[str, torch.Tensor] | None = None,
        states: Sequence[torch.Tensor] | None = None,
        residual: torch.Tensor | None = None,
        router_aux: torch.Tensor | None = None,
        depth_hidden: Sequence[torch.Tensor] = (),
        exit_log_probs: torch.Tensor | None = None,
    ) -> Terms:
        """Score one micro-batch.

        Args:
            labels: `(B, S)` unshifted targets (-100 ignored).
            hidden: `(B, S, H)` the student's final normed hidden states; head_weight: its `(V, H)` lm_head.
            num_items: the step's global count of scored positions (what every term is divided by).
            teacher_hidden, teacher_weight: live teacher's `(B, S, H_t)` final hidden states and `(V, H_t)` lm_head.
            teacher_states: live teacher's `{layer: (B, S, H_t)}` outputs, for `teacher_layers(len(states))`.
            teacher_targets: cached targets `{"teacher_ids", "teacher_values", "teacher_tail"?}`, `(B, S, k)` /
                `(B, S)`, aligned with `hidden` (position j holds the distribution after token j).
            states: the student's loop states `(B, S, H)` (hidden term). residual: `(B, S)` fixed-point residual.
            router_aux: 0-dim load-balancing loss, a mean over this micro-batch's tokens.
            depth_hidden: the coda's normed output `(B, S, H)` after the iterations before the last, shallowest
                first, at most `every_depth - 1` of them (fewer when the loop ran fewer iterations): scored with
                `hidden` under `depth_weights(1 + len(depth_hidden), depth_weighting)`.
            exit_log_probs: the exit gate's stage: `(B, S, D)` log exit distribution over the D depths given
                (`depth_hidden` then `hidden`), differentiable.
        """
        ce_scale, kd_scale = self.scales
        if self.exit_gate_entropy is not None:
            teacher = self._teacher_inputs(teacher_hidden, teacher_weight, teacher_targets)
            return self._exit_gate_terms(
                labels, [*depth_hidden, hidden], head_weight, num_items, exit_log_probs, teacher
            )
        if len(depth_hidden) >= self.every_depth:
            raise ValueError(f"{len(depth_hidden)} earlier depths given to an objective over {self.every_depth}")
        hs = [self.student_logits.hidden(x[:, :-1]).reshape(-1, hidden.shape[-1]) for x in (*depth_hidden, hidden)]
        y = labels[:, 1:].reshape(-1)
        scored = F.pad(labels[:, 1:] != -100, (0, 1), value=False)  # (B, S): the token losses' positions
        teacher = self._teacher_inputs(teacher_hidden, teacher_weight, teacher_targets)
        weights = depth_weights(len(hs), self.depth_weighting)
        if self.fused and len(hs) == 1:
            out = fused_kd_loss(
                hs[0], head_weight, y, **teacher, kind=self.divergence, temperature=self.temperature, ce_scale=ce_scale,
                kd_scale=kd_scale, chunk_size=self.chunk_size, num_items=num_items,
                logit_softcap=self.student_logits.softcap, **self.divergence_params,
            )  # fmt: skip
            terms = Terms(out.total, out.ce, out.kd)
        elif self.fused:
            out = fused_depth_loss(
                hs, weights, head_weight, y, **teacher, kind=self.divergence, temperature=self.temperature,
                ce_scale=ce_scale, kd_scale=kd_scale, chunk_size=self.chunk_size, num_items=num_items,
                logit_softcap=self.student_logits.softcap, **self.divergence_params,
            )  # fmt: skip
            kd = out.kd if out.kd is not None else [None] * len(hs)
            terms = Terms(out.total, out.ce[-1], kd[-1])
            terms.depths = self._depth_terms(list(out.ce), list(kd))
        else:
            each = [self._unfused(h, head_weight, y, teacher, num_items, ce_scale, kd_scale) for h in hs]
            total = each[-1].total if len(hs) == 1 else sum(w * t.total for w, t in zip(weights, each))
            terms = Terms(total, each[-1].ce, each[-1].kd)
            terms.depths = self._depth_terms([t.ce for t in each], [t.kd for t in each])
        if self.hidden_loss is not None:
            align = self.states_to_align(states)
            targets = [teacher_states[i] for i in self.teacher_layers(len(states))]
            # HiddenStateLoss averages over this micro-batch's positions; re-weighted to the global token count.
            value = self.hidden_loss(align, targets, scored) * scored.sum() / num_items
            terms.total = terms.total + self.weights.hidden_scale * value
            terms.hidden = value.detach()
        if residual is not None and self.weights.fixed_point_scale > 0:
            value = residual[scored].sum() / num_items
            terms.total = terms.total + self.weights.fixed_point_scale * value
            terms.fixed_point = value.detach()
        if router_aux is not None:
            # A mean over this micro-batch's tokens: weighted like the other terms so accumulation sums to the step.
            value = router_aux * scored.sum() / num_items
            terms.total = terms.total + self.weights.router_aux_scale * value
            terms.router_aux = value.detach()
        return terms

    def _exit_gate_terms(self, labels, hiddens, head_weight, num_items, exit_log_probs, teacher) -> Terms:
        """The exit gate's stage: each token's loss at every depth (no gradient) under the gate's exit distribution."""
        if exit_log_probs is None or exit_log_probs.shape[-1] != len(hiddens):
            raise ValueError(f"the exit gate's stage needs the exit distribution over the {len(hiddens)} depths given")
        ce_scale, kd_scale = self.scales
        hs = [self.student_logits.hidden(x[:, :-1]).reshape(-1, x.shape[-1]) for x in hiddens]
        y = labels[:, 1:].reshape(-1)
        ce, kd = depth_token_losses(
            hs, head_weight, y, **teacher, kind=self.divergence, temperature=self.temperature,
            chunk_size=self.chunk_size, logit_softcap=self.student_logits.softcap, **self.divergence_params,
        )  # fmt: skip
        log_p = exit_log_probs[:, :-1].reshape(-1, len(hs))[y != -100]  # (n, D): the scored positions, in order
        losses = ce_scale * ce + (kd_scale * kd if kd is not None else 0.0)
        total, entropy = exit_gate_loss(log_p, losses.t(), self.exit_gate_entropy, num_items)
        p = log_p.detach().exp()
        depth = torch.arange(1, p.shape[-1] + 1, dtype=p.dtype, device=p.device)
        terms = Terms(total, (p * ce.t()).sum() / num_items, (p * kd.t()).sum() / num_items if kd is not None else None)
        terms.depths = {"exit_entropy": entropy, "exit_depth": (p @ depth).sum() / num_items}
        return terms

    @staticmethod
    def _depth_terms(ce: list, kd: list) -> dict[str, torch.Tensor]:
        """`{ce_R-j, kd_R-j}` for the depths before the last (lists shallowest first, the final depth last)."""
        out = {}
        for j in range(len(ce) - 1, 0, -1):
            out[f"ce_R-{j}"] = ce[-1 - j].detach()
            if kd[-1 - j] is not None:
                out[f"kd_R-{j}"] = kd[-1 - j].detach()
        return out

    def _teacher_inputs(self, teacher_hidden, teacher_weight, teacher_targets) -> dict:
        """The teacher side of `fused_kd_loss`, shifted like the student's (position t predicts token t + 1)."""
        if self.teacher == "live":
            if teacher_hidden is None or teacher_weight is None:
                raise ValueError("this objective distills from a live teacher: give teacher_hidden and teacher_weight")
            th = self.teacher_logits.hidden(teacher_hidden[:, :-1]).reshape(-1, teacher_hidden.shape[-1])
            cap = self.teacher_logits.softcap
            return dict(teacher_hidden=th, teacher_weight=teacher_weight, teacher_logit_softcap=cap)
        if self.teacher == "cache":
            if not teacher_targets or "teacher_ids" not in teacher_targets:
                raise ValueError("this objective reads a teacher cache: the batch must carry teacher_ids and "
                                 "teacher_values (loopfit.cache.TeacherTargetsDataset)")  # fmt: skip
            ids = teacher_targets["teacher_ids"]
            k = ids.shape[-1]
            out = dict(teacher_ids=ids[:, :-1].reshape(-1, k), estimator=self.estimator,
                       teacher_values=teacher_targets["teacher_values"][:, :-1].reshape(-1, k))  # fmt: skip
            if teacher_targets.get("teacher_tail") is not None:
                out["teacher_tail"] = teacher_targets["teacher_tail"][:, :-1].reshape(-1)
            return out
        return {}

    def _unfused(self, h, head_weight, y, teacher, num_items, ce_scale, kd_scale) -> Terms:
        """The reference: full logits, autograd through everything."""
        logits = softcap(F.linear(h, head_weight), self.student_logits.softcap)
        ce = F.cross_entropy(logits.float(), y, ignore_index=-100, reduction="sum") / num_items
        if not teacher:
            return Terms(ce_scale * ce, ce.detach())
        kw = dict(kind=self.divergence, temperature=self.temperature, num_items=num_items, **self.divergence_params)
        if "teacher_hidden" in teacher:
            with torch.no_grad():
                t_logits = softcap(F.linear(teacher["teacher_hidden"], teacher["teacher_weight"]),
                                   teacher["teacher_logit_softcap"])  # fmt: skip
            kd = kd_divergence(logits, t_logits, y, **kw)
        else:
            tail = teacher.get("teacher_tail")
            kd = sparse_kd_divergence(logits, teacher["teacher_ids"], teacher["teacher_values"], y,
                                      estimator=teacher["estimator"], tail_logmass=tail, **kw)  # fmt: skip
        return Terms(ce_scale * ce + kd_scale * kd, ce.detach(), kd.detach())
