"""Per-run results: the metric (held-out loss at a depth, or GSM8K accuracy), training curves, config checks."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from loopfit.errors import LoopfitError
from loopfit.gsm8k import build_prompt, evaluate_depth, read_problems
from loopfit.io import write_json
from loopfit.loading import load_tokenizer, resolve_model_path
from loopfit.sweep.grid import SWEEP_SET, SweepRun, flatten
from loopfit.train.aliases import normalise_config
from loopfit.train.config import TrainConfig
from loopfit.train.export import merged_model
from loopfit.train.recipe import config_dict
from loopfit.train.schedules import DepthSchedule


# ---------------------------------------------------------------------------------------------- the results
def final_mean(cfg: TrainConfig) -> int | None:
    """The depth the trainer's final validation uses, `DepthSchedule.final_mean` (None for a plain student)."""

    path = Path(resolve_model_path(cfg.model_name)) / "config.json"
    conf = json.loads(path.read_text()) if path.is_file() else {}
    if conf.get("model_type") != "looped":
        return None
    return DepthSchedule.from_config(cfg, conf.get("mean_recurrence", 1)).final_mean


def training_curve(run_dir: Path, cfg: TrainConfig) -> list[dict]:
    """`(step, loss, seconds)` of every logged training step; seconds = cumulative step time."""
    path = run_dir / "metrics.jsonl"
    tokens = cfg.batch_size * cfg.seq_len * cfg.gradient_accumulation_steps
    curve, total = [], 0.0
    for line in path.read_text().splitlines() if path.is_file() else []:
        x = json.loads(line)
        if "loss" in x and x.get("tokens_per_s"):
            total += tokens / x["tokens_per_s"] * cfg.log_every
            curve.append({"step": x["step"], "loss": x["loss"], "seconds": total})
    return curve


def load_trained(run_dir: Path, cfg: TrainConfig):
    """The trained student of a finished run (LoRA merged), in eval mode."""

    return merged_model(run_dir / "final", cfg.model_name).eval()


@dataclass
class GSM8KSpec:
    """How the `gsm8k` metric is measured."""

    data: str
    limit: int
    max_new_tokens: int
    batch_size: int = 8


def gsm8k_metric(run_dir: Path, cfg: TrainConfig, depth: int | None, spec: GSM8KSpec) -> float:
    """Zero-shot GSM8K accuracy (flexible extraction) of a finished run at `depth`; cached in the run folder."""

    key = {"data": str(Path(spec.data).resolve()), "limit": spec.limit, "depth": depth,
           "max_new_tokens": spec.max_new_tokens}  # fmt: skip
    cache = run_dir / "sweep_gsm8k.json"
    if cache.is_file():
        old = json.loads(cache.read_text())
        if old.get("key") == key:
            return old["summary"]["flexible"]["accuracy"]
    problems = read_problems(spec.data, spec.limit)
    tok = load_tokenizer(cfg.model_name)
    prompts = [build_prompt(tok, p.question, [], cfg.chat, cfg.system_prompt) for p in problems]
    model = load_trained(run_dir, cfg)
    summary, _ = evaluate_depth(model, tok, problems, prompts, depth, spec.max_new_tokens, spec.batch_size, cfg.chat)
    write_json(cache, {"key": key, "summary": summary})
    return summary["flexible"]["accuracy"]


def collect(run: SweepRun, metric: str, depth: int | None, spec: GSM8KSpec | None) -> dict:
    """The finished run's entry of `sweep.json`."""
    d = Path(run.cfg.out)
    done = json.loads((d / "done.json").read_text())
    curve = training_curve(d, run.cfg)
    val = done.get("val_loss", {})
    entry = {"name": run.name, "overrides": run.overrides, "folder": str(d), "status": "done", "steps": done["step"],
             "train_seconds": curve[-1]["seconds"] if curve else None, "final_train_loss": curve[-1]["loss"] if curve
             else None, "val_loss": val, "depth": depth}  # fmt: skip
    if metric == "val_loss":
        entry["metric"] = val.get(str(depth))
        if entry["metric"] is None:
            raise LoopfitError(f"run {run.name} has no validation loss at depth {depth} (done.json: {sorted(val)})")
    else:
        entry["metric"] = gsm8k_metric(d, run.cfg, depth, spec)
    return entry


def check_same_config(run: SweepRun, stored_yaml: Path) -> dict:
    """The stored config of an existing run folder; refuse to reuse it if the run would differ."""
    stored = normalise_config(yaml.safe_load(stored_yaml.read_text()) or {})
    a, b = flatten(stored), flatten(config_dict(run.cfg))
    for k in sorted(set(a) | set(b)):
        if k.split(".")[0] not in SWEEP_SET and a.get(k) != b.get(k):
            raise LoopfitError(
                f"run folder {stored_yaml.parent} was trained with {k}={a.get(k)!r}, this sweep asks for "
                f"{b.get(k)!r}; use another --out or --overwrite=true"
            )
    return stored
