"""Typed configuration of a training run; every field is a `loopfit train` flag (`--lora.r=16`) or a YAML key.

Names follow the reference implementation (`--lora.enabled`, `--distillation.teacher_model_name`,
`--mean_recurrence_schedule.max_mean_rec`, `--optim_config.lr`, ...). `TrainConfig.validate` refuses
combinations that make no sense before any model is loaded.
"""

from __future__ import annotations

import ast
import inspect
import math
import re
from dataclasses import dataclass, field, fields
from typing import Literal

from loopfit.data.dataset import check_format_flags
from loopfit.errors import LoopfitError, check_count, check_number
from loopfit.losses.depths import DEPTH_WEIGHTINGS
from loopfit.train.distillation_config import (  # noqa: F401
    DistillationConfig,
    OnPolicyConfig,
    Settings,
    _check_finite,
    _choice,
)

OPTIMIZERS = ("adamw", "muon", "ellis_adam")
LR_SCHEDULES = ("wsd", "cosine", "constant")
RAMPS = ("linear", "1-sqrt")
PRECISIONS = ("fp32", "bf16")
PARALLEL = ("none", "ddp", "fsdp")


@dataclass
class LoRAConfig(Settings):
    """PEFT LoRA adapters on the student."""

    enabled: bool = False
    """Wrap the student in LoRA adapters (PEFT); only adapters and `modules_to_save` are trained."""
    r: int = 16
    """Rank of the low-rank update."""
    lora_alpha: int = 32
    """Scale numerator: the update is multiplied by `lora_alpha / r`."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA path."""
    target_modules: str | list[str] = "all-linear"
    """Modules to adapt: `all-linear` (every linear layer but the LM head, the loop adapter included), a list of
    module-name suffixes, or a regex matched against full module names."""
    modules_to_save: list[str] | None = None
    """Modules trained fully instead of through LoRA, e.g. `[adapter]` for the loop adapter."""


@dataclass
class EveryDepthConfig(Settings):
    """Loss at every depth: CE / KD also on the coda's output after each of the last `k` loop iterations, through the
    fused loss (the teacher's logits computed once per token chunk for all of them). Weighting and its sources:
    `loopfit.losses.depths`."""

    k: int = 1
    """Depths supervised: the final one and the k - 1 before it (fewer when a step runs fewer iterations). 1 (or 0):
    the final depth only, today's loss. Each extra depth costs one more coda + head forward and backward."""
    weighting: str = "uniform"
    """`uniform` (each supervised depth 1/k) or `linear` (the j-th from the shallowest j / (1 + ... + k), the final
    depth weighing most); the weights sum to 1."""


@dataclass
class ExitGateConfig(Settings):
    """The exit gate's stage (Ouro, arXiv:2510.25741): train only a looped model's exit gate
    (`loopfit.models.exit_gate`, added when the model has none), everything else frozen, on
    `sum_i p(i) L_i - entropy_scale * H(p)` per token, with `L_i` the CE / KD after iteration i (coda + head on every
    state) and `p` the gate's exit distribution over the step's R iterations (train at the depth inference will cap:
    `--fixed_num_steps`)."""

    train: bool = False
    """Run the gate's stage (needs a looped student, no LoRA, no hidden / fixed-point terms or every-depth loss)."""
    width: int = 0
    """Hidden width of a new gate: 0 for a linear gate on the (RMS-normalised) state, else a SiLU MLP. A model that
    already has a gate keeps its own."""
    entropy_scale: float = 0.05
    """beta of the entropy bonus (nats per token; the entropy is at most log R): larger keeps the exit distribution
    flatter; 0 lets it collapse onto each token's best depth as the gate sees it."""


