"""`loopfit sweep`: a grid of short heals (one resumable run folder each), a time budget split across them, the
chosen metric collected per run, and the ablation figures (metric vs each knob, training curves, Pareto).

Each run is a `TrainConfig` read from the base YAML with the grid's overrides applied exactly as `loopfit train`
parses them, and trained by the trainer's own `train`. With `--budget_minutes`, the steps of each new run are fixed
before it starts (its lr schedule and curriculum depend on them): a short probe of that configuration measures its
setup and validation time and its training throughput in FLOP/s, and the expected FLOPs of a step averaged over the
whole recurrence curriculum turn the run's share of the remaining budget into a number of steps.
"""

from __future__ import annotations

import inspect
import shutil
import sys
import time
import typing
from dataclasses import MISSING, fields
from pathlib import Path

from loopfit.errors import LoopfitError
from loopfit.io import write_json
from loopfit.sweep.budget import Probe, plan_steps, probe_run, speed_signature
from loopfit.sweep.grid import METRICS, SweepRun, build_runs, parse_grid
from loopfit.sweep.plots import plot_curves, plot_knobs, plot_pareto
from loopfit.sweep.results import GSM8KSpec, check_same_config, collect, final_mean, training_curve
from loopfit.train.config import TrainConfig, field_docs
from loopfit.train.recipe import config_dict, train

__all__ = ["run_sweep", "sweep", "sweep_command"]


def _log(msg: str) -> None:
    print(f"[sweep] {msg}", file=sys.stderr, flush=True)


def _check_inputs(runs: list[SweepRun], metric: str, depth: int | None, budget_minutes: float | None) -> None:
    for r in runs:
        c = r.cfg
        if metric == "val_loss" and not (c.val_fraction > 0 or c.val_data):
            raise LoopfitError(f"run {r.name}: --metric val_loss needs validation data (val_fraction > 0 or val_data)")
        if budget_minutes is not None and c.stages:
            raise LoopfitError(f"run {r.name}: --budget_minutes sets max_steps, which a config with stages ignores")
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
) -> list[dict]:
    """Train (or resume, or skip when finished) every run in order; return their `sweep.json` entries."""

    deadline = time.monotonic() + budget_minutes * 60 if budget_minutes is not None else None
    probes: dict[str, Probe] = {}
    metric_s = 0.0  # the last measured metric time (GSM8K generation), part of each later run's fixed cost
    entries = []
    for i, run in enumerate(runs):
        cfg, folder = run.cfg, Path(run.cfg.out)
        d = depth if depth is not None else final_mean(cfg)
        if d is not None:
            cfg.eval_num_steps = sorted({*cfg.eval_num_steps, d})
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
            elif deadline is not None:
                sig = speed_signature(cfg)
                if sig not in probes:
                    _log(f"{tag}: timing probe ({probe_steps} steps)")
                    probes[sig] = probe_run(cfg, out / f".probe-{run.name}", probe_steps)
                p = probes[sig]
                remaining = sum(not (Path(r.cfg.out) / "done.json").is_file() for r in runs[i:])
                share = max(0.0, deadline - time.monotonic()) / remaining
                overhead = p.setup_s + p.validate_s + metric_s
                cfg.max_steps = plan_steps(share, p, overhead, max_steps)
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
        if metric == "gsm8k":
            metric_s = time.perf_counter() - t0
        _log(f"{tag}: {metric} = {entries[-1]['metric']:.4f}")
    return entries


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
    "metric": "`val_loss` (held-out loss at --depth from the run's final validation; needs --val_fraction or "
    "--val_data) or `gsm8k` (zero-shot accuracy on --gsm8k_data at --depth).",
    "depth": "loop depth R at which the metric is measured (default: the run's final training mean).",
    "budget_max_steps": "with --budget_minutes: upper bound on each run's steps.",
    "probe_steps": "steps of the timing probe of each distinct configuration (the first one is not timed).",
    "gsm8k_data": "GSM8K records (JSONL with question/answer) for --metric gsm8k.",
    "gsm8k_limit": "questions evaluated per run for --metric gsm8k.",
    "gsm8k_max_new_tokens": "generation budget per question for --metric gsm8k.",
    "out": "sweep folder: one run folder per grid point, sweep.json and the PNG figures.",
    "overwrite": "delete the sweep folder first and start over.",
    "max_steps": "optimizer steps of each run when no --budget_minutes is given.",
    "resume": "ignored: a sweep always skips finished runs and resumes interrupted ones.",
}


def sweep_command(**kwargs) -> None:
    opts = {k: kwargs.pop(k, default) for k, (_, default) in SWEEP_FLAGS.items()}
    sweep(TrainConfig(**kwargs), **opts)


def sweep(
    base: TrainConfig,
    grid: list[str] | str | None = None,
    budget_minutes: float | None = None,
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
    _check_inputs(runs, metric, depth, budget_minutes)
    if base.overwrite and root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    _log(f"{len(runs)} runs in {root}" + (f", {budget_minutes:g} minutes in all" if budget_minutes else ""))
    entries = run_sweep(runs, root, metric, depth, budget_minutes, budget_max_steps, probe_steps, spec)
    meta = {"grid": {k: v for k, v in axes}, "metric": metric, "depth": depth, "budget_minutes": budget_minutes,
            "budget_max_steps": budget_max_steps, "base_config": base_dict}  # fmt: skip
    write_outputs(entries, runs, axes, root, meta)
    for e in entries:
        m = "failed" if e["metric"] is None else f"{e['metric']:.4f}"
        print(f"{e['name']}: {metric} {m}" + (f"  ({e['steps']} steps)" if "steps" in e else ""))
    return entries


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
