"""The distillation part of the training config (`--distillation.*`), on-policy steps included.

Split from `loopfit.train.config` (which re-exports both classes) to keep each module short.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, is_dataclass

from loopfit.errors import LoopfitError, check_count, check_number
from loopfit.losses.divergences import DIVERGENCES, check_kind_params
from loopfit.losses.hidden import HIDDEN_KINDS


@dataclass
class Settings:
    """Base of the training configs: assigning a name that is not one of the dataclass's fields raises
    `AttributeError`, so a misspelt or renamed setting (`cfg.distillation.alpha = 0.3` after the rename to
    `ce_scale` / `kd_scale`) fails where it is written instead of being kept on the side and never read.
    (`slots=True` would do the same, but jsonargparse reads a dataclass's defaults through `vars()`.)"""

    def __setattr__(self, name: str, value) -> None:
        if name not in self.__dataclass_fields__:
            raise AttributeError(f"{type(self).__name__} has no setting {name!r}")
        object.__setattr__(self, name, value)


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise LoopfitError(f"--{name} must be one of {', '.join(allowed)}, got '{value}'")


def _check_finite(obj, prefix: str = "") -> None:
    """Refuse NaN or infinity in any float setting (a NaN passes every `<` / `>` range check unnoticed)."""
    for f in fields(obj):
        value = getattr(obj, f.name)
        items = value if isinstance(value, (list, tuple)) else value.values() if isinstance(value, dict) else [value]
        for v in items:
            if is_dataclass(v):
                _check_finite(v, f"{prefix}{f.name}.")
            elif isinstance(v, float) and not math.isfinite(v):
                raise LoopfitError(f"--{prefix}{f.name} must be a finite number, got {value}")


@dataclass
class OnPolicyConfig(Settings):
    """On-policy distillation (GKD, arXiv:2306.13649; on-policy distillation, Thinking Machines, Oct 2025): with
    probability `lmbda` an optimizer step trains on the student's own completions of the data's prompts, sampled at
    the step's drawn depth and scored by the teacher on the completion tokens only (`loopfit.train.on_policy`)."""

    lmbda: float = 0.0
    """Probability that an optimizer step is on-policy, drawn per step from a seeded generator saved in checkpoints
    (0 = off, the data's own completions only; 1 = every step). On needs prompt/response data and a live teacher."""
    start_step: int = 0
    """Optimizer steps before the first on-policy one: steps `1..start_step` are off-policy whatever the coin (it is
    still drawn, so the generator's position depends only on the step). GKD and on-policy distillation start from a
    student that already writes answers; this does the supervised part and the mix in one run, with one optimizer,
    one LoRA and one lr schedule, where two runs would restart all three."""
    max_new_tokens: int = 128
    """Tokens the student samples per prompt (fewer where it emits EOS); prompt + completion fit in `seq_len`."""
    temperature: float = 1.0
    """Sampling temperature of the student's completions (the divergence keeps `distillation.temperature`)."""
    top_p: float = 1.0
    """Nucleus sampling: draw from the smallest set of tokens holding this much probability (1 = all of them)."""
    kind: str = "rkl"
    """Divergence of the on-policy steps (the off-policy ones keep `distillation.kind`): `rkl`, the per-token reverse
    KL of on-policy distillation, by default; `jsd` with `kind_params {beta: ...}` is GKD's generalized JSD."""
    kind_params: dict[str, float] = field(default_factory=dict)
    """Parameters of `kind`, as `distillation.kind_params` (`{beta: 0.5}` for `jsd`)."""
    merge_lora: bool = True
    """Sample with each LoRA layer's update added to a temporary copy of its weight (`train.student.lora_merged`):
    one matmul per layer instead of three, ~15% less sampling time on CPU; the same model up to float rounding.
    False samples through the unmerged adapters."""
    prepack: bool = True
    """On CPU in fp32, sample with every linear layer's weight reordered once per sampling call into oneDNN's layout
    for the batch (`models.prepacked.prepacked_linears`): 1.5x faster decoding at batch 4 on a 2-core AVX2 CPU, the
    same model up to float rounding, one packed copy of the weights while sampling. Does nothing on GPU or under
    bf16 autocast. False samples with PyTorch's default matmul."""

    def validate(self) -> None:
        """Raise `LoopfitError` for a setting out of its range."""
        _check_finite(self, "distillation.on_policy.")
        check_number("distillation.on_policy.lmbda", self.lmbda, 0, 1)
        check_count("distillation.on_policy.max_new_tokens", self.max_new_tokens, 1)
        check_count("distillation.on_policy.start_step", self.start_step, 0)
        check_number("distillation.on_policy.temperature", self.temperature, low=0, low_open=True)
        check_number("distillation.on_policy.top_p", self.top_p, 0, 1, low_open=True)
        _choice("distillation.on_policy.kind", self.kind, DIVERGENCES)
        try:
            check_kind_params(self.kind, self.kind_params)
        except ValueError as e:
            raise LoopfitError(f"--distillation.on_policy.kind_params: {e}") from None


@dataclass
class DistillationConfig(Settings):
    """Knowledge distillation from a frozen teacher (logits and, optionally, hidden states)."""

    enabled: bool = False
    """Add a distillation term from `teacher_model_name` (or `teacher_cache`)."""
    teacher_model_name: str | None = None
    """Teacher: HF folder, hub id, .gguf file or `smollm2-135m`. Required when enabled without a cache. Its
    tokenizer must map every token to the same id as the student's (checked at start; a teacher without a
    tokenizer is refused, since the vocabularies could not be compared)."""
    teacher_cache: str | None = None
    """Folder of an offline teacher cache (sparse targets) used instead of running the teacher."""
    temperature: float = 2.0
    """Softmax temperature of the divergence (the KD term is scaled by T^2)."""
    ce_scale: float = 0.5
    """Weight of the cross-entropy against the labels. The classic blend `alpha * CE + (1 - alpha) * KD` is
    `ce_scale = alpha`, `kd_scale = 1 - alpha`; the old flag `--distillation.alpha` is still read that way."""
    kd_scale: float = 0.5
    """Weight of the distillation divergence (scaled by T^2 inside the term)."""
    kind: str = "fkl"
    """Divergence: `fkl` (forward KL), `rkl` (reverse KL), `skl` (lam FKL + (1 - lam) RKL), `skew` (skew KL,
    KL(p || alpha p + (1 - alpha) q)), `jsd` (generalized JSD), `tvd` (total variation)."""
    kind_params: dict[str, float] = field(default_factory=dict)
    """Parameters of the divergence, checked at start: `{lam: 0.5}` for `skl` (in [0, 1]), `{alpha: 0.1}` for `skew`
    (in [0, 1)), `{beta: 0.5}` for `jsd` (in [0, 1]); the other kinds take none."""
    fused: bool = True
    """Chunked loss from hidden states and the LM head weight (never materialises full-vocab logits)."""
    chunk_size: int = 1024
    """Tokens per chunk of the fused loss."""
    hidden_scale: float = 0.0
    """Weight of the hidden-state loss between loop iterations and teacher layers (0 = off)."""
    hidden_kind: str = "cosine"
    """Hidden-state loss: `cosine` or `mse`."""
    hidden_map: str = "spread"
    """Which loop states meet which teacher layers: `spread` (iteration i of R -> a teacher layer spread evenly over
    the span the block replaced; the target of a state then depends on R) or `last` (only the final state, whatever
    R, against the teacher's state where the coda begins: one target for every depth)."""
    share_weights: bool = True
    """Point the student's frozen layers at the teacher's identical tensors (LoRA only): one copy in memory."""
    on_policy: OnPolicyConfig = field(default_factory=OnPolicyConfig)
    """On-policy distillation: steps that train on the student's own samples (`lmbda` > 0 turns it on)."""

    def validate(self, teacher_model: bool = False) -> None:
        """Raise `LoopfitError` naming the first nonsensical distillation setting: the checks that need no other part
        of the run (`TrainConfig.validate` runs them, and so does `loopfit.hf.DistillationTrainer`).

        Args:
            teacher_model: the caller holds a live teacher model (the HF trainer's `teacher_model=`), which stands
                for `teacher_model_name`.
        """
        named = bool(self.teacher_model_name) or teacher_model

        _choice("distillation.kind", self.kind, DIVERGENCES)
        _choice("distillation.hidden_kind", self.hidden_kind, HIDDEN_KINDS)
        _choice("distillation.hidden_map", self.hidden_map, ("spread", "last"))
        check_count("distillation.chunk_size", self.chunk_size, 1)
        _check_finite(self, "distillation.")
        check_number("distillation.temperature", self.temperature, low=0, low_open=True)
        for name in ("ce_scale", "kd_scale", "hidden_scale"):
            check_number(f"distillation.{name}", getattr(self, name), low=0)
        if self.ce_scale == 0 and self.kd_scale == 0:
            raise LoopfitError("--distillation.ce_scale and --distillation.kd_scale are both 0: the loss would be 0")
        try:
            check_kind_params(self.kind, self.kind_params)
        except ValueError as e:
            raise LoopfitError(f"--distillation.kind_params: {e}") from None
        if self.enabled:
            if not named and self.teacher_cache is None:
                raise LoopfitError(
                    "--distillation.enabled=true needs --distillation.teacher_model_name (or teacher_cache)"
                )
            if self.teacher_cache and named:
                raise LoopfitError("give --distillation.teacher_model_name or --distillation.teacher_cache, not both")
            if self.hidden_scale and self.teacher_cache:
                raise LoopfitError(
                    "--distillation.hidden_scale needs a live teacher; a teacher cache holds no hidden states"
                )
            if self.hidden_scale and not named:
                raise LoopfitError("--distillation.hidden_scale needs --distillation.teacher_model_name")
        elif named or self.teacher_cache or self.hidden_scale:
            raise LoopfitError("a teacher or hidden_scale is set but --distillation.enabled is false")
        self.on_policy.validate()
        if self.on_policy.lmbda > 0:
            if not (self.enabled and named):
                raise LoopfitError(
                    "--distillation.on_policy.lmbda > 0 needs a live teacher to score the student's "
                    "samples: --distillation.enabled=true with --distillation.teacher_model_name"
                )
            if self.kd_scale == 0:
                raise LoopfitError(
                    "--distillation.on_policy trains on the KD term alone, whose weight is 0: set "
                    "--distillation.kd_scale above 0"
                )
        if self.hidden_map != "spread" and not self.hidden_scale:
            raise LoopfitError(
                f"--distillation.hidden_map={self.hidden_map} does nothing without --distillation.hidden_scale"
            )
