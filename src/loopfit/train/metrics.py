"""Per-step metrics to `metrics.jsonl` (one flushed line a step), TensorBoard, optionally wandb; MFU helpers."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch


class MetricsLogger:
    """Writes metrics on the main rank only. On resume, lines after the resumed step are dropped first, so the
    file reads as if the run had never been interrupted."""

    def __init__(
        self,
        run_dir: Path,
        enabled: bool,
        tensorboard: bool,
        wandb_project: str | None,
        resume_step: int | None,
        config: dict | None = None,
    ):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self._tb = self._wandb = None
        if not enabled:
            return
        if resume_step is not None and self.path.exists():
            kept = [ln for ln in self.path.read_text().splitlines() if ln.strip() and _step_of(ln) <= resume_step]
            tmp = self.path.with_name(".metrics.jsonl.tmp")
            tmp.write_text("".join(ln + "\n" for ln in kept))
            os.replace(tmp, self.path)
        elif self.path.exists():
            self.path.unlink()
        self._f = open(self.path, "a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step)
        if wandb_project:
            import wandb

            self._wandb = wandb.init(project=wandb_project, dir=str(run_dir), config=config, resume="allow")

    def log(self, metrics: dict) -> None:
        if not self.enabled:
            return
        self._f.write(json.dumps(metrics) + "\n")
        self._f.flush()
        step = metrics["step"]
        for k, v in metrics.items():
            if k != "step" and isinstance(v, (int, float)):
                if self._tb is not None:
                    self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in metrics.items() if k != "step"}, step=step)

    def close(self) -> None:
        if not self.enabled:
            return
        self._f.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return 1 << 62  # a torn last line is dropped


_PEAKS: dict[tuple[str, torch.dtype], float] = {}


def measure_matmul_peak(device: torch.device, dtype: torch.dtype, seconds: float = 1.0) -> float:
    """Achieved FLOP/s of a square matmul on `device`, measured once per process for about `seconds` (the MFU
    denominator)."""
    key = (str(device), dtype)
    if key not in _PEAKS:
        _PEAKS[key] = _measure(device, dtype, seconds)
    return _PEAKS[key]


def _measure(device: torch.device, dtype: torch.dtype, seconds: float) -> float:
    # Large enough on a GPU that the matmul, not the launch, is timed; cache-friendly on a CPU.
    n = 1024 if device.type == "cpu" else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up
    _sync(device)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
        if device.type == "cuda" and count % 16:
            continue
        _sync(device)
    _sync(device)
    return 2 * n**3 * count / (time.perf_counter() - start)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
