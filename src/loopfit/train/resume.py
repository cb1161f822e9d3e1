"""The run folder: whether `setup` starts, replaces, resumes or leaves a run, and the files that say so.

Nothing is replaced before every input is checked and loaded. A new run folder is built beside `out` and renamed
into place; `--overwrite=true` sets the old folder aside (`.old-<name>-<pid>`) until the new run's first checkpoint
and puts it back if the new run fails before then. `--resume` compares the flags with the run's config first
(`RESUME_MAY_CHANGE` lists what may differ), records what changed in `resumes.json` and never rewrites
`config.yaml`. Everything up to `create_run_folder` only reads: a refusal leaves every file as it was.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

import yaml

from loopfit.errors import LoopfitError
from loopfit.io import MARKER, check_replaceable, install_dir, restore_old, seal, temp_dir_for, verify_dir, write_json
from loopfit.train.aliases import normalise_config
from loopfit.train.config import TrainConfig
from loopfit.train.distributed import Dist
from loopfit.train.state import Run

DONE = "done.json"
RESUMES = "resumes.json"

# What a resume may change, and why each cannot alter a step already taken or the computation of the next ones
# (beyond the length of the run). Everything else must equal the run's config: `config.yaml` with the changes that
# earlier resumes recorded in `resumes.json` applied. Allowed changes are recorded there too, never in config.yaml.
RESUME_MAY_CHANGE = {
    "out": "the same folder, perhaps spelled differently",
    "resume": "how this process was started",
    "overwrite": "how this process was started",
    "max_steps": "extends or shortens the run (the lr schedule and the curricula follow the new length)",
    "max_minutes": "this process's time budget",
    "save_every": "checkpoint cadence",
    "keep_last": "checkpoints kept",
    "log_every": "logging cadence",
    "progress_bar": "display",
    "tensorboard": "logging sink",
    "wandb": "logging sink",
    "wandb_project": "logging sink",
    "eval_every": "validation cadence (validation never changes the weights)",
    "eval_num_steps": "extra depths of the final validation",
    "nan_policy": "what to do after a non-finite step (recovering a run that stopped on one)",
    "gradient_checkpointing": "recomputation instead of storage: the same gradients",
    "compile": "compiled kernels of the same step: equal to eager within float rounding (tests/test_compile.py)",
    "distillation.chunk_size": "chunking of the fused loss: the same loss",
    # Layout: free as long as the sequences per optimizer step (batch_size x ranks x accumulation) stay the same,
    # which `_compare_with_run` checks separately (a 2-rank run may resume on 1 rank with twice the batch).
    "device": "where the same computation runs",
    "parallel": "how ranks share the same global batch",
    "batch_size": "layout of the same global batch",
    "gradient_accumulation_steps": "layout of the same global batch",
}
_NOT_RECORDED = ("out", "resume", "overwrite")
# Keys naming a file or folder: the same path spelled differently (relative, absolute, via a link) is no change.
_PATH_KEYS = ("model_name", "data", "val_data", "distillation.teacher_model_name", "distillation.teacher_cache")


def config_dict(cfg: TrainConfig) -> dict:
    """The config in plain JSON types: what `config.yaml` holds, the logger records and a resume compares."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def config_yaml(cfg: TrainConfig) -> str:
    """The config as YAML that `loopfit train --config` reads back (resume is always written false)."""
    d = config_dict(cfg)
    d["resume"] = False
    return yaml.safe_dump(d, sort_keys=False)


# ---------------------------------------------------------------------------------------- plan, resume check
def plan(cfg: TrainConfig, out: Path, d: Dist) -> tuple[str, dict]:
    """What setup will do with `out`: ("fresh" | "replace" | "resume" | "finished", changes a resume records).

    Everything here only reads; a refusal leaves every file as it was.
    """
    if cfg.resume and (out / "config.yaml").is_file():
        changed = _compare_with_run(cfg, out, d)
        return ("finished" if (out / DONE).exists() else "resume"), changed
    if cfg.resume is True:
        raise LoopfitError(
            f"no run to resume in {out} (no config.yaml there): start it without --resume, or pass --resume=auto to "
            "resume a run when there is one and start it otherwise"
        )
    if out.exists() or out.is_symlink():
        if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
            check_replaceable(out, need_marker=False)  # an empty folder is used, but never the current one
            return "fresh", {}
        if not cfg.overwrite:
            raise LoopfitError(f"run folder {out} already exists (--resume=true to continue, --overwrite=true to "
                               "replace)")  # fmt: skip
        check_replaceable(out)
        return "replace", {}
    return "fresh", {}


