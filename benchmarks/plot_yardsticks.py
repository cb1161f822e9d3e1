"""Plot issue 20's heals on both yardsticks against the depth R, from `benchmarks.heal_yardsticks` result files.

    python -m benchmarks.plot_yardsticks                       # the curated set below -> docs/img/heal-yardsticks.png
    python -m benchmarks.plot_yardsticks --series "mine=benchmarks/results/heal_yardsticks_x.json" --out x.png

Two panels, in domain (held-out tiny-shakespeare) and out of domain (held-out GSM8K answers), loss (nats per token)
against R on a log axis. A looped model is a line through the depths its file has; a static model (scored at R = 1
only, it has no loop) is a horizontal dotted line; the teacher (the floor in domain) and the pruned start are
dashed. Straight segments join the depths a file has: a file scored at R = 1, 6, 24 says nothing about R = 2-4.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from loopfit.plotting import pyplot, save_png

RESULTS = Path(__file__).parent / "results"
# LABEL=FILE or LABEL=FILE#MODEL (the row label inside the file, where it holds several models).
DEFAULT_SERIES = [
    "today's recipe at T = 2 (rank 16)=heal_yardsticks_s0.json#today-s0",
    "cheap loop step, mean 4 (configs/heal-smol.yaml), 451 steps, seed 0=heal_yardsticks_k1m4_s0.json",
    "the same at the static model's minutes (396 steps), mean 4, seed 0=heal_yardsticks_k1m4_396_s0.json",
    "the same, 396 steps, mean 4, seed 1=heal_yardsticks_k1m4_396_s1.json",
    "static model, 573 steps, bf16=heal_yardsticks_static_573_bf16_s0.json",
    "loss at every depth, k = 3=heal_yardsticks_every3_s0.json",
    "mix heal (configs/heal-smol-mix.yaml), 396 steps, mean 4, seed 0=heal_yardsticks_mix_k1m4_396_s0.json",
    "mix heal, 396 steps, mean 4, seed 1=heal_yardsticks_mix_k1m4_396_s1.json",
    "the loop at 1.5x the steps (453), bf16=heal_yardsticks_loop_15x_bf16_s0.json",
    "static model at 1.5x the steps (860), bf16=heal_yardsticks_static_15x_bf16_s0.json",
    "compiled, equal minutes, AMX Xeon: loop, 800 steps, mean 4, seed 0=heal_yardsticks_xeon_compiled_s0.json#loop",
    "the same, seed 1=heal_yardsticks_xeon_compiled_s1.json#loop",
    "the same, seed 2=heal_yardsticks_xeon_compiled_s2.json#loop",
    "its static model, 957 steps, seed 0=heal_yardsticks_xeon_compiled_s0.json#static",
    "its static model, seed 1=heal_yardsticks_xeon_compiled_s1.json#static",
    "its static model, seed 2=heal_yardsticks_xeon_compiled_s2.json#static",
]
# Scored by `benchmarks.heal_yardsticks` on the same tokens (docs/training.md, "Both yardsticks at every depth").
FLOORS = {"shakespeare": {"teacher": 3.760, "pruned start": 7.737}, "gsm8k": {"teacher": 1.376, "pruned start": 5.748}}
TITLES = {"shakespeare": "in domain: last 10% of tiny-shakespeare", "gsm8k": "out of domain: 64 held-out GSM8K answers"}


def load_series(spec: str, results: Path) -> tuple[str, dict[str, dict[int, float]], bool]:
    """`LABEL=FILE[#MODEL]` -> (label, {yardstick: {R: loss}}, looped). FILE is read as given, else under `results`.

    `looped` is the rows' own `looped` field (written by `benchmarks.heal_yardsticks` since 2026-12-04); files from
    before it say nothing, and a model scored at R = 1 alone under a label naming it static is taken as static.

    Raises SystemExit (one line) for a malformed spec, a missing file or a model the file does not hold."""
    if "=" not in spec:
        raise SystemExit(f"loopfit: error: --series {spec!r} is not LABEL=FILE[#MODEL]")
    label, target = spec.rsplit("=", 1)
    name, _, model = target.partition("#")
    path = Path(name) if Path(name).exists() else results / name
    if not path.exists():
        raise SystemExit(f"loopfit: error: no result file {name} (looked in . and {results})")
    rows = json.loads(path.read_text())["rows"]
    models = sorted({r["model"] for r in rows})
    if not model and len(models) > 1:
        raise SystemExit(f"loopfit: error: {path} holds several models {models}: name one as {name}#MODEL")
    model = model or models[0]
    curves = {
        r["yardstick"]: {int(k[2:]): v for k, v in r.items() if k.startswith("R=")} for r in rows if r["model"] == model
    }
    if not curves:
        raise SystemExit(f"loopfit: error: {path} holds no model {model!r} (it has {models})")
    flags = {r["looped"] for r in rows if r["model"] == model and "looped" in r}
    if flags:
        looped = flags == {True}
    else:
        looped = not ("static" in label and all(list(c) == [1] for c in curves.values()))
    return label, curves, looped


def plot(series: list[tuple[str, dict, bool]], out: Path) -> None:
    plt = pyplot()

    depths = sorted({d for _, curves, _ in series for c in curves.values() for d in c})
    fig, axes = plt.subplots(1, 2, figsize=(13, 7))
    for ax, key in zip(axes, ("shakespeare", "gsm8k")):
        for i, (label, curves, looped) in enumerate(series):
            c = curves.get(key)
            if not c:
                continue
            color = f"C{i}" if len(series) <= 10 else plt.get_cmap("tab20")(i % 20)
            if not looped:  # no loop: one number for every R
                ax.axhline(c[1], color=color, linestyle=":", linewidth=2, label=label)
            else:
                xs = sorted(c)
                ax.plot(xs, [c[x] for x in xs], marker="o", color=color, label=label)
        for j, (name, value) in enumerate(FLOORS[key].items()):
            ax.axhline(value, color="black" if j == 0 else "grey", linestyle="--", linewidth=1, label=name)
        ax.set_xscale("log", base=2)
        ax.set_xticks(depths, [str(d) for d in depths])
        ax.set_xlabel("recurrence depth R at evaluation (training mean 6 unless the label says 4)")
        ax.set_ylabel("loss (nats / token)")
        ax.set_title(TITLES[key])
        ax.grid(alpha=0.3)
    axes[0].set_ylim(3.6, 4.6)  # the pruned start (7.7) would flatten the curves that matter
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8.5, frameon=False)
    fig.suptitle("SmolLM2-135M at 4-6-4 healed on tiny-shakespeare, or on it + GSM8K (mix); docs/training.md, issue 20")
    rows = -(-len(labels) // 3)
    save_png(fig, out, rect=(0, 0.035 + 0.026 * rows, 1, 1))  # room below the axes for the shared legend


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--series", nargs="+", default=DEFAULT_SERIES, help="LABEL=FILE[#MODEL] per line of the plot")
    ap.add_argument("--results", type=Path, default=RESULTS, help="folder FILE is looked up in")
    ap.add_argument("--out", type=Path, default=Path("docs/img/heal-yardsticks.png"))
    args = ap.parse_args()
    series = [load_series(s, args.results) for s in args.series]
    plot(series, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
