"""Per-step metrics to `metrics.jsonl` (one flushed line a step), TensorBoard, optionally wandb; MFU helpers."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from loopfit.io import atomic_file


class MetricsLogger:
    """Writes metrics on the main rank only, one flushed line per `log` call.

    On resume the file is cut back to what the resumed checkpoint had seen: its first `keep_lines` lines (the count
    stored in the checkpoint), or, for a checkpoint without that count, the lines of steps <= `resume_step`. Lines
    that the interrupted process logged after its checkpoint (steps, and a final validation logged before a kill
    at the very end) are dropped, so after any kill and resume the file holds exactly one line per step and per
    validation, as if the run had never been interrupted. `lines` counts the lines in the file; `sync` makes them
    durable (called before each checkpoint records that count).
    """

    def __init__(
        self,
        run_dir: Path,
        enabled: bool,
        tensorboard: bool,
        wandb_project: str | None,
        resume_step: int | None,
        config: dict | None = None,
        keep_lines: int | None = None,
    ):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.lines = 0
        self._tb = self._wandb = None
        if not enabled:
            return
        if resume_step is not None and self.path.exists():
            kept = [ln for ln in self.path.read_text().splitlines() if ln.strip() and _step_of(ln) <= resume_step]
            if keep_lines is not None:
                kept = kept[:keep_lines]

            with atomic_file(self.path) as f:
                f.write("".join(ln + "\n" for ln in kept))
            self.lines = len(kept)
        elif self.path.exists():
            self.path.unlink()
        self._f = open(self.path, "a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # Events of steps after the checkpoint go; the checkpoint's own step was logged before it was saved.
            purge = resume_step + 1 if resume_step is not None else None
            self._tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge)
        if wandb_project:
            import wandb

            self._wandb = wandb.init(project=wandb_project, dir=str(run_dir), config=config, resume="allow")

    def sync(self) -> None:
        """Force the lines written so far to disk."""
        if self.enabled:
            self._f.flush()
            os.fsync(self._f.fileno())

    def log(self, metrics: dict) -> None:
        if not self.enabled:
            return
        self._f.write(json.dumps(metrics) + "\n")
        self._f.flush()
        self.lines += 1
        step = metrics["step"]
        for k, v in metrics.items():
            if k != "step" and isinstance(v, (int, float)):
                if self._tb is not None:
                    self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in metrics.items() if k != "step"}, step=step)

    def close(self) -> None:
        """Close every sink; a second call does nothing."""
        if not self.enabled or self._f.closed:
            return
        self._f.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError, TypeError):
        return 1 << 62  # a torn last line is dropped


_PEAKS: dict[tuple[str, torch.dtype], float] = {}


def measure_matmul_peak(device: torch.device, dtype: torch.dtype, seconds: float = 1.0) -> float:
    """The best achieved FLOP/s of square matmuls on `device` in `dtype`, measured once per process for about
    `seconds` (the MFU denominator): n = 8192 on a GPU; on a CPU the best of n = 1024, 1536 and 2048, each given a
    third of the time, a size skipped where one product of it would take longer than that (emulated bf16).

    Why several sizes on a CPU: oneDNN's kernel choice depends on the shape. On a 2-core Xeon with AMX, bf16 ran at
    1347 GFLOP/s at n = 1024 and 2232 at n = 2048 (and 2820 at the looped model's 4096 x 576 x 1536), so the n = 1024
    peak alone overstated the MFU of that machine about 1.7x; float32 was flat (349 / 358 GFLOP/s)."""
    key = (str(device), dtype)
    if key not in _PEAKS:
        _PEAKS[key] = _measure(device, dtype, seconds)
    return _PEAKS[key]


def slow_bf16_warning(device: torch.device) -> str | None:
    """A one-line warning when bf16 matmuls on `device` run slower than float32 ones, else None.

    CPUs without native bf16 (no AVX512-BF16 or AMX: `torch.backends.cpu.get_cpu_capability()` says AVX2, for
    instance) emulate it: on such a 2-core AVX2 machine a bf16 product ran at 4.9 GFLOP/s against 38 in float32, so
    `--precision bf16` would train about 8x slower. Both peaks are measured (once per process, ~1 s each).
    """
    if device.type != "cpu":
        return None
    bf16, fp32 = measure_matmul_peak(device, torch.bfloat16), measure_matmul_peak(device, torch.float32)
    if bf16 >= fp32:
        return None
    return (
        f"loopfit: warning: bf16 matmuls on this CPU ({torch.backends.cpu.get_cpu_capability()}) run at "
        f"{bf16 / 1e9:.1f} GFLOP/s against {fp32 / 1e9:.1f} in float32 (no native bf16): --precision fp32 trains "
        f"about {fp32 / bf16:.1f}x faster here"
    )


def _measure(device: torch.device, dtype: torch.dtype, seconds: float) -> float:
    # Large enough on a GPU that the matmul, not the launch, is timed.
    if device.type != "cpu":
        return _rate(device, dtype, 8192, seconds)
    share = seconds / len(_CPU_SIZES)
    best = 0.0
    for n in _CPU_SIZES:
        if best and 2 * n**3 / best > share:
            break  # one product of this size would not fit its share (sizes ascend, so neither would the next)
        best = max(best, _rate(device, dtype, n, share))
    return best


_CPU_SIZES = (1024, 1536, 2048)


def _rate(device: torch.device, dtype: torch.dtype, n: int, seconds: float) -> float:
    """FLOP/s of repeated n x n x n products on `device` for about `seconds` (at least one timed product)."""
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
