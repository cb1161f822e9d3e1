"""Hidden-state alignment: student states (e.g. the state after each loop iteration) against teacher layers."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

HIDDEN_KINDS = ("cosine", "mse")


def loop_layer_map(num_iterations: int, block_source_span: tuple[int, int]) -> list[int]:
    """Teacher layer to align with the state after each loop iteration (`auto` depth alignment).

    The looped block (together with the source layers dropped before it) replaces the source layers
    `block_source_span = (first, last)` (inclusive). Its R iterations are spread evenly over that span: the state
    after iteration i (0-based) is aligned with the output of source layer
    `first - 1 + round((i + 1) * (last - first + 1) / R)`, so the last iteration always maps to `last`.
    An index l means "the output of source layer l", the residual stream before any final norm (HF's
    `hidden_states[l + 1]`, except for the last layer, whose entry there is the final-normed output).

    Example:
        >>> loop_layer_map(4, (4, 25))  # prelude 0-3, layers 4-19 dropped, block 20-25
        [9, 14, 20, 25]
    """
    first, last = block_source_span
    if num_iterations < 1:
        raise ValueError(f"num_iterations must be >= 1, got {num_iterations}")
    if not 0 <= first <= last:
        raise ValueError(f"block_source_span must be (first, last) with 0 <= first <= last, got {block_source_span}")
    span = last - first + 1
    # floor(x + 0.5) rather than round(): Python's round-half-to-even would make the spacing uneven.
    return [first - 1 + max(1, math.floor((i + 1) * span / num_iterations + 0.5)) for i in range(num_iterations)]


class HiddenStateLoss(nn.Module):
    """`1 - cos` or MSE between pairs of student and teacher hidden states, averaged over valid positions and pairs.

    When a pair's widths differ, a learnable `Linear(H_s -> H_t, bias=False)` maps the student state into the
    teacher's width; it is created from the two widths (never hard-coded) and only then. These projections are
    training-only parameters: save them with the run, do not merge them into the model.

    Args:
        student_dims: width of each student state, or one int shared by all pairs.
        teacher_dims: width of each teacher state, or one int (same length as `student_dims` if both are lists).
        kind: `cosine` (1 - cosine similarity) or `mse` (mean squared error over the features).
        layer_norm: normalise both states (parameter-free layer norm over the features) before comparing, which
            makes MSE insensitive to the residual stream's growing scale.

    Shapes:
        forward(student_states: list of `(B, S, H_s)`, teacher_states: list of `(B, S, H_t)`, mask: `(B, S)` bool,
        True where a position counts) -> 0-dim float32. Teacher states are detached.
    """

    def __init__(
        self,
        student_dims: list[int] | int,
        teacher_dims: list[int] | int,
        kind: str = "cosine",
        layer_norm: bool = False,
    ):
        super().__init__()
        if kind not in HIDDEN_KINDS:
            raise ValueError(f"unknown hidden-state loss '{kind}'; choose one of {', '.join(HIDDEN_KINDS)}")
        self.shared = isinstance(student_dims, int) and isinstance(teacher_dims, int)
        s_dims = [student_dims] if isinstance(student_dims, int) else list(student_dims)
        t_dims = [teacher_dims] if isinstance(teacher_dims, int) else list(teacher_dims)
        if len(s_dims) == 1 and len(t_dims) > 1:
            s_dims = s_dims * len(t_dims)
        if len(t_dims) == 1 and len(s_dims) > 1:
            t_dims = t_dims * len(s_dims)
        if len(s_dims) != len(t_dims):
            raise ValueError(f"{len(s_dims)} student widths but {len(t_dims)} teacher widths")
        self.kind, self.layer_norm = kind, layer_norm
        self.student_dims, self.teacher_dims = s_dims, t_dims
        self.projections = nn.ModuleList(
            nn.Linear(s, t, bias=False) if s != t else nn.Identity() for s, t in zip(s_dims, t_dims)
        )

    def _pair_loss(self, s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor, proj: nn.Module) -> torch.Tensor:
        s = proj(s[mask].to(proj.weight.dtype) if isinstance(proj, nn.Linear) else s[mask]).float()
        t = t[mask].detach().float()
        if self.layer_norm:
            s, t = F.layer_norm(s, s.shape[-1:]), F.layer_norm(t, t.shape[-1:])
        if self.kind == "cosine":
            per_pos = 1.0 - F.cosine_similarity(s, t, dim=-1, eps=1e-8)
        else:
            per_pos = (s - t).pow(2).mean(-1)
        return per_pos.sum() / max(per_pos.shape[0], 1)

    def forward(
        self, student_states: list[torch.Tensor], teacher_states: list[torch.Tensor], mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        if len(student_states) != len(teacher_states):
            raise ValueError(f"{len(student_states)} student states but {len(teacher_states)} teacher states")
        if not self.shared and len(student_states) != len(self.projections):
            raise ValueError(f"expected {len(self.projections)} state pairs, got {len(student_states)}")
        if not student_states:
            raise ValueError("no hidden states to align")
        losses = []
        for i, (s, t) in enumerate(zip(student_states, teacher_states)):
            j = 0 if self.shared else i
            if s.shape[-1] != self.student_dims[j] or t.shape[-1] != self.teacher_dims[j]:
                raise ValueError(
                    f"pair {i}: widths {s.shape[-1]} -> {t.shape[-1]} but the loss was built for "
                    f"{self.student_dims[j]} -> {self.teacher_dims[j]}"
                )
            if s.shape[:-1] != t.shape[:-1]:
                raise ValueError(f"pair {i}: student {tuple(s.shape)} and teacher {tuple(t.shape)} positions differ")
            m = mask if mask is not None else torch.ones(s.shape[:-1], dtype=torch.bool, device=s.device)
            losses.append(self._pair_loss(s, t, m.bool(), self.projections[j]))
        return torch.stack(losses).mean()
