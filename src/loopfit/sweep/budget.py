"""Splitting a budget: a short probe per configuration, expected FLOPs per step over the curriculum.

Two kinds (`loopfit sweep --budget_kind`): `minutes` gives each run an equal share of the wall-clock left, so a
faster configuration trains more FLOPs; `flops` gives every run the same expected training FLOPs (the one count,
`loopfit.flops.train_flops_per_token`, integrated over the run's `DepthSchedule`), which is how a looped model
and the static one it came from are compared at equal compute.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from loopfit.flops import train_flops_per_token, training_flops
from loopfit.sweep.grid import SPEED_NEUTRAL, flatten
from loopfit.train.config import TrainConfig
from loopfit.train.distributed import cleanup
from loopfit.train.recipe import config_dict, fit, setup, validate


# ----------------------------------------------------------------------------------------------- the budget
@dataclass
class Probe:
    """What a few steps of one configuration cost."""

    setup_s: float
    """Loading models and data (and the matmul-peak measurement) in `setup`."""
    validate_s: float
    """The final validation at every evaluated depth."""
    flops_per_s: float
    """Training throughput, FLOPs (`loopfit.flops.train_flops_per_token` x tokens) per second of step time."""
    step_flops: float
    """Expected FLOPs of one optimizer step averaged over the whole curriculum."""

    @property
    def seconds_per_step(self) -> float:
        return self.step_flops / self.flops_per_s


def plan_steps(seconds: float, probe: Probe, overhead_s: float, cap: int | None) -> int:
    """Steps that fit in `seconds` after the run's fixed costs (setup, validation, metric); at least 1."""
    steps = max(1, math.floor((seconds - overhead_s) / probe.seconds_per_step))
    return min(steps, cap) if cap else steps


BUDGET_KINDS = ("minutes", "flops")


def flops_per_run(seconds: float, probes: list[Probe], overheads: list[float]) -> float:
    """The training FLOPs F every run gets so that the runs (one probe and fixed cost each) fit in `seconds`:
    `sum_i (overhead_i + F / flops_per_s_i) = seconds`; 0 when the fixed costs alone exceed it."""
    return max(0.0, seconds - sum(overheads)) / sum(1.0 / p.flops_per_s for p in probes)


def plan_flops_steps(flops: float, probe: Probe, cap: int | None) -> int:
    """Steps of a run whose expected step costs `probe.step_flops` within a budget of `flops` FLOPs; at least 1."""
    steps = max(1, math.floor(flops / probe.step_flops))
    return min(steps, cap) if cap else steps


def probe_run(cfg: TrainConfig, folder: Path, steps: int = 3) -> Probe:
    """Train `steps` steps of `cfg` in a scratch folder (deleted after) and time it, the last steps only."""

    pc = copy.deepcopy(cfg)
    pc.out, pc.max_steps, pc.save_every, pc.eval_every = str(folder), steps, 0, 0
    pc.resume, pc.overwrite, pc.progress_bar, pc.tensorboard, pc.wandb = False, True, False, False, False
    pc.lr_schedule.warmup_steps = 0
    t0 = time.perf_counter()
    run = setup(pc)
    setup_s = time.perf_counter() - t0
    try:
        fit(run)
        lines = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines() if x.strip()]
        timed = lines[1:] or lines  # the first step pays one-off warm-up costs
        tokens = pc.batch_size * pc.seq_len * pc.gradient_accumulation_steps
        cost = dict(seq_len=pc.seq_len, fixed_point=pc.fixed_point_scale > 0, teacher=run.teacher is not None)
        fp = run.flops_params
        every = max(pc.every_depth.k, 1)
        done = sum(train_flops_per_token(fp, x["num_steps_no_grad"], x["num_steps_grad"], **cost,
                                         depths=min(every, max(x["num_steps"], 1))) * tokens
                   for x in timed)  # fmt: skip
        seconds = sum(tokens / x["tokens_per_s"] for x in timed)
        depths = sorted({run.depth.final_mean, *cfg.eval_num_steps}) if run.looped else [None]
        t1 = time.perf_counter()
        validate(run, depths)
        validate_s = time.perf_counter() - t1
        # The probe's schedule has the probe's few steps, but its ramps are fractions of training: averaged over
        # its midpoints, a step costs what a step of the planned run costs on average, whatever that run's length.
        step_flops = training_flops(fp, tokens, run.depth if run.looped else None, 200, **cost,
                                    every_depth=every)["flops"]  # fmt: skip
        return Probe(setup_s, validate_s, done / seconds, step_flops)
    finally:
        run.logger.close()
        cleanup(run.d)
        shutil.rmtree(folder, ignore_errors=True)


def speed_signature(cfg: TrainConfig) -> str:
    """The config without the keys that leave a step's cost unchanged (runs with equal signatures share a probe)."""

    flat = flatten(config_dict(cfg))
    return json.dumps({k: v for k, v in flat.items() if not SPEED_NEUTRAL.match(k)}, sort_keys=True)
