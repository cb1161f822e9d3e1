"""Atomic, resumable checkpoints: trained weights as safetensors, everything else loadable with `weights_only=True`.

A checkpoint folder `checkpoints/step-00000040/` holds
  - `trainable.safetensors`: only the parameters that are trained (LoRA factors, fully trained modules),
  - `state.pt`: optimizer and scheduler states, step, stage, data-loader position, every RNG state
    (Python, NumPy, torch CPU/CUDA and the depth sampler's generator),
and appears under its final name only once complete (`loopfit.io.atomic_dir`). Only the last N are kept.
"""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from loopfit.io import atomic_dir

_STEP_DIR = re.compile(r"^step-(\d{8})$")


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
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


def save_checkpoint(
    run_dir: str | Path, step: int, weights: dict[str, torch.Tensor], state: dict, keep_last: int
) -> Path:
    """Write checkpoint `step` atomically, then delete all but the newest `keep_last`."""
    out = Path(run_dir) / "checkpoints" / f"step-{step:08d}"
    with atomic_dir(out, overwrite=True) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp / "trainable.safetensors"))
        torch.save(state, tmp / "state.pt")
    for old in checkpoint_dirs(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return out


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(trainable weights, state) of one checkpoint folder."""
    path = Path(path)
    weights = load_file(str(path / "trainable.safetensors"))
    state = torch.load(path / "state.pt", weights_only=True, map_location="cpu")
    return weights, state
