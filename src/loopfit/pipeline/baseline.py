"""The demo's optional static baseline (`--baseline static`): the pruned model without the loop, healed with the
looped heal's recipe for the same training FLOPs or the same training minutes, and scored on the same held-out sets.

The static model is `convert.to_static` on the demo's layout: the prelude, the block's layers once, the coda. It
heals with the same LoRA rank, learning rate, distillation from the same teacher cache, data stream and seed as the
looped heal (a static model has no loop adapter to train and no depth curriculum). Its length is set from what the
looped heal *achieved*, not what it planned: the looped run's depths are random draws and a time guard can stop it
early, so the static run is given exactly the compute (or time) the looped run spent.

- `flops`: the looped run's training FLOPs, `loopfit.flops.train_flops_per_token` at each step's drawn depth (from
  its `metrics.jsonl`) times the step's tokens, summed; divided by the static model's FLOPs per step (the same
  function at depth 0) and floored, this is the static run's number of optimizer steps. Both models are counted on
  their base weights (the LoRA matrices, under 2% of the work, are left out of both), so the ratio is like for like.
- `minutes`: the looped run's training seconds (its step times, setup and validation excluded) divided by the
  static model's seconds per step, timed by a 3-step probe (`sweep.budget.probe_run`).

Both runs' spends go to `baseline.json`; the report names the kind and both runs' FLOPs and minutes. When the
static run needs more rows than the cache holds (it runs more, cheaper steps), the endless seeded stream starts a
second epoch of the same rows, as the looped run would have.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

from loopfit.convert import parse_layout, to_static
from loopfit.errors import LoopfitError
from loopfit.flops import flop_params, train_flops_per_token
from loopfit.io import atomic_dir, write_json
from loopfit.loading import load_model
from loopfit.pipeline.config import DemoConfig, Plan
from loopfit.pipeline.progress import end_stage, start_stage
from loopfit.pipeline.stages import train_config
from loopfit.sweep.budget import BUDGET_KINDS, plan_steps, probe_run
from loopfit.train.config import LoRAConfig, MeanRecurrenceSchedule, TrainConfig
from loopfit.train.export import export_run
from loopfit.train.recipe import train

BASELINES = ("static",)
PLAN = "baseline-plan.json"
SUMMARY = "baseline.json"


def check_baseline(cfg: DemoConfig, out: Path) -> None:
    """Refuse a bad `--baseline` / `--baseline_budget` combination, or one that differs from what `out` was planned
    with, before anything is written. Fills in the default budget kind (`flops`)."""
    if cfg.baseline is None:
        if cfg.baseline_budget is not None:
            raise LoopfitError("--baseline_budget needs --baseline static")
        return
    if cfg.baseline not in BASELINES:
        raise LoopfitError(f"--baseline takes `static` (or nothing), got '{cfg.baseline}'")
    cfg.baseline_budget = cfg.baseline_budget or "flops"
    if cfg.baseline_budget not in BUDGET_KINDS:
        raise LoopfitError(f"--baseline_budget must be one of {', '.join(BUDGET_KINDS)}, got '{cfg.baseline_budget}'")
    path = out / PLAN
    if path.is_file():
        kind = json.loads(path.read_text()).get("kind")
        if kind != cfg.baseline_budget:
            raise LoopfitError(f"{out} planned its static baseline with --baseline_budget {kind}; rerun with that "
                               f"kind, or delete {path} and {out / 'static-heal'} to plan it again")  # fmt: skip


def static_config(cfg: DemoConfig, static: Path, run: Path, steps: int, p: Plan, cache: Path) -> TrainConfig:
    """The looped heal's recipe for the static model: same LoRA, optimizer, KD from the same cache, data and seed;
    no loop adapter to train fully and no depth curriculum (a static model has neither)."""
    tc = train_config(cfg, static, run, steps, p.max_documents, cache, p.val_fraction)
    return replace(
        tc,
        lora=LoRAConfig(enabled=True, r=cfg.lora_r, lora_alpha=2 * cfg.lora_r),
        mean_recurrence_schedule=MeanRecurrenceSchedule(turn_on=False),
    )


def spend(run: Path, params: dict, tc: TrainConfig) -> dict:
    """What a finished training run spent: `{"steps", "flops", "seconds"}`, from its `metrics.jsonl` (one line a
    step, the last kept where a resume logged a step twice). FLOPs: `train_flops_per_token(params, ...)` at each
    step's drawn depth x the step's tokens; seconds: the step times (tokens / tokens_per_s), setup and validation
    excluded."""
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    steps = {m["step"]: m for m in lines if "tokens_per_s" in m}
    done = json.loads((run / "done.json").read_text())["step"] if (run / "done.json").is_file() else max(steps)
    if sorted(steps) != list(range(1, done + 1)):
        raise LoopfitError(f"{run / 'metrics.jsonl'} does not log every step: cannot count the run's training FLOPs")
    tokens = tc.batch_size * tc.seq_len * tc.gradient_accumulation_steps
    flops = seconds = 0.0
    for m in steps.values():
        n, kg = m["num_steps_no_grad"], m["num_steps_grad"]
        depths = min(max(tc.every_depth.k, 1), max(n + kg, 1))
        flops += tokens * train_flops_per_token(params, n, kg, tc.seq_len, tc.fixed_point_scale > 0, depths=depths)
        seconds += tokens / m["tokens_per_s"]
    return {"steps": done, "flops": flops, "seconds": seconds}


def static_model(cfg: DemoConfig, out: Path, teacher, tokenizer, layers: str) -> Path:
    """`static/`: the source's layout layers once each, in order (prelude, block, coda), as a plain model."""
    folder = out / "static"
    if not folder.exists():
        t0 = start_stage(f"baseline 1/3 the static pruned model, layers {layers} once (no loop)")
        model = to_static(teacher, parse_layout(layers, teacher.config.num_hidden_layers))
        with atomic_dir(folder) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        end_stage(t0, out, "static model")
    return folder