@dataclass
class MeanRecurrenceSchedule(Settings):
    """Curriculum of the mean loop depth: ramps from 1 to `max_mean_rec` over a warmup fraction of training."""

    turn_on: bool = False
    """Ramp the mean; off: train at `mean_recurrence` throughout."""
    warmup: float = 0.25
    """Fraction of `max_steps` over which the mean ramps up."""
    warmup_type: str = "linear"
    """Ramp shape: `linear` f(t) = t, or `1-sqrt` f(t) = 1 - sqrt(1 - t) (below linear: deepens slowly at first,
    fastest at the end of the warmup)."""
    max_mean_rec: int = 8
    """Mean depth reached at the end of the ramp (mean = ceil of the ramp value)."""


@dataclass
class BackpropDepthSchedule(Settings):
    """Curriculum of the backprop depth k (iterations that keep gradients): ramps from 1 to `max_backprop_depth`."""

    turn_on: bool = False
    """Ramp k; off: `backprop_depth` throughout."""
    warmup: float = 0.25
    """Fraction of `max_steps` over which k ramps up."""
    warmup_type: str = "linear"
    """Ramp shape: `linear` or `1-sqrt`."""
    max_backprop_depth: int = 8
    """k reached at the end of the ramp."""


@dataclass
class OptimConfig(Settings):
    """Optimizer and its hyper-parameters."""

    optimizer: str = "adamw"
    """`adamw`; `muon` (torch.optim.Muon on 2-D hidden matrices, AdamW on the rest); `ellis_adam`."""
    lr: float = 2e-4
    """Peak learning rate (AdamW part)."""
    weight_decay: float = 0.0
    """Decoupled weight decay (never applied to norms, biases or 1-D tensors)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """Adam betas."""
    eps: float = 1e-8
    """Adam epsilon."""
    muon_lr: float = 1e-3
    """Learning rate of the Muon part."""
    muon_momentum: float = 0.95
    """Muon momentum."""
    update_clip: float = 1.0
    """ELLISAdam: bound on each element of the update (before the learning rate)."""


@dataclass
class LRSchedule(Settings):
    """Learning-rate schedule of each stage (multiplies every group's lr)."""

    kind: str = "wsd"
    """`wsd` (linear warmup, constant, linear decay at the end), `cosine` (warmup then cosine) or `constant`."""
    warmup_steps: int = 0
    """Optimizer steps of linear warmup from 0."""
    decay_fraction: float = 0.2
    """WSD: fraction of the stage spent decaying at the end."""
    min_lr_ratio: float = 0.0
    """Final lr as a fraction of the peak."""


@dataclass
class ParamGroupRule(Settings):
    """Parameters whose name matches `pattern` (re.search; first matching rule wins) get `lr_mult` x lr."""

    pattern: str
    """Regex searched in the parameter name."""
    lr_mult: float = 1.0
    """Learning-rate multiplier; 0 freezes the matching parameters for the stage."""


@dataclass
class StageConfig(Settings):
    """One stage of multi-stage training; optimizer and lr schedule are rebuilt at its start."""

    steps: int
    """Optimizer steps in this stage."""
    param_groups: list[ParamGroupRule] = field(default_factory=list)
    """Rules for this stage (replace the top-level `param_groups`)."""


@dataclass
class TrainConfig(Settings):
    """A whole training run."""

    model_name: str | None = None
    """Student: a looped model folder (from `loopfit convert`) or any plain HF causal LM (ordinary KD)."""
    out: str | None = None
    """Run folder: config.yaml, metrics.jsonl, tensorboard/, checkpoints/, final/."""
    data: str | list[str] | None = None
    """Training data (file, folder or dataset; see `loopfit.data`); several sources mix by token share:
    `--data a.txt:0.5 --data b.jsonl:0.5`. Default: built-in arithmetic problems."""
    chat: bool = False
    """Format records with the tokenizer's chat template."""
    assistant_only: bool = False
    """With `chat`: loss only on assistant tokens."""
    system_prompt: str | None = None
    """With `chat`: a system message prepended to each conversation."""
    max_documents: int | None = None
    """Use at most this many documents."""
    val_fraction: float = 0.0
    """Fraction of documents held out for validation (0 = none)."""
    val_data: str | None = None
    """A separate validation source (all of it held out), instead of or besides `val_fraction`."""
    position_ids: bool = False
    """Keep packed documents apart: each row carries position ids restarting at 0 at every document, and every
    document attends only to itself (HF's packed-sequence masks, built from the position ids), as if each had a
    padded row of its own, without computing the padding. Off: a document sees the ones packed before it in its row
    and positions run 0..seq_len-1 (pretraining-style packing). Teacher, student and validation all read the rows
    this way; a teacher cache must be built with the same setting (`loopfit cache-teacher --position_ids=true`)."""
    text_stream: bool = False
    """Text files train as one contiguous token stream cut into `seq_len` windows, each a row of its own (nanoGPT,
    litgpt, HF `run_clm`), the windows shuffled and mixed like documents. Off: each paragraph is a document, packed
    best-fit among the others in shuffled order, so a row holds unrelated paragraphs. Records are unaffected."""
    seq_len: int = 256
    """Tokens per packed sequence (at least 2, at most the model's `max_position_embeddings`: longer is refused)."""
    batch_size: int = 4
    """Sequences per micro-batch (per rank)."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step; the loss is normalised by the global count of valid tokens."""
    max_steps: int = 100
    """Optimizer steps of the run (the sum of the stages' `steps` when `stages` is given)."""
    max_minutes: float | None = None
    """Wall-clock budget of this process's training loop: stop (and save) after the step that crosses it."""
    seed: int = 0
    """Seeds data order, depth sampling, dropout and the state noise."""
    mean_recurrence: int | None = None
    """Mean depth without a schedule (default: the model config's `mean_recurrence`)."""
    backprop_depth: int = 8
    """Iterations with gradient without a schedule (truncated backprop)."""
    min_num_steps: int = 1
    """Floor of the sampled depth: a draw below it is raised to it (the extra iterations are the gradient ones,
    up to k). With `min_num_steps` = k every step backpropagates through k iterations after a random number of
    no-grad ones, which teaches the loop that iterating longer must not hurt."""
    fixed_point_scale: float = 0.0
    """Weight of the fixed-point loss `||f(s_R) - s_R||^2 / ||s_R||^2` (mean over target tokens; `f` is one more
    loop iteration, run with gradient, that the coda does not read): pulls the final state towards a fixed point so
    that deeper R than trained keeps the trained depth's loss instead of drifting. 0 turns it off (no extra cost);
    on, a step runs one more block iteration with gradient."""
    fixed_num_steps: int | None = None
    """Train at exactly this depth R, all with gradient, no sampling (ablations, tests)."""
    mean_recurrence_schedule: MeanRecurrenceSchedule = field(default_factory=MeanRecurrenceSchedule)
    """Curriculum of the mean depth."""
    backprop_depth_schedule: BackpropDepthSchedule = field(default_factory=BackpropDepthSchedule)
    """Curriculum of the backprop depth."""
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    """LoRA settings."""
    distillation: DistillationConfig = field(default_factory=DistillationConfig)
    """Distillation settings."""
    every_depth: EveryDepthConfig = field(default_factory=EveryDepthConfig)
    """Loss at every depth (a looped student only)."""
    exit_gate: ExitGateConfig = field(default_factory=ExitGateConfig)
    """The exit gate's training stage (a looped student only; everything but the gate frozen)."""
    optim_config: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer settings."""
    lr_schedule: LRSchedule = field(default_factory=LRSchedule)
    """Learning-rate schedule."""
    param_groups: list[ParamGroupRule] = field(default_factory=list)
    """Per-parameter lr multipliers by regex (first match wins; unmatched parameters get 1)."""
    stages: list[StageConfig] = field(default_factory=list)
    """Multi-stage training (gradual unfreezing); empty = one stage of `max_steps` with `param_groups`."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 = no clipping; negative is refused)."""
    precision: str = "fp32"
    """`fp32`, or `bf16` autocast."""
    gradient_checkpointing: bool = False
    """Recompute each decoder layer's activations in backward instead of keeping them (less memory, ~1/3 more
    compute): HF's `activation_checkpointing_enable` (the older `gradient_checkpointing_enable` where
    transformers lacks it), non-reentrant."""
    compile: bool = False
    """`torch.compile` the student's decoder layers: a looped student's compiled once and reused by every iteration
    and depth, a plain student's (a static baseline, plain KD) each alike (`loopfit.models.compiled`); equal to eager
    within float rounding. The first steps pay the compilation; without a working compiler (inductor on CPU needs a
    C++ compiler) it warns and runs eager."""
    device: str = "auto"
    """`auto` (cuda if available), `cpu` or `cuda`."""
    nan_policy: str = "stop"
    """On a NaN/inf loss or gradient: `stop` the run, or `skip` the step."""
    log_every: int = 1
    """Optimizer steps between metrics lines."""
    eval_every: int = 0
    """Optimizer steps between validation passes (0 = only at the end; needs `val_fraction` > 0)."""
    eval_batches: int = 0
    """Validation batches per pass (0 = the whole validation split; negative is refused)."""
    eval_num_steps: list[int] = field(default_factory=list)
    """Extra depths R at which the final validation runs (the current mean is always included)."""
    save_every: int = 0
    """Optimizer steps between checkpoints (0 = only the final one)."""
    keep_last: int = 2
    """Checkpoints kept."""
    resume: bool | Literal["auto"] = False
    """`true`: continue the run in `out` from its newest intact checkpoint (a finished run exits without changes;
    no run there is an error); `auto`: the same, or start the run when `out` holds none. The flags must equal the
    run's `config.yaml` except those that only extend or observe it (`RESUME_MAY_CHANGE` in
    `loopfit.train.resume`: max_steps, max_minutes, save_every, keep_last, logging, eval cadence, ...), which are
    recorded in `out/resumes.json`."""
    overwrite: bool = False
    """Replace an existing run folder (only one loopfit wrote) instead of refusing. Everything is loaded and checked
    first; the old folder is kept aside as `.old-<name>-<pid>` until the new run's first checkpoint, and put back
    if the new run fails before it."""
    tensorboard: bool = True
    """Write TensorBoard event files under `out/tensorboard`."""
    wandb: bool = False
    """Also log to Weights & Biases (needs `wandb` installed)."""
    wandb_project: str = "loopfit"
    """W&B project name."""
    progress_bar: bool = True
    """Show a tqdm progress bar."""
    parallel: str = "none"
    """`none`, `ddp` or `fsdp` (under torchrun; gloo on CPU, nccl on GPU)."""

    def validate(self) -> None:
        """Raise `LoopfitError` naming the first nonsensical setting."""
        _validate(self)

    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.stages) if self.stages else self.max_steps


