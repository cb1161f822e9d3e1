"""The sweep's figures: metric vs each knob, training curves of all runs, metric vs training time (Pareto)."""

from __future__ import annotations

import re
from pathlib import Path

from loopfit.plotting import pyplot, save_png


def _number(v: str) -> float | None:
    try:
        return float(v)
    except ValueError:
        return None


def plot_knobs(entries: list[dict], axes: list[tuple[str, list[str]]], metric: str, out: Path) -> list[Path]:
    """One PNG per knob: the metric against the knob's values, one line per setting of the other knobs."""
    plt = pyplot()
    ok = [e for e in entries if e.get("metric") is not None]
    paths = []
    for key, values in axes:
        nums = [_number(v) for v in values]
        numeric = all(x is not None for x in nums)
        xpos = {v: (x if numeric else i) for i, (v, x) in enumerate(zip(values, nums))}
        fig, ax = plt.subplots(figsize=(6, 4))
        others = sorted({tuple((k, v) for k, v in e["overrides"].items() if k != key) for e in ok})
        for other in others:
            pts = sorted(
                (xpos[e["overrides"][key]], e["metric"])
                for e in ok
                if tuple((k, v) for k, v in e["overrides"].items() if k != key) == other
            )
            label = ", ".join(f"{k}={v}" for k, v in other) or None
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=label)
        if numeric and min(nums) > 0 and max(nums) / min(nums) >= 10:
            ax.set_xscale("log", base=2)
        ax.set_xticks([xpos[v] for v in values], values)
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
        ax.set_title(f"{metric} vs {key}")
        if any(others):
            ax.legend(fontsize=7)
        path = out / f"{metric}_vs_{re.sub(r'[^A-Za-z0-9._-]+', '_', key)}.png"
        save_png(fig, path, dpi=110)
        paths.append(path)
    return paths


def plot_curves(curves: dict[str, list[dict]], out: Path) -> Path:
    """Training loss of every run against step and against cumulative step time."""
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for name, curve in curves.items():
        if curve:
            a.plot([c["step"] for c in curve], [c["loss"] for c in curve], label=name, lw=1)
            b.plot([c["seconds"] / 60 for c in curve], [c["loss"] for c in curve], label=name, lw=1)
    a.set_xlabel("step")
    b.set_xlabel("training time (min, step time only)")
    a.set_ylabel("training loss")
    a.set_title("training curves")
    b.legend(fontsize=6)
    path = out / "curves.png"
    save_png(fig, path, dpi=110)
    return path


def pareto_front(points: list[tuple[float, float]], lower_is_better: bool) -> list[int]:
    """Indices of the points no other point beats on both time (lower) and metric, in order of time."""
    sign = 1 if lower_is_better else -1
    order = sorted(range(len(points)), key=lambda i: (points[i][0], sign * points[i][1]))
    front, best = [], float("inf")
    for i in order:
        if sign * points[i][1] < best:
            front.append(i)
            best = sign * points[i][1]
    return front


def plot_pareto(entries: list[dict], metric: str, lower_is_better: bool, out: Path) -> Path:
    """The metric of every run against its training time, the Pareto front drawn through the undominated runs."""
    plt = pyplot()
    ok = [e for e in entries if e.get("metric") is not None and e.get("train_seconds") is not None]
    pts = [(e["train_seconds"] / 60, e["metric"]) for e in ok]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o", color="C0")
    for e, (x, y) in zip(ok, pts):
        ax.annotate(e["name"], (x, y), textcoords="offset points", xytext=(3, 3), fontsize=6)
    front = pareto_front(pts, lower_is_better)
    ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], "-", color="C3", label="Pareto front")
    ax.set_xlabel("training time (min, step time only)")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} vs training time")
    ax.legend()
    path = out / "pareto.png"
    save_png(fig, path, dpi=110)
    return path