def _flat(d: dict, prefix: str = "") -> dict:
    """`{"lora": {"r": 4}}` -> `{"lora.r": 4}`."""
    flat = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            flat.update(_flat(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def _same(key: str, a, b) -> bool:
    if a == b:
        return True
    if key in _PATH_KEYS and isinstance(a, str) and isinstance(b, str):
        with contextlib.suppress(OSError):
            return Path(a).exists() and Path(b).exists() and Path(a).samefile(b)
    return False


def _short(v) -> str:
    text = json.dumps(v)
    return text if len(text) <= 40 else text[:37] + "..."


def run_config(out: Path) -> tuple[dict, list]:
    """(the run's effective config, flat: `config.yaml` with every recorded resume change applied; the resumes)."""
    path = out / "config.yaml"
    try:
        saved = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise LoopfitError(f"{path} is unreadable ({type(e).__name__}); the run folder is damaged") from None
    if not isinstance(saved, dict):
        raise LoopfitError(f"{path} is not a training config; the run folder is damaged")
    resumes = []
    if (out / RESUMES).is_file():
        try:
            resumes = json.loads((out / RESUMES).read_text())["resumes"]
            changes = [dict(r["changed"]) for r in resumes]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise LoopfitError(
                f"{out / RESUMES} is unreadable ({type(e).__name__}); the run folder is damaged"
            ) from None
    else:
        changes = []
    saved = normalise_config(saved)  # a run saved before a rename resumes under today's names
    effective = _flat(config_dict(TrainConfig())) | _flat(saved)  # fields added since the run started: defaults
    for c in changes:
        effective.update({k: v[1] for k, v in c.items()})
    return effective, resumes


def _compare_with_run(cfg: TrainConfig, out: Path, d: Dist) -> dict:
    """Refuse (LoopfitError, one line listing the keys) flags that differ from the run's config in anything but
    `RESUME_MAY_CHANGE`, or a different number of sequences per optimizer step; return the allowed changes as
    `{key: [run's value, new value]}`."""
    advice = "the run folder is damaged or was edited: restore it, or start a new run in another --out"
    marker = verify_dir(out, advice=advice)  # config.yaml and data_manifest.json are as the run wrote them
    if marker.get("kind") != "train-run":
        raise LoopfitError(f"{out} is not a training run ({MARKER} says {marker.get('kind')!r}): choose its run folder")
    effective, _ = run_config(out)
    new = _flat(config_dict(cfg))
    diffs = {k: (effective.get(k), new.get(k)) for k in sorted(set(new) | set(effective))}
    diffs = {k: ab for k, ab in diffs.items() if not _same(k, *ab)}
    refused = [f"{k} ({_short(a)} -> {_short(b)})" for k, (a, b) in diffs.items() if k not in RESUME_MAY_CHANGE]
    sequences = cfg.batch_size * d.world_size * cfg.gradient_accumulation_steps
    if marker.get("sequences_per_step") not in (None, sequences):
        refused.append(f"sequences per step, batch_size x ranks x gradient_accumulation_steps "
                       f"({marker['sequences_per_step']} -> {sequences})")  # fmt: skip
    if refused:
        raise LoopfitError(
            f"--resume: these settings differ from run {out}'s and would change its computation: "
            f"{', '.join(refused)}; resume with the run's own (--config {out / 'config.yaml'} --resume=true, plus "
            "only flags that extend or observe it) or start a new run in another --out"
        )
    return {k: [a, b] for k, (a, b) in diffs.items() if k not in _NOT_RECORDED}


def check_same_data(out: Path, manifest: dict) -> None:
    """The data the flags name must still be the data the run started on (same files, same contents)."""
    path = out / "data_manifest.json"
    try:
        saved = json.loads(path.read_text()).get("data_hash")
    except (OSError, ValueError, AttributeError) as e:
        raise LoopfitError(f"{path} is unreadable ({type(e).__name__}); the run folder is damaged") from None
    if saved != manifest.get("data_hash"):
        raise LoopfitError(
            f"--resume: the training data changed since run {out} started (data hash {saved} -> "
            f"{manifest.get('data_hash')}): restore the data it started on, or start a new run in another --out"
        )


def record_resume(out: Path, run: Run, checkpoint: str | None, changed: dict) -> None:
    """Append this resume (step, checkpoint, ranks, allowed changes) to `resumes.json`; config.yaml stays."""
    _, resumes = run_config(out)
    entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "step": run.step, "checkpoint": checkpoint,
             "world_size": run.d.world_size, "changed": changed}  # fmt: skip
    write_json(out / RESUMES, {"resumes": [*resumes, entry]})
    if changed:
        print("resuming with " + ", ".join(f"{k} {_short(a)} -> {_short(b)}" for k, (a, b) in changed.items())
              + f" (recorded in {out / RESUMES})", file=sys.stderr)  # fmt: skip


# --------------------------------------------------------------------- new run folder, the old one set aside
def create_run_folder(out: Path, cfg: TrainConfig, data_manifest: dict, sequences: int, keep_old: bool) -> Path | None:
    """Build the new run folder (marker, config.yaml, data_manifest.json) beside `out` and rename it into place.
    With `keep_old`, the folder it replaces is returned, set aside, instead of deleted."""
    if not keep_old and out.exists() and any(out.iterdir()):  # appeared since `plan` looked
        raise LoopfitError(f"run folder {out} appeared while this run was starting; choose another --out")
    tmp = temp_dir_for(out)
    try:
        (tmp / "config.yaml").write_text(config_yaml(cfg))
        (tmp / "data_manifest.json").write_text(json.dumps(data_manifest, indent=2) + "\n")
        seal(tmp, "train-run", sequences_per_step=sequences)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return install_dir(tmp, out, keep_old=keep_old)


def undo_replacement(run: Run) -> None:
    """The new run failed before its first checkpoint: put the folder it replaced back."""
    if run.aside is not None and run.d.is_main:
        restore_old(run.aside, run.out)
        print(f"loopfit: the new run stopped before its first checkpoint; {run.out} is back as it was",
              file=sys.stderr)  # fmt: skip
        run.aside = None
