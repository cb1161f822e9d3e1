"""Splitting a time budget: a short probe per configuration, expected FLOPs per step over the curriculum."""

from __future__ import annotations

import copy
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from loopfit.sweep.grid import SPEED_NEUTRAL, flatten
from loopfit.train.config import TrainConfig


# ----------------------------------------------------------------------------------------------- the budget
def flops_per_token(fp: dict, head: int, n: float, k: float, looped: bool, kd: bool) -> float:
    """Training FLOPs per token of one step: `6·N1 + 2·N2` (arXiv:2511.07384) plus the LM-head matmuls (student
    forward + input gradient, 4·V·H; the head itself is frozen under LoRA) and, with KD, the teacher's forward
    including its head (2·(N_teacher + V·H))."""
    f = 6 * (fp["prelude"] + k * fp["block"] + fp["coda"]) + 2 * n * fp["block"] if looped else 6 * fp["prelude"]
    f += 4 * head
    if kd:
        f += 2 * (fp.get("teacher", 0) + head)
    return float(f)


def expected_depths(cfg: TrainConfig, base_mean: int, points: int = 200) -> list[tuple[float, float]]:
    """Expected `(n_no_grad, k_grad)` at `points` evenly spaced fractions of training, following the curricula."""
    import numpy as np

    from loopfit.flops import curriculum_mean, expected_steps

    if cfg.fixed_num_steps:
        return [(0.0, float(cfg.fixed_num_steps))] * points
    t = (np.arange(points) + 0.5) / points
    ms, bs = cfg.mean_recurrence_schedule, cfg.backprop_depth_schedule
    means = curriculum_mean(t, ms.max_mean_rec, ms.warmup, ms.warmup_type) if ms.turn_on else np.full(points, base_mean)
    ks = (
        curriculum_mean(t, bs.max_backprop_depth, bs.warmup, bs.warmup_type)
        if bs.turn_on
        else np.full(points, cfg.backprop_depth)
    )
    # setdefault would evaluate the quadrature for every point; compute each distinct (mean, k) once.
    cache = {mk: expected_steps(float(mk[0]), int(mk[1]), min_steps=cfg.min_num_steps) for mk in set(zip(means, ks))}
    return [cache[mk] for mk in zip(means, ks)]


@dataclass
class Probe:
    """What a few steps of one configuration cost."""

    setup_s: float
    """Loading models and data (and the matmul-peak measurement) in `setup`."""
    validate_s: float
    """The final validation at every evaluated depth."""
    flops_per_s: float
    """Training throughput, FLOPs (`flops_per_token` x tokens) per second of step time."""
    step_flops: float
    """Expected FLOPs of one optimizer step averaged over the whole curriculum."""

    @property
    def seconds_per_step(self) -> float:
        return self.step_flops / self.flops_per_s


def plan_steps(seconds: float, probe: Probe, overhead_s: float, cap: int | None) -> int:
    """Steps that fit in `seconds` after the run's fixed costs (setup, validation, metric); at least 1."""
    steps = max(1, math.floor((seconds - overhead_s) / probe.seconds_per_step))
    return min(steps, cap) if cap else steps


def probe_run(cfg: TrainConfig, folder: Path, steps: int = 3) -> Probe:
    """Train `steps` steps of `cfg` in a scratch folder (deleted after) and time it, the last steps only."""
    from loopfit.train.distributed import cleanup
    from loopfit.train.recipe import depth_at_mean, fit, setup, validate
    from loopfit.train.student import base_model

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
        head = base_model(run.model).get_output_embeddings().weight.numel()
        kd = run.teacher is not None

        def fpt(n, k):
            return flops_per_token(run.flops_params, head, n, k, run.looped, kd)

        done = sum(fpt(x["num_steps_no_grad"], x["num_steps_grad"]) * tokens for x in timed)
        seconds = sum(tokens / x["tokens_per_s"] for x in timed)
        depths = sorted({depth_at_mean(run), *cfg.eval_num_steps}) if run.looped else [None]
        t1 = time.perf_counter()
        validate(run, depths)
        validate_s = time.perf_counter() - t1
        base_mean = cfg.mean_recurrence or getattr(base_model(run.model).config, "mean_recurrence", 1)
        per_token = [fpt(n, k) for n, k in expected_depths(cfg, base_mean)] if run.looped else [fpt(0, 0)]
        return Probe(setup_s, validate_s, done / seconds, sum(per_token) / len(per_token) * tokens)
    finally:
        run.logger.close()
        cleanup(run.d)
        shutil.rmtree(folder, ignore_errors=True)


def speed_signature(cfg: TrainConfig) -> str:
    """The config without the keys that leave a step's cost unchanged (runs with equal signatures share a probe)."""
    from loopfit.train.recipe import config_dict

    flat = flatten(config_dict(cfg))
    return json.dumps({k: v for k, v in flat.items() if not SPEED_NEUTRAL.match(k)}, sort_keys=True)