def _validate(c: TrainConfig) -> None:
    if not c.model_name:
        raise LoopfitError("--model_name is required")
    if not c.out:
        raise LoopfitError("--out is required")
    _choice("optim_config.optimizer", c.optim_config.optimizer, OPTIMIZERS)
    _choice("lr_schedule.kind", c.lr_schedule.kind, LR_SCHEDULES)
    _choice("mean_recurrence_schedule.warmup_type", c.mean_recurrence_schedule.warmup_type, RAMPS)
    _choice("backprop_depth_schedule.warmup_type", c.backprop_depth_schedule.warmup_type, RAMPS)
    c.distillation.validate()
    _choice("precision", c.precision, PRECISIONS)
    _choice("nan_policy", c.nan_policy, ("stop", "skip"))
    _choice("parallel", c.parallel, PARALLEL)
    _choice("device", c.device, ("auto", "cpu", "cuda"))
    positive = {
        "seq_len": c.seq_len,
        "batch_size": c.batch_size,
        "gradient_accumulation_steps": c.gradient_accumulation_steps,
        "keep_last": c.keep_last,
        "lora.r": c.lora.r,
        "mean_recurrence_schedule.max_mean_rec": c.mean_recurrence_schedule.max_mean_rec,
        "backprop_depth_schedule.max_backprop_depth": c.backprop_depth_schedule.max_backprop_depth,
        "backprop_depth": c.backprop_depth,
    }
    if not c.stages:
        positive["max_steps"] = c.max_steps
    for name, v in positive.items():
        check_count(name, v, 2 if name == "seq_len" else 1)
    check_count("max_documents", c.max_documents)
    check_count("every_depth.k", c.every_depth.k, 0)
    _choice("every_depth.weighting", c.every_depth.weighting, DEPTH_WEIGHTINGS)
    for name in ("log_every", "eval_every", "eval_batches", "save_every"):
        check_count(name, getattr(c, name), 0)  # 0 is each one's documented "off" / "all" value
    _check_finite(c)
    check_number("grad_clip", c.grad_clip, low=0)
    check_number("lora.lora_alpha", c.lora.lora_alpha, low=0, low_open=True)
    d = c.distillation
    if c.max_minutes is not None and c.max_minutes <= 0:
        raise LoopfitError(f"--max_minutes must be > 0, got {c.max_minutes}")
    if c.mean_recurrence is not None and c.mean_recurrence < 1:
        raise LoopfitError(f"--mean_recurrence must be >= 1, got {c.mean_recurrence}")
    if c.min_num_steps < 1:
        raise LoopfitError(f"--min_num_steps must be >= 1, got {c.min_num_steps}")
    if not (c.fixed_point_scale >= 0 and math.isfinite(c.fixed_point_scale)):
        raise LoopfitError(f"--fixed_point_scale must be a finite number >= 0, got {c.fixed_point_scale}")
    if c.fixed_num_steps is not None:
        if c.min_num_steps > 1:
            raise LoopfitError("--fixed_num_steps trains at one depth; --min_num_steps applies to sampled depths")
        if c.fixed_num_steps < 1:
            raise LoopfitError(f"--fixed_num_steps must be >= 1, got {c.fixed_num_steps}")
        if c.mean_recurrence_schedule.turn_on or c.backprop_depth_schedule.turn_on:
            raise LoopfitError(
                "--fixed_num_steps trains at one depth; it cannot be combined with a recurrence schedule"
            )
    for name, sched in (
        ("mean_recurrence_schedule", c.mean_recurrence_schedule),
        ("backprop_depth_schedule", c.backprop_depth_schedule),
    ):
        if not 0.0 <= sched.warmup <= 1.0:
            raise LoopfitError(f"--{name}.warmup is a fraction of training in [0, 1], got {sched.warmup}")
    if not 0.0 <= c.val_fraction < 1.0:
        raise LoopfitError(f"--val_fraction must be in [0, 1), got {c.val_fraction}")
    if c.eval_every and c.val_fraction == 0.0 and not c.val_data:
        raise LoopfitError("--eval_every needs validation data: set --val_fraction > 0 or --val_data")
    if any(r < 1 for r in c.eval_num_steps):
        raise LoopfitError(f"--eval_num_steps must all be >= 1, got {c.eval_num_steps}")
    check_format_flags(c.chat, c.assistant_only, c.system_prompt)
    o = c.optim_config
    if o.lr <= 0 or o.muon_lr <= 0:
        raise LoopfitError("--optim_config.lr and --optim_config.muon_lr must be > 0")
    if o.weight_decay < 0:
        raise LoopfitError(f"--optim_config.weight_decay must be >= 0, got {o.weight_decay}")
    check_number("optim_config.eps", o.eps, low=0, low_open=True)
    check_number("optim_config.update_clip", o.update_clip, low=0, low_open=True)
    check_number("optim_config.muon_momentum", o.muon_momentum, 0, 1, high_open=True)
    for b in o.betas:
        check_number("optim_config.betas", b, 0, 1, high_open=True)
    s = c.lr_schedule
    if s.warmup_steps < 0 or not 0.0 <= s.decay_fraction <= 1.0 or not 0.0 <= s.min_lr_ratio <= 1.0:
        raise LoopfitError("--lr_schedule: warmup_steps >= 0, decay_fraction and min_lr_ratio in [0, 1]")
    if s.warmup_steps >= c.total_steps and s.kind != "constant":
        raise LoopfitError(
            f"--lr_schedule.warmup_steps ({s.warmup_steps}) must be below the total steps ({c.total_steps})"
        )
    for stage in c.stages:
        if stage.steps < 1:
            raise LoopfitError(f"every stage needs steps >= 1, got {stage.steps}")
    for rule in c.param_groups + [r for st in c.stages for r in st.param_groups]:
        try:
            re.compile(rule.pattern)
        except re.error as e:
            raise LoopfitError(f"bad param_groups pattern '{rule.pattern}': {e}") from None
        if rule.lr_mult < 0:
            raise LoopfitError(f"param_groups lr_mult must be >= 0, got {rule.lr_mult} for '{rule.pattern}'")
    check_number("lora.lora_dropout", c.lora.lora_dropout, 0, 1, high_open=True)
    if not c.lora.enabled and c.lora.modules_to_save:
        raise LoopfitError("--lora.modules_to_save needs --lora.enabled=true")
    if o.optimizer == "muon" and c.lora.enabled and not c.lora.modules_to_save:
        # LoRA factors are thin (r x d) matrices: orthogonalising them is not what Muon is for.
        raise LoopfitError("--optim_config.optimizer=muon with LoRA trains only thin LoRA factors; use adamw")
    if d.on_policy.lmbda > 0:
        if c.parallel == "fsdp":
            raise LoopfitError("--distillation.on_policy needs whole weights to generate: use --parallel ddp or none")
        if d.on_policy.max_new_tokens >= c.seq_len:
            raise LoopfitError(
                f"--distillation.on_policy.max_new_tokens ({d.on_policy.max_new_tokens}) must be below "
                f"--seq_len ({c.seq_len}): a prompt and its completion are one row of seq_len tokens"
            )
        if d.on_policy.start_step >= c.total_steps:
            raise LoopfitError(
                f"--distillation.on_policy.start_step ({d.on_policy.start_step}) must be below the run's "
                f"{c.total_steps} steps: no step would be on-policy"
            )
    if d.share_weights and d.enabled and not c.lora.enabled and d.teacher_model_name:
        d.share_weights = False  # without LoRA the student's layers change, so nothing can be shared
    _validate_exit_gate(c)
    if c.wandb:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise LoopfitError("--wandb=true needs the 'wandb' package (pip install wandb)") from None


def _validate_exit_gate(c: TrainConfig) -> None:
    g = c.exit_gate
    check_count("exit_gate.width", g.width, 0)
    check_number("exit_gate.entropy_scale", g.entropy_scale, low=0)
    if not g.train:
        return
    clash = {
        "--lora.enabled=true": c.lora.enabled,
        "--every_depth.k > 1": c.every_depth.k > 1,
        "--fixed_point_scale > 0": c.fixed_point_scale > 0,
        "--distillation.hidden_scale > 0": c.distillation.enabled and c.distillation.hidden_scale > 0,
        "--distillation.on_policy": c.distillation.on_policy.lmbda > 0,
    }
    bad = [name for name, on in clash.items() if on]
    if bad:
        raise LoopfitError(f"--exit_gate.train=true trains the gate alone (every other weight frozen, every depth "
                           f"scored); it cannot be combined with {', '.join(bad)}")  # fmt: skip


def field_docs(cls) -> dict[str, str]:
    """Attribute docstrings of a dataclass, by field name (for the CLI's `Args:` section)."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def config_fields() -> list[str]:
    return [f.name for f in fields(TrainConfig)]
