"""Shared helpers of the benchmark scripts: matmul peak, timing, peak memory, a printed table and a JSON file."""

from __future__ import annotations

import json
import os
import platform
import resource
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def matmul_peak(dtype: torch.dtype = torch.float32, n: int = 2048, repeats: int = 5, device: str = "cpu") -> float:
    """Measured dense matmul throughput in FLOP/s (best of `repeats`), the denominator of every MFU figure."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        if device != "cpu":
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if device != "cpu":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def peak_rss_gib() -> float:
    """Peak resident memory of this process so far (GiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def machine() -> dict:
    return {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "load_avg": os.getloadavg(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def report(name: str, rows: list[dict], meta: dict | None = None, out: str | None = None) -> Path:
    """Print `rows` as a table and write `{"meta", "rows"}` to benchmarks/results/NAME.json (atomically)."""
    from loopfit.io import write_json

    cols = list(dict.fromkeys(k for r in rows for k in r))
    cells = [[_fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print(" | ".join(c.ljust(w) for c, w in zip(cols, widths)))
    print("-|-".join("-" * w for w in widths))
    for row in cells:
        print(" | ".join(v.ljust(w) for v, w in zip(row, widths)))
    path = Path(out) if out else RESULTS / f"{name}.json"
    write_json(path, {"benchmark": name, "meta": {**machine(), **(meta or {})}, "rows": rows})
    print(f"wrote {path}")
    return path


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def dump(obj) -> str:
    return json.dumps(obj, indent=2)
