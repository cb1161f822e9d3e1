"""The grid: `--grid key=v1,v2` axes, each point a `TrainConfig` parsed exactly as `loopfit train` parses flags."""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field, fields
from pathlib import Path

from loopfit.errors import LoopfitError
from loopfit.train.aliases import normalise_train_args
from loopfit.train.config import TrainConfig

METRICS = ("val_loss", "gsm8k")
# Keys that leave the cost of a step unchanged: runs differing only in these share one timing probe.
SPEED_NEUTRAL = re.compile(
    r"^(out|seed|resume|overwrite|max_steps|max_minutes|save_every|keep_last|progress_bar|tensorboard|wandb.*|grad_clip|"
    r"distillation\.(temperature|ce_scale|kd_scale)|lora\.lora_alpha|optim_config\.(lr|weight_decay|betas|eps)|"
    r"lr_schedule\..*)$"
)
# Keys the sweep sets itself; a resumed run folder may differ from the new config only in these.
SWEEP_SET = {"out", "max_steps", "max_minutes", "save_every", "eval_num_steps", "resume", "overwrite", "progress_bar"}


@dataclass
class SweepRun:
    """One point of the grid."""

    name: str
    overrides: dict[str, str]
    cfg: TrainConfig
    result: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------- the grid
def split_values(text: str) -> list[str]:
    """`'0.1,0.3'` -> `['0.1', '0.3']`; commas inside brackets stay (`'[q_proj,v_proj],all-linear'`)."""
    values, depth, cur = [], 0, ""
    for ch in text:
        depth += (ch in "[{(") - (ch in "]})")
        if ch == "," and depth == 0:
            values.append(cur.strip())
            cur = ""
        else:
            cur += ch
    values.append(cur.strip())
    if any(v == "" for v in values):
        raise LoopfitError(f"--grid value list '{text}' has an empty entry")
    return values


def parse_grid(grid: list[str]) -> list[tuple[str, list[str]]]:
    """`['distillation.ce_scale=0.1,0.5', 'lora.r=4,16']` -> `[(key, values), ...]` (keys unique)."""
    out: list[tuple[str, list[str]]] = []
    for g in grid:
        key, eq, vals = g.partition("=")
        key = key.strip().removeprefix("--")
        if not eq or not key:
            raise LoopfitError(f"--grid expects KEY=V1,V2,..., got '{g}'")
        if key in {k for k, _ in out}:
            raise LoopfitError(f"--grid key '{key}' is given twice")
        if key in SWEEP_SET:
            raise LoopfitError(f"--grid cannot vary '{key}': the sweep sets it for every run")
        out.append((key, split_values(vals)))
    return out


def _parser():
    from jsonargparse import ArgumentParser

    p = ArgumentParser(exit_on_error=False)
    p.add_argument("--config", action="config")
    p.add_class_arguments(TrainConfig)
    return p


def load_config(base: dict, overrides: dict[str, str]) -> TrainConfig:
    """`base` (a `TrainConfig` as a dict) with `--key=value` overrides, parsed and typed as `loopfit train` does."""
    import yaml

    p = _parser()
    args = ["--config", yaml.safe_dump(base)] + [f"--{k}={v}" for k, v in overrides.items()]
    try:
        args = args[:2] + normalise_train_args(args[2:], note=False)  # a grid over the old `distillation.alpha`
        ns = p.instantiate(p.parse_args(args))
    except Exception as e:  # argparse reports unknown keys and bad values as one message
        msg = " ".join(str(e).split())
        raise LoopfitError(f"bad --grid override ({' '.join(args[2:])}): {msg}") from None
    return TrainConfig(**{f.name: getattr(ns, f.name) for f in fields(TrainConfig)})


def run_name(overrides: dict[str, str]) -> str:
    """Folder name of a grid point, e.g. `distillation.ce_scale-0.1_lora.r-16`."""
    parts = [f"{k}-{re.sub(r'[^A-Za-z0-9.+-]+', '_', v.strip('/')).strip('_')}" for k, v in overrides.items()]
    return "_".join(parts) or "base"


def build_runs(base: dict, grid: list[str], out: Path) -> list[SweepRun]:
    """Every grid point of `base` (a `TrainConfig` as a dict) as a validated config with its own folder in `out`."""
    axes = parse_grid(grid)
    runs, names = [], set()
    for combo in itertools.product(*[vals for _, vals in axes]):
        overrides = {k: v for (k, _), v in zip(axes, combo)}
        name = run_name(overrides)
        if name in names:
            raise LoopfitError(f"two grid points map to the run folder '{name}'; use distinct values")
        names.add(name)
        cfg = load_config(base, overrides)
        cfg.out = str(out / name)
        cfg.resume = cfg.overwrite = False
        try:
            cfg.validate()
        except LoopfitError as e:
            raise LoopfitError(f"run {name}: {e}") from None
        runs.append(SweepRun(name, overrides, cfg))
    return runs


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "kind_params":
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
