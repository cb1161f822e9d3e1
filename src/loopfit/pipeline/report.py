"""`report.md` and the demo's plots: the teacher-referenced losses first, the in-format ones second, then samples."""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

from loopfit.io import atomic_file
from loopfit.pipeline.config import HELDOUT_PROMPTS, TEACHER_TRAIN, TRAIN_PROMPTS, DemoConfig, Plan
from loopfit.plotting import pyplot, save_png


def plot_losses(result: dict, path: Path) -> None:
    """Loss against depth, one panel per held-out set: converted and healed models, the teacher dashed."""
    plt = pyplot()

    sets = result["sets"]
    fig, axes = plt.subplots(1, len(sets), figsize=(5 * len(sets), 4), squeeze=False)
    for ax, s in zip(axes[0], sets.values()):
        ax.plot(result["depths"], s["converted"], "o-", color="C7", label="converted")
        ax.plot(result["depths"], s["healed"], "o-", color="C0", label="healed")
        if "static" in s:
            ax.axhline(s["static"][0], color="C2", ls=":", label=f"static, healed {s['static'][0]:.3f}")
        ax.axhline(s["teacher"], color="C3", ls="--", label=f"teacher {s['teacher']:.3f}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("recurrence depth R")
        ax.set_ylabel("loss (nats/token)")
        ax.set_title("\n".join(textwrap.wrap(s["label"], 45)), fontsize=9)
        ax.legend()
    save_png(fig, path, dpi=120)


def plot_training(run: Path, path: Path) -> None:
    plt = pyplot()

    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    steps = [m for m in lines if "loss" in m]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for key in ("loss", "ce_loss", "kd_loss"):
        a.plot([m["step"] for m in steps], [m.get(key) for m in steps], label=key)
    a.set_xlabel("step")
    a.set_ylabel("training loss")
    a.legend()
    b.plot([m["step"] for m in steps], [m.get("mean_recurrence") for m in steps], label="curriculum mean R")
    b.scatter(
        [m["step"] for m in steps],
        [sum(m["num_steps"]) if isinstance(m.get("num_steps"), list) else m.get("num_steps") for m in steps],
        s=8,
        label="sampled R",
        c="C1",
    )
    b.set_xlabel("step")
    b.set_ylabel("loop iterations")
    b.legend()
    save_png(fig, path, dpi=120)


def _closed(converted: float, healed: float, teacher: float) -> float:
    """Fraction of the teacher gap healing closed: (converted - healed) / (converted - teacher); nan without a gap."""
    gap = converted - teacher
    return (converted - healed) / gap if gap > 0 else float("nan")


def _pct(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{100 * x:.0f}%"


def _gap_words(converted: float, healed: float, teacher: float) -> str:
    closed = _closed(converted, healed, teacher)
    if math.isnan(closed):
        return "the converted model is not above the teacher here, so there is no teacher gap to close"
    return f"healing closed **{_pct(closed)}** of the teacher gap"


def _table(result: dict) -> list[str]:
    d, sets = result["depths"], result["sets"]
    lines = ["| held-out data | model | " + " | ".join(f"R = {r}" for r in d) + " |", "|---|---|" + "---|" * len(d)]
    for key, s in sets.items():
        reference = "teacher (the floor)" if key == "teacher_text" else "teacher"
        if key == "in_format":
            reference = "teacher (never saw this format: no floor)"
        lines += [
            f"| {s['label']}, {s['tokens']:,} tokens | {reference} | {s['teacher']:.3f} |" + " |" * (len(d) - 1),
            "| | converted (the pruned model) | " + " | ".join(f"{x:.3f}" for x in s["converted"]) + " |",
            "| | **healed** | " + " | ".join(f"**{x:.3f}**" for x in s["healed"]) + " |",
        ]
        if "static" in s:  # the --baseline static row: no loop, so one value at every R
            lines.append("| | static, healed (no loop) | " + " | ".join(f"{x:.3f}" for x in s["static"]) + " |")
        if key != "in_format":
            closed = [_closed(c, h, s["teacher"]) for c, h in zip(s["converted"], s["healed"])]
            lines.append("| | teacher gap closed | " + " | ".join(map(_pct, closed)) + " |")
    return lines


BUDGET_WORDS = {"flops": "equal training FLOPs", "minutes": "equal training minutes"}


def _baseline_words(baseline: dict, t: dict, at: int, depth: int) -> str:
    """The `--baseline static` paragraph: the budget kind, both runs' training FLOPs and minutes, which model won."""
    lo, st = baseline["looped"], baseline["static"]
    looped, static = t["healed"][at], t["static"][at]
    verdict = (f"the loop is better by {static - looped:.3f}" if looped < static
               else f"the static model is better by {looped - static:.3f}")  # fmt: skip
    return (
        f"Static baseline at **{BUDGET_WORDS[baseline['kind']]}** (`--baseline_budget {baseline['kind']}`, matched "
        f"to what the looped heal {baseline['basis']}, not its plan: its depths are random draws and a time guard can "
        f"stop it early): looped heal {lo['steps']} steps, {lo['flops']:.3g} training FLOPs, "
        f"{lo['seconds'] / 60:.2f} min; static heal (the same layers once, no loop, same recipe) {st['steps']} steps, "
        f"{st['flops']:.3g} training FLOPs, {st['seconds'] / 60:.2f} min (step time; FLOPs by "
        f"`loopfit.flops.train_flops_per_token`). On the teacher's text at R = {depth} the looped model reaches "
        f"{looped:.3f} and the static one {static:.3f}: {verdict}."
    )


def report(
    cfg: DemoConfig,
    out: Path,
    layers: str,
    suggested: str,
    p: Plan,
    result: dict,
    rows: list[dict],
    baseline: dict | None = None,
) -> Path:
    """`report.md`: the teacher-referenced losses first, the in-format ones second and labelled so, then samples;
    `baseline` (`baseline.json` of `--baseline static`) adds the static model's comparison."""
    plot_training(out / "heal", out / "training.png")
    d, sets = result["depths"], result["sets"]
    at = min(range(len(d)), key=lambda i: abs(d[i] - cfg.max_mean_rec))  # the training depth, or the nearest scored
    t = sets["teacher_text"]
    c, h, ref = t["converted"][at], t["healed"][at], t["teacher"]
    lines = [
        "# loopfit demo report",
        "",
        f"Source and teacher: `{cfg.model}`. Layout `{layers}` (prelude:block:coda; the layer analysis suggested "
        f"`{suggested}`, see `analysis/layers.png`). Healed for {cfg.budget_minutes:g} minutes ({p.steps} planned "
        f"steps) with LoRA r = {cfg.lora_r} (+ the loop adapter trained fully) and distillation from the teacher's "
        f"cached distributions (`{cfg.estimator}`) on "
        + ("the built-in arithmetic word problems" if cfg.data is None else f"`{cfg.data}`")
        + (
            f" mixed with text the teacher wrote itself from {len(TRAIN_PROMPTS)} other openings "
            f"(`{TEACHER_TRAIN}`, {cfg.teacher_train_share:.0%} of the training tokens)"
            if cfg.teacher_train_share > 0
            else ""
        )
        + f", the mean depth ramping to {cfg.max_mean_rec}.",
        "",
        "## Healing, measured against the teacher",
        "",
        f"Loss (nats/token, lower is better). The first rows score {len(HELDOUT_PROMPTS)} built-in openings "
        "continued by the teacher itself (sampled at temperature 1, `heldout/teacher-texts.json`): text the student "
        "never trained on, on which the teacher is the floor (any model's expected loss on the teacher's own samples "
        "exceeds the teacher's by their KL divergence). Teacher gap closed = (converted - healed) / (converted - "
        "teacher). The converted model (identity adapter) computes the pruned model at every R, so it is scored at "
        "R = 1 and that loss stands for every depth.",
        "",
        *_table(result),
        "",
        f"At the training depth R = {d[at]} healing took the loss on the teacher's text from {c:.3f} (converted) to "
        f"{h:.3f}; the teacher's own is {ref:.3f}: {_gap_words(c, h, ref)}. One loop gives {t['healed'][0]:.3f}; "
        + ("deeper loops than the training depth " if d[-1] > d[at] else "")
        + (
            ("do not hurt" if t["healed"][-1] <= h + 0.02 else "cost some quality") + f" (R = {d[-1]}: "
            f"{t['healed'][-1]:.3f})."
            if d[-1] > d[at]
            else ""
        ),
    ]
    if baseline is not None and "static" in t:
        lines += ["", _baseline_words(baseline, t, at, d[at])]
    if "val_data" in sets:
        v = sets["val_data"]
        lines += [
            "",
            f"On your `--val_data` ({v['tokens']:,} tokens) at R = {d[at]}: converted {v['converted'][at]:.3f}, "
            f"healed {v['healed'][at]:.3f}, teacher {v['teacher']:.3f}: "
            f"{_gap_words(v['converted'][at], v['healed'][at], v['teacher'])}.",
        ]
    f = sets["in_format"]
    lines += [
        "",
        f"In-format, second and not a healing result: on held-out rows of the training data the healed student "
        f"reaches {f['healed'][at]:.3f} at R = {d[at]} (converted {f['converted'][at]:.3f}, teacher "
        f"{f['teacher']:.3f}). The student's CE term trained on this format"
        + (" and the teacher never saw it" if cfg.data is None else "")
        + ", so the teacher's loss there is no floor"
        + (": the student ending below it says nothing about healing." if f["healed"][at] < f["teacher"] else "."),
        "",
        "Plots: `analysis/layers.png` (layer analysis), `training.png` (training curves), `loss-vs-depth.png`.",
    ]
    timings_path = out / "timings.json"
    if timings_path.exists():
        timings = json.loads(timings_path.read_text())
        lines += [
            "",
            f"Stage times (s; {sum(timings.values()) / 60:.1f} min in all): "
            + " · ".join(f"{k} {v:.0f}" for k, v in timings.items()),
        ]
    lines += ["", "## Sample generations", ""]
    for row in rows:
        lines += [f"**Q:** {row['prompt']}", ""]
        # one line per depth: a generation's own line breaks would end the markdown list item
        lines += [f"- {k}: {' / '.join(v.splitlines())}" for k, v in row.items() if k.startswith("R=")]
        if row.get("reference"):
            lines += [f"- reference: {row['reference']}"]
        lines += [""]
    path = out / "report.md"
    with atomic_file(path) as f:
        f.write("\n".join(lines) + "\n")
    return path
