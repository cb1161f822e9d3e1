"""Atomic, resumable checkpoints: trained weights as safetensors, everything else loadable with `weights_only=True`.

A checkpoint folder `checkpoints/step-00000040/` holds
  - `trainable.safetensors`: only the parameters that are trained (LoRA factors, fully trained modules),
  - `state.pt`: optimizer and scheduler states, step, stage, data-loader position, every RNG state
    (Python, NumPy, torch CPU/CUDA and the depth sampler's generator), the number of metrics lines written,
  - `.loopfit.json`: the sha256 and size of both (checked before either is loaded),
and appears under its final name only once complete and fsynced (`loopfit.io.atomic_dir`). Only the last N are
kept. `load_latest` resumes from the newest intact checkpoint, saying on stderr which damaged ones it passed over.
"""

from __future__ import annotations

import random
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from loopfit.errors import LoopfitError
from loopfit.io import atomic_dir, verify_dir

_STEP_DIR = re.compile(r"^step-(\d{8})$")
FILES = ("trainable.safetensors", "state.pt")


def rng_state(depth_generator: torch.Generator) -> dict:
    """Every RNG state that influences training, in types that `torch.load(weights_only=True)` accepts."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
        "depth": depth_generator.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, depth_generator: torch.Generator) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    depth_generator.set_state(state["depth"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint folder (unverified: `load_latest` checks it)."""
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


def step_of(path: str | Path) -> int:
    return int(_STEP_DIR.match(Path(path).name).group(1))


def save_checkpoint(
    run_dir: str | Path, step: int, weights: dict[str, torch.Tensor], state: dict, keep_last: int
) -> Path:
    """Write checkpoint `step` atomically (fsynced, checksummed), then delete all but the newest `keep_last` and any
    newer than `step` (left by a timeline abandoned when an older checkpoint was resumed)."""
    out = Path(run_dir) / "checkpoints" / f"step-{step:08d}"
    # replace_unmarked: a checkpoint folder of the same step inside loopfit's own run is replaced even when damaged.
    with atomic_dir(out, overwrite=True, kind="checkpoint", info={"step": step}, replace_unmarked=True) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp / "trainable.safetensors"))
        torch.save(state, tmp / "state.pt")
    for p in checkpoint_dirs(run_dir):
        if step_of(p) > step:
            shutil.rmtree(p, ignore_errors=True)
    for old in checkpoint_dirs(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return out


def load_checkpoint(path: str | Path, advice: str = "") -> tuple[dict[str, torch.Tensor], dict]:
    """(trainable weights, state) of one checkpoint folder, after checking both files against its checksums.

    Raises LoopfitError naming the damaged or missing file (ending with `advice`).
    """
    path = Path(path)
    verify_dir(path, required=FILES, advice=advice)
    tail = f"; {advice}" if advice else ""
    try:
        weights = load_file(str(path / "trainable.safetensors"))
    except Exception as e:  # safetensors raises its own error type for malformed files
        raise LoopfitError(f"{path / 'trainable.safetensors'} is unreadable ({type(e).__name__}){tail}") from None
    try:
        state = torch.load(path / "state.pt", weights_only=True, map_location="cpu")
    except Exception as e:  # an unpickling error of any kind means the file is not a state we wrote
        raise LoopfitError(f"{path / 'state.pt'} is unreadable ({type(e).__name__}){tail}") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise LoopfitError(f"{path / 'state.pt'} holds no training state{tail}")
    return weights, state


def load_latest(run_dir: str | Path, report: bool = True) -> tuple[Path, dict[str, torch.Tensor], dict] | None:
    """(folder, weights, state) of the newest intact checkpoint of a run, None when it has none.

    Damaged newer ones are passed over with a message on stderr (when `report`); when every checkpoint is damaged,
    LoopfitError names the newest one's damaged file.
    """
    dirs = checkpoint_dirs(run_dir)
    damaged: list[tuple[Path, str]] = []
    for path in reversed(dirs):
        try:
            weights, state = load_checkpoint(path)
        except LoopfitError as e:
            damaged.append((path, str(e)))
            continue
        for bad, why in damaged if report else []:
            print(f"loopfit: checkpoint {bad.name} is damaged ({why}); passing over it", file=sys.stderr)
        if damaged and report:
            print(f"loopfit: resuming from the newest intact checkpoint, {path.name}", file=sys.stderr)
        return path, weights, state
    if damaged:
        raise LoopfitError(
            f"{damaged[0][1]}; no intact checkpoint in {Path(run_dir) / 'checkpoints'} to fall back on: restore the "
            "file, or start over with --overwrite=true"
        )
    return None
