"""A run's state between `setup` and `save_final`: the `Run`, the optimizers and lr schedule of its current stage,
and saving / restoring it as a checkpoint.

Checkpoints hold whole tensors and full optimizer states (FSDP2 shards are gathered; rank 0 writes), so a run
resumes on any world size; `checkpoint.py` writes and verifies the files, this module decides what goes in them.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict
from torch.distributed.tensor import distribute_tensor

from loopfit.data.stream import BatchStream
from loopfit.errors import LoopfitError
from loopfit.io import discard_old
from loopfit.losses.objective import Objective
from loopfit.train import checkpoint as ckpt
from loopfit.train.config import TrainConfig
from loopfit.train.distributed import Dist, barrier
from loopfit.train.metrics import MetricsLogger
from loopfit.train.optim import build_optimizers
from loopfit.train.schedules import DepthSchedule, lr_scheduler


@dataclass
class Run:
    """Everything a run holds between `setup` and `save_final`."""

    cfg: TrainConfig
    out: Path
    d: Dist
    device: torch.device
    model: nn.Module  # PEFT wrapper or plain HF model: what is saved
    student: nn.Module  # `Student(model)`, possibly DDP-wrapped: what is called
    teacher: nn.Module | None
    tokenizer: object
    trainable: list[tuple[str, nn.Parameter]]
    stream: BatchStream
    val_set: object
    depth: DepthSchedule
    logger: MetricsLogger
    looped: bool
    objective: Objective | None = None  # the whole loss, built once in `setup`
    optimizers: list = field(default_factory=list)
    schedulers: list = field(default_factory=list)
    step: int = 0
    stage: int = -1
    flops_params: dict = field(default_factory=dict)
    peak_flops: float = 0.0
    info: dict = field(default_factory=dict)
    aside: Path | None = None  # the replaced run folder, kept until this run's first checkpoint (--overwrite)
    saved_step: int | None = None  # step of the newest checkpoint written or restored
    on_policy: object | None = None  # a `loopfit.train.on_policy.OnPolicy` (that module imports this one)

    @property
    def depth_gen(self) -> torch.Generator:
        """The depth sampler's generator (saved in checkpoints)."""
        return self.depth.generator

    @property
    def autocast(self):
        if self.cfg.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------------- stages
def stage_of(cfg: TrainConfig, step: int) -> tuple[int, int, int]:
    """(stage index, first step of the stage, stage length) for global step `step`."""
    if not cfg.stages:
        return 0, 0, cfg.max_steps
    start = 0
    for i, s in enumerate(cfg.stages):
        if step < start + s.steps or i == len(cfg.stages) - 1:
            return i, start, s.steps
        start += s.steps
    raise AssertionError


def enter_stage(run: Run, step: int) -> None:
    """(Re)build optimizer(s) and lr schedule for the stage containing `step`."""
    cfg = run.cfg
    i, start, length = stage_of(cfg, step)
    if i == run.stage:
        return
    rules = cfg.stages[i].param_groups if cfg.stages else cfg.param_groups
    run.optimizers = build_optimizers(run.trainable, cfg.optim_config, rules)
    run.schedulers = [lr_scheduler(o, length, cfg.lr_schedule) for o in run.optimizers]
    with warnings.catch_warnings():
        # Positioning the schedule inside the stage (on resume) steps it before any optimizer step, by design.
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
        for _ in range(step - start):
            for s in run.schedulers:
                s.step()
    run.stage = i


# ----------------------------------------------------------------------------------------------- checkpoints
def restore(run: Run, path: Path, weights: dict, state: dict) -> int | None:
    """Load a (verified) checkpoint into the run; returns the number of metrics lines it had seen (None if it
    predates that count)."""
    names = {n for n, _ in run.trainable}
    if set(weights) != names:
        raise LoopfitError(f"checkpoint {path} does not match this run's trainable parameters (config changed?)")
    fsdp = run.d.mode == "fsdp"
    if state.get("optimizer_format", "plain") != ("fsdp" if fsdp else "plain"):
        raise LoopfitError(f"checkpoint {path} was written with --parallel {'fsdp' if not fsdp else 'none/ddp'}; "
                           "resume it in the same family (fsdp with fsdp, none/ddp with none/ddp)")  # fmt: skip
    with torch.no_grad():
        for n, p in run.trainable:
            full = weights[n].to(p.device, p.dtype)
            if hasattr(p, "device_mesh"):  # an FSDP2 shard: keep this rank's part
                full = distribute_tensor(full, p.device_mesh, p.placements)
            p.copy_(full)
    run.step = state["step"]
    enter_stage(run, run.step)
    if fsdp:
        opts = StateDictOptions(full_state_dict=True)
        set_optimizer_state_dict(run.student, run.optimizers, state["optimizers"], options=opts)
    else:
        for o, s in zip(run.optimizers, state["optimizers"]):
            o.load_state_dict(s)
    for sch, s in zip(run.schedulers, state["schedulers"]):
        sch.load_state_dict(s)
    run.stream.load_state_dict(state["data"])
    ckpt.set_rng_state(state["rng"], run.depth_gen)
    if run.on_policy is not None:
        run.on_policy.load_state_dict(state.get("on_policy"))
    run.saved_step = run.step
    if run.d.is_main:
        print(f"resumed from {path} at step {run.step}", file=sys.stderr)
    return state.get("metrics_lines")


def _full_weights(run: Run) -> dict[str, torch.Tensor]:
    """Trainable tensors, whole (FSDP2 shards are gathered: a collective, every rank must call it)."""
    return {n: p.full_tensor() if hasattr(p, "full_tensor") else p for n, p in run.trainable}


def save_checkpoint(run: Run) -> None:
    """Rank 0 writes whole tensors and optimizer states, so any world size can resume."""
    weights = _full_weights(run)
    if run.d.mode == "fsdp":
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        optim_state = get_optimizer_state_dict(run.student, run.optimizers, options=opts)
    else:
        optim_state = [o.state_dict() for o in run.optimizers]
    if run.d.is_main:
        run.logger.sync()  # the lines this checkpoint counts must be on disk before it is
        state = {
            "metrics_lines": run.logger.lines,
            "step": run.step,
            "stage": run.stage,
            "optimizers": optim_state,
            "optimizer_format": "fsdp" if run.d.mode == "fsdp" else "plain",
            "schedulers": [s.state_dict() for s in run.schedulers],
            "data": run.stream.state_dict(),
            "rng": ckpt.rng_state(run.depth_gen),
            "on_policy": run.on_policy.state_dict() if run.on_policy is not None else None,
            "world_size": run.d.world_size,
        }
        ckpt.save_checkpoint(run.out, run.step, weights, state, run.cfg.keep_last)
        if run.aside is not None:  # the new run has its first complete output: the replaced one can go
            discard_old(run.aside)
            run.aside = None
    run.saved_step = run.step
    barrier(run.d)
