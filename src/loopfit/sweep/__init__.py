"""`loopfit sweep`: a grid of short heals (one resumable run folder each), a time budget split across them, the
chosen metric collected per run, and the ablation figures (metric vs each knob, training curves, Pareto).

Each run is a `TrainConfig` read from the base YAML with the grid's overrides applied exactly as `loopfit train`
parses them, and trained by the trainer's own `train`. With `--budget_minutes`, the steps of each new run are fixed
before it starts (its lr schedule and curriculum depend on them): a short probe of that configuration measures its
setup and validation time and its training throughput in FLOP/s, and the expected FLOPs of a step averaged over the
whole recurrence curriculum turn the run's share of the remaining budget into a number of steps. With
`--budget_kind flops` every run gets the same expected training FLOPs instead (`--budget_flops`, or the amount
that lets every run fit in `--budget_minutes`): the looped and the static model compared at equal compute.
"""

from __future__ import annotations

import inspect
import json
import math
import shutil
import sys
import time
import typing
from dataclasses import MISSING, fields
from pathlib import Path

from loopfit.errors import LoopfitError
from loopfit.io import write_json
from loopfit.sweep.budget import (
    BUDGET_KINDS,
    Probe,
    flops_per_run,
    plan_flops_steps,
    plan_steps,
    probe_run,
    speed_signature,
)
from loopfit.sweep.grid import METRICS, SweepRun, build_runs, parse_grid
from loopfit.sweep.plots import plot_curves, plot_knobs, plot_pareto
from loopfit.sweep.results import GSM8KSpec, check_same_config, collect, final_mean, training_curve
from loopfit.train.config import TrainConfig, field_docs
from loopfit.train.recipe import config_dict, train

__all__ = ["run_sweep", "sweep", "sweep_command"]


def _log(msg: str) -> None:
    print(f"[sweep] {msg}", file=sys.stderr, flush=True)


def _check_inputs(runs: list[SweepRun], metric: str, depth: int | None, budgeted: bool) -> None:
    for r in runs:
        c = r.cfg
        if metric == "val_loss" and not (c.val_fraction > 0 or c.val_data):
            raise LoopfitError(f"run {r.name}: --metric val_loss needs validation data (val_fraction > 0 or val_data)")
        if budgeted and c.stages:
            raise LoopfitError(f"run {r.name}: a budget sets max_steps, which a config with stages ignores")
        if depth is not None and final_mean(c) is None:
            raise LoopfitError(f"run {r.name}: --depth needs a looped student, {c.model_name} is a plain model")


