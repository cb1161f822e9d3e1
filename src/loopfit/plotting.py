"""Figures on machines without a display, written like every other output: the one place that sets matplotlib up.

Every figure loopfit draws (layer analysis, depth sweeps, GSM8K accuracy, FLOPs, the demo's report, the sweep's
plots, the benchmarks' figures) gets pyplot from `pyplot()` and writes its PNG with `save_png`.
"""

from __future__ import annotations

import os

from loopfit.io import atomic_file


def pyplot():
    """`matplotlib.pyplot` on the non-interactive Agg backend.

    Imported on first use, not with loopfit: matplotlib takes ~0.5 s to import and only figures need it. Agg because
    training and evaluation machines have no display (an interactive backend fails there or opens windows).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: str | os.PathLike, dpi: int = 100, rect: tuple | None = None) -> None:
    """Lay `fig` out tightly, write it to `path` as a PNG and close it.

    Args:
        fig: a `matplotlib.figure.Figure`.
        path: the PNG's path; written through `loopfit.io.atomic_file` (a temporary name, fsynced, renamed), so a
            reader never sees half a file and an existing figure stays until the new one is complete.
        dpi: dots per inch.
        rect: `(left, bottom, right, top)` in figure coordinates that `tight_layout` fits the axes into (room for a
            legend or caption drawn outside them); None: the whole figure.

    Raises `OSError` when the folder cannot be written.
    """
    fig.tight_layout(rect=rect)
    try:
        with atomic_file(path, "wb") as f:
            fig.savefig(f, format="png", dpi=dpi)
    finally:
        pyplot().close(fig)