def static_plan(cfg: DemoConfig, out: Path, converted: Path, static: Path, cache: Path, p: Plan) -> dict:
    """The static run's steps for the same training FLOPs or minutes as the looped heal achieved (`PLAN`)."""
    path = out / PLAN
    if path.is_file():
        return json.loads(path.read_text())
    t0 = start_stage(f"baseline 2/3 plan the static heal at equal training {cfg.baseline_budget}")
    looped_tc = train_config(cfg, converted, out / "heal", p.steps, p.max_documents, cache, p.val_fraction)
    looped = spend(out / "heal", flop_params(load_model(converted)), looped_tc)
    tc = static_config(cfg, static, out / "static-heal", 1, p, cache)
    params = flop_params(load_model(static))
    tokens = tc.batch_size * tc.seq_len * tc.gradient_accumulation_steps
    step_flops = tokens * train_flops_per_token(params, 0, 0, tc.seq_len, tc.fixed_point_scale > 0)
    result = {"kind": cfg.baseline_budget, "basis": "achieved", "looped": looped, "step_flops": step_flops}
    if cfg.baseline_budget == "flops":
        steps = max(1, math.floor(looped["flops"] / step_flops))
    else:
        tc.max_minutes = None
        print("    timing 3 training steps of the static model ...", flush=True)
        probe = probe_run(tc, out / ".probe-static", 3)
        result["seconds_per_step"] = probe.seconds_per_step
        steps = plan_steps(looped["seconds"], probe, 0.0, None)
    result["steps"] = steps
    print(f"    looped heal: {looped['steps']} steps, {looped['flops']:.4g} FLOPs, {looped['seconds'] / 60:.2f} min "
          f"-> static heal: {steps} steps of {step_flops:.4g} FLOPs")  # fmt: skip
    write_json(path, result)
    end_stage(t0, out, "static plan")
    return result


def static_heal(cfg: DemoConfig, out: Path, static: Path, cache: Path, p: Plan, bp: dict) -> tuple[Path, dict]:
    """Heal the static model for `bp["steps"]` steps into `static-healed/`; returns it and `SUMMARY`, the budget
    kind and both runs' `{"steps", "flops", "seconds"}`."""
    run, healed, path = out / "static-heal", out / "static-healed", out / SUMMARY
    # At equal FLOPs the steps are exact and a time guard would only break the match; at equal minutes the steps
    # come from a probe's timing, so a guard (1.5 x the looped step time) keeps a bad estimate from running away.
    minutes = None if bp["kind"] == "flops" else max(cfg.budget_minutes * 1.2, 1.5 * bp["looped"]["seconds"] / 60)
    tc = replace(static_config(cfg, static, run, bp["steps"], p, cache), max_minutes=minutes)
    if not healed.exists():
        t0 = start_stage(f"baseline 3/3 heal the static model: same recipe, {bp['steps']} steps (equal training "
                         f"{bp['kind']})")  # fmt: skip
        train(tc)
        export_run(run, healed, overwrite=True)
        end_stage(t0, out, "static heal")
    if path.is_file():
        return healed, json.loads(path.read_text())
    done = spend(run, {}, tc)  # FLOPs from the planned per-step count: a static step's cost does not vary
    done["flops"] = done["steps"] * bp["step_flops"]
    summary = {"kind": bp["kind"], "basis": bp["basis"], "looped": bp["looped"], "static": done}
    write_json(path, summary)
    return healed, summary