def run_sweep(
    runs: list[SweepRun],
    out: Path,
    metric: str = "val_loss",
    depth: int | None = None,
    budget_minutes: float | None = None,
    max_steps: int | None = None,
    probe_steps: int = 3,
    gsm8k: GSM8KSpec | None = None,
    budget_kind: str = "minutes",
    budget_flops: float | None = None,
) -> list[dict]:
    """Train (or resume, or skip when finished) every run in order; return their `sweep.json` entries.

    The plan of each new run (its steps and the expected FLOPs of a step) is kept in `out/budget.json`, so that an
    interrupted sweep resumed later keeps its FLOPs per run and the entries report every run's training FLOPs.
    """

    deadline = time.monotonic() + budget_minutes * 60 if budget_minutes is not None else None
    probes: dict[str, Probe] = {}
    metric_s = 0.0  # the last measured metric time (GSM8K generation), part of each later run's fixed cost
    entries = []
    depths = {}
    for run in runs:  # before any probe: the final validation's depths are part of a configuration's cost
        depths[run.name] = d = depth if depth is not None else final_mean(run.cfg)
        if d is not None:
            run.cfg.eval_num_steps = sorted({*run.cfg.eval_num_steps, d})
    plan = _read_plan(out, budget_kind)
    if budget_kind == "flops" and plan.get("flops_per_run") is None:
        plan["flops_per_run"] = budget_flops or _equal_flops(runs, out, probes, probe_steps, deadline)
        _log(f"every run trains {plan['flops_per_run']:.4g} FLOPs (expected over its depth schedule)")
    flops = plan.get("flops_per_run")
    for i, run in enumerate(runs):
        cfg, folder, d = run.cfg, Path(run.cfg.out), depths[run.name]
        tag = f"run {i + 1}/{len(runs)} {run.name}"
        if (folder / "done.json").is_file():
            check_same_config(run, folder / "config.yaml")
            _log(f"{tag}: finished before, skipped")
        else:
            if (folder / "config.yaml").is_file():
                stored = check_same_config(run, folder / "config.yaml")
                cfg.max_steps, cfg.save_every = stored["max_steps"], stored["save_every"]
                cfg.max_minutes = stored.get("max_minutes")
                _log(f"{tag}: resuming ({cfg.max_steps} steps)")
            elif flops is not None:
                p = _probe(run, out, probes, probe_steps, tag)
                cfg.max_steps = plan_flops_steps(flops, p, max_steps)
                if deadline is not None and cfg.max_minutes is None:  # a guard against a bad estimate
                    cfg.max_minutes = 1.5 * cfg.max_steps * p.seconds_per_step / 60 + 1
                plan["runs"][run.name] = {"step_flops": p.step_flops, "steps": cfg.max_steps}
                write_json(out / "budget.json", plan)
                _log(f"{tag}: {cfg.max_steps} steps of {p.step_flops:.4g} FLOPs for {flops:.4g} FLOPs")
            elif deadline is not None:
                p = _probe(run, out, probes, probe_steps, tag)
                remaining = sum(not (Path(r.cfg.out) / "done.json").is_file() for r in runs[i:])
                share = max(0.0, deadline - time.monotonic()) / remaining
                overhead = p.setup_s + p.validate_s + metric_s
                cfg.max_steps = plan_steps(share, p, overhead, max_steps)
                plan["runs"][run.name] = {"step_flops": p.step_flops, "steps": cfg.max_steps}
                write_json(out / "budget.json", plan)
                planned = cfg.max_steps * p.seconds_per_step
                if cfg.max_minutes is None:  # a guard against a bad estimate, well above the planned step time
                    cfg.max_minutes = 1.5 * max(share - overhead, planned) / 60
                _log(f"{tag}: {cfg.max_steps} steps for a {share / 60:.1f}-minute share "
                     f"({p.seconds_per_step:.2f} s/step expected over the curriculum, {overhead:.0f} s fixed costs)"
                     + (" - the budget is spent, training 1 step" if share - overhead < planned else ""))  # fmt: skip
            else:
                _log(f"{tag}: {cfg.max_steps} steps")
            if cfg.save_every == 0:  # checkpoints along the way make an interrupted sweep resumable
                cfg.save_every = max(1, cfg.max_steps // 4)
            cfg.resume = folder.exists()
            try:
                cfg.validate()
                train(cfg)
            except LoopfitError as e:
                _log(f"{tag}: failed: {e}")
                entries.append({"name": run.name, "overrides": run.overrides, "folder": str(folder),
                                "status": "failed", "error": str(e), "metric": None})  # fmt: skip
                continue
        t0 = time.perf_counter()
        entries.append(collect(run, metric, d, gsm8k))
        planned_run = plan["runs"].get(run.name)
        entries[-1]["train_flops"] = planned_run["step_flops"] * entries[-1]["steps"] if planned_run else None
        if metric == "gsm8k":
            metric_s = time.perf_counter() - t0
        _log(f"{tag}: {metric} = {entries[-1]['metric']:.4f}")
    return entries


def _read_plan(out: Path, kind: str) -> dict:
    """The sweep folder's budget plan (`budget.json`), or a new one; one of another kind is not reused."""
    path = out / "budget.json"
    if path.is_file():
        plan = json.loads(path.read_text())
        if plan.get("kind") != kind:
            raise LoopfitError(f"{out} was planned with --budget_kind {plan.get('kind')}; rerun it with that kind, "
                               "or use another --out")  # fmt: skip
        return plan
    return {"kind": kind, "flops_per_run": None, "runs": {}}


def _probe(run: SweepRun, out: Path, probes: dict[str, Probe], steps: int, tag: str) -> Probe:
    """The timing probe of the run's configuration (one per distinct `speed_signature`)."""
    sig = speed_signature(run.cfg)
    if sig not in probes:
        _log(f"{tag}: timing probe ({steps} steps)")
        probes[sig] = probe_run(run.cfg, out / f".probe-{run.name}", steps)
    return probes[sig]


def _equal_flops(runs: list[SweepRun], out: Path, probes: dict, steps: int, deadline: float) -> float:
    """The FLOPs per run that let every run still to start fit before `deadline` (each configuration probed)."""
    todo = [r for r in runs if not (Path(r.cfg.out) / "config.yaml").is_file()]
    if not todo:
        return 0.0
    mine = [_probe(r, out, probes, steps, f"run {r.name}") for r in todo]
    overheads = [p.setup_s + p.validate_s for p in mine]
    return flops_per_run(max(0.0, deadline - time.monotonic()), mine, overheads)


def write_outputs(entries: list[dict], runs: list[SweepRun], axes, out: Path, meta: dict) -> None:
    """`sweep.json` and the figures."""

    lower = meta["metric"] == "val_loss"
    done = [e for e in entries if e.get("metric") is not None]
    best = (min if lower else max)(done, key=lambda e: e["metric"]) if done else None
    write_json(out / "sweep.json", {**meta, "best": best["name"] if best else None, "runs": entries})
    plots = plot_knobs(entries, axes, meta["metric"], out)
    curves = {r.name: training_curve(Path(r.cfg.out), r.cfg) for r in runs}
    plots += [plot_curves(curves, out), plot_pareto(entries, meta["metric"], lower, out)]
    _log(f"wrote {out / 'sweep.json'} and {', '.join(p.name for p in plots)}")


SWEEP_FLAGS = {
    "grid": (list[str] | str | None, None),
    "budget_minutes": (float | None, None),
    "budget_kind": (str, "minutes"),
    "budget_flops": (float | None, None),
    "metric": (str, "val_loss"),
    "depth": (int | None, None),
    "budget_max_steps": (int | None, None),
    "probe_steps": (int, 3),
    "gsm8k_data": (str | None, None),
    "gsm8k_limit": (int, 50),
    "gsm8k_max_new_tokens": (int, 256),
}
SWEEP_DOCS = {
    "grid": "one axis of the grid as `KEY=V1,V2,...`, KEY a training flag (`lora.r`, `distillation.ce_scale`, "
    "`model_name`, ...); repeat --grid for more axes: their cartesian product is run.",
    "budget_minutes": "wall-clock budget of the whole sweep: each new run gets an equal share of what is left and "
    "as many steps as fit in it (from a short timing probe). Without it each run trains --max_steps.",
    "budget_kind": "how the budget is split: `minutes` (each run an equal share of the wall-clock left: a faster "
    "configuration trains more FLOPs) or `flops` (each run the same expected training FLOPs, the one FLOP count "
    "integrated over its depth schedule: --budget_flops, or the amount that lets every run fit in --budget_minutes; "
    "compares a looped and a static model at equal compute). sweep.json records the kind and each run's FLOPs.",
    "budget_flops": "with --budget_kind flops: the training FLOPs of each run (instead of --budget_minutes).",
    "metric": "`val_loss` (held-out loss at --depth from the run's final validation; needs --val_fraction or "
    "--val_data) or `gsm8k` (zero-shot accuracy on --gsm8k_data at --depth).",
    "depth": "loop depth R at which the metric is measured (default: the run's final training mean).",
    "budget_max_steps": "with a budget: upper bound on each run's steps (a capped run trains fewer FLOPs than the "
    "others; its entry says how many).",
    "probe_steps": "steps of the timing probe of each distinct configuration (the first one is not timed).",
    "gsm8k_data": "GSM8K records (JSONL with question/answer) for --metric gsm8k.",
    "gsm8k_limit": "questions evaluated per run for --metric gsm8k.",
    "gsm8k_max_new_tokens": "generation budget per question for --metric gsm8k.",
    "out": "sweep folder: one run folder per grid point, sweep.json and the PNG figures.",
    "overwrite": "delete the sweep folder first and start over.",
    "max_steps": "optimizer steps of each run when no budget is given.",
    "resume": "ignored: a sweep always skips finished runs and resumes interrupted ones.",
}


def sweep_command(**kwargs) -> None:
    opts = {k: kwargs.pop(k, default) for k, (_, default) in SWEEP_FLAGS.items()}
    sweep(TrainConfig(**kwargs), **opts)


def sweep(
    base: TrainConfig,
    grid: list[str] | str | None = None,
    budget_minutes: float | None = None,
    budget_kind: str = "minutes",
    budget_flops: float | None = None,
    metric: str = "val_loss",
    depth: int | None = None,
    budget_max_steps: int | None = None,
    probe_steps: int = 3,
    gsm8k_data: str | None = None,
    gsm8k_limit: int = 50,
    gsm8k_max_new_tokens: int = 256,
) -> list[dict]:
    """Validate everything, run the grid under `base.out`, write sweep.json and the figures; return the entries."""

    if base.out is None:
        raise LoopfitError("--out is required (the sweep folder)")
    grid = [grid] if isinstance(grid, str) else grid
    if not grid:
        raise LoopfitError("--grid is required, e.g. --grid distillation.ce_scale=0.1,0.5")
    if metric not in METRICS:
        raise LoopfitError(f"--metric must be one of {', '.join(METRICS)}, got '{metric}'")
    if budget_minutes is not None and budget_minutes <= 0:
        raise LoopfitError(f"--budget_minutes must be > 0, got {budget_minutes}")
    if budget_kind not in BUDGET_KINDS:
        raise LoopfitError(f"--budget_kind must be one of {', '.join(BUDGET_KINDS)}, got '{budget_kind}'")
    if budget_flops is not None and budget_kind != "flops":
        raise LoopfitError("--budget_flops needs --budget_kind flops")
    if budget_kind == "flops" and (budget_flops is None) == (budget_minutes is None):
        raise LoopfitError("--budget_kind flops needs exactly one of --budget_flops (per run) and --budget_minutes")
    if budget_flops is not None and not (budget_flops > 0 and math.isfinite(budget_flops)):
        raise LoopfitError(f"--budget_flops must be a finite number > 0, got {budget_flops}")
    for name, v in (("depth", depth), ("budget_max_steps", budget_max_steps)):
        if v is not None and v < 1:
            raise LoopfitError(f"--{name} must be >= 1, got {v}")
    if probe_steps < 1 or gsm8k_limit < 1 or gsm8k_max_new_tokens < 1:
        raise LoopfitError("--probe_steps, --gsm8k_limit and --gsm8k_max_new_tokens must be >= 1")
    spec = None
    if metric == "gsm8k":
        if gsm8k_data is None or not Path(gsm8k_data).exists():
            raise LoopfitError(f"--metric gsm8k needs --gsm8k_data (GSM8K records), got {gsm8k_data}")
        spec = GSM8KSpec(gsm8k_data, gsm8k_limit, gsm8k_max_new_tokens)
    root = Path(base.out)
    base_dict = config_dict(base)
    axes = parse_grid(grid)
    runs = build_runs(base_dict, grid, root)
    budgeted = budget_minutes is not None or budget_flops is not None
    _check_inputs(runs, metric, depth, budgeted)
    if base.overwrite and root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    _log(f"{len(runs)} runs in {root}" + (f", {budget_minutes:g} minutes in all" if budget_minutes else ""))
    entries = run_sweep(runs, root, metric, depth, budget_minutes, budget_max_steps, probe_steps, spec,
                        budget_kind, budget_flops)  # fmt: skip
    kind = budget_kind if budgeted else "steps"
    plan = root / "budget.json"
    flops = json.loads(plan.read_text()).get("flops_per_run") if kind == "flops" and plan.is_file() else budget_flops
    meta = {"grid": {k: v for k, v in axes}, "metric": metric, "depth": depth, "budget_kind": kind,
            "budget_minutes": budget_minutes, "budget_flops_per_run": flops, "budget_max_steps": budget_max_steps,
            "base_config": base_dict}  # fmt: skip
    write_outputs(entries, runs, axes, root, meta)
    print(BUDGET_TITLES[kind].format(minutes=budget_minutes, flops=flops or 0.0))
    for e in entries:
        m = "failed" if e["metric"] is None else f"{e['metric']:.4f}"
        cost = f"{e['steps']} steps" if "steps" in e else ""
        cost += f", {e['train_flops']:.3g} FLOPs" if e.get("train_flops") else ""
        print(f"{e['name']}: {metric} {m}" + (f"  ({cost})" if cost else ""))
    return entries


BUDGET_TITLES = {
    "steps": "budget: --max_steps per run",
    "minutes": "budget: equal wall-clock shares of {minutes:g} minutes (unequal FLOPs)",
    "flops": "budget: equal training FLOPs, {flops:.4g} per run (expected over each run's depth schedule)",
}


def _build_signature() -> None:
    """`sweep_command` takes every `loopfit train` flag (so `--config base.yaml` reads a training config, as
    `loopfit train --config` does) plus the sweep's own flags, all documented in `--help`."""
    hints = typing.get_type_hints(TrainConfig)
    params = [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=d, annotation=t)
              for k, (t, d) in SWEEP_FLAGS.items()]  # fmt: skip
    for f in fields(TrainConfig):
        default = f.default if f.default is not MISSING else f.default_factory()
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                        annotation=hints[f.name]))  # fmt: skip
    sweep_command.__signature__ = inspect.Signature(params, return_annotation=None)
    sweep_command.__annotations__ = {p.name: p.annotation for p in params} | {"return": None}
    docs = {k: SWEEP_DOCS[k] for k in SWEEP_FLAGS} | field_docs(TrainConfig) | SWEEP_DOCS
    args = "\n".join(f"        {name}: {text}" for name, text in docs.items())
    sweep_command.__doc__ = (
        "Run a grid of short heals (one resumable run folder each) and plot a metric against each knob.\n\n"
        "    `loopfit sweep --config base.yaml --grid distillation.ce_scale=0.1,0.5 --grid lora.r=4,16 "
        "--budget_minutes 60 --out DIR`: base.yaml is a training config (`loopfit train --print_config`); any "
        "training flag may be given too. Rerunning skips finished runs and resumes interrupted ones. Writes "
        "DIR/sweep.json, DIR/METRIC_vs_KNOB.png per knob, DIR/curves.png and DIR/pareto.png.\n\n"
        f"    Args:\n{args}\n"
    )


_build_signature()
