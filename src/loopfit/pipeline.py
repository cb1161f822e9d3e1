"""`loopfit demo`: the whole promise in one command, read top to bottom.

analyze -> convert -> cache the teacher -> heal (LoRA + KD under the curriculum) -> evaluate at every depth against
the teacher -> generate at two depths -> report.md. Each stage writes into the run folder and is skipped when its
output already exists, so an interrupted demo picks up where it stopped.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from loopfit.errors import LoopfitError
from loopfit.io import atomic_dir, atomic_file, write_json


@dataclass
class DemoConfig:
    """Settings of one demo run (every field is a `loopfit demo` flag)."""

    out: str = "runs/demo"
    """Run folder."""
    model: str = "smollm2-135m"
    """Source (and teacher) model."""
    data: str | None = None
    """Training data (file/folder/dataset); default: the built-in arithmetic word problems."""
    layers: str = "0-3:20-25:26-29"
    """Layout `prelude:block:coda` of source layers, or `auto` to take the layer analysis' suggestion."""
    budget_minutes: float = 10.0
    """Wall-clock minutes of healing (the rest of the demo takes about 8 minutes on 2 CPU cores)."""
    seq_len: int = 256
    """Tokens per packed training and evaluation sequence."""
    batch_size: int = 4
    """Sequences per training step and per evaluation batch."""
    max_documents: int | None = None
    """Cap on the documents read (train + validation); by default just enough for the planned training steps."""
    val_fraction: float = 0.1
    """Fraction of documents held out for evaluation (never trained on)."""
    chat: bool = True
    """Format question/answer records with the tokenizer's chat template."""
    max_mean_rec: int = 4
    """Mean depth the curriculum ramps to."""
    backprop_depth: int = 3
    """Iterations that keep gradients (the rest of a sampled depth runs without: truncated backprop)."""
    lr: float = 5e-4
    """Peak learning rate (AdamW, warmup-stable-decay)."""
    lora_r: int = 16
    """LoRA rank (lora_alpha = 2r) on every linear layer; the loop adapter is trained fully."""
    estimator: str = "topk_tail"
    """Teacher-cache estimator: `topk`, `topk_tail` or `sampled`."""
    top_k: int = 64
    """Tokens kept per position by the `topk` / `topk_tail` cache."""
    depths: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    """Loop depths R at which the converted and the healed model are evaluated."""
    analysis_samples: int = 16
    """Calibration sequences of the layer analysis."""
    eval_rows: int = 48
    """Validation sequences scored at each depth."""
    seed: int = 0
    """Seeds data order and split, depth sampling and the cache's draws."""


def _stage(title: str) -> float:
    print(f"\n=== {title} ===", flush=True)
    return time.perf_counter()


def _done(t0: float) -> None:
    print(f"    ({time.perf_counter() - t0:.0f} s)", flush=True)


def _val_batches(val, rows: int, batch_size: int) -> list[dict]:
    n = min(rows, len(val))
    if n == 0:
        raise LoopfitError("the validation split is empty: raise --val_fraction or --max_documents")
    out = []
    for i in range(0, n, batch_size):
        idx = range(i, min(i + batch_size, n))
        batch = {k: torch.stack([val[j][k] for j in idx]) for k in ("input_ids", "labels")}
        lengths = torch.as_tensor([val.num_tokens[j] for j in idx])[:, None]
        batch["attention_mask"] = (torch.arange(batch["input_ids"].shape[1])[None] < lengths).long()
        out.append(batch)
    return out


def setup(cfg: DemoConfig) -> tuple[Path, object, object]:
    from loopfit.loading import load_model, load_tokenizer

    if cfg.budget_minutes <= 0:
        raise LoopfitError(f"--budget_minutes must be > 0, got {cfg.budget_minutes}")
    if not 0 < cfg.val_fraction < 1:
        raise LoopfitError(f"--val_fraction must be in (0, 1), got {cfg.val_fraction}")
    if min(cfg.depths) < 1:
        raise LoopfitError("--depths must all be >= 1")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "demo-config.json", cfg.__dict__)
    t0 = _stage(f"loading {cfg.model}")
    teacher = load_model(cfg.model).eval()
    tokenizer = load_tokenizer(cfg.model)
    _done(t0)
    return out, teacher, tokenizer


def analyze_layers(cfg: DemoConfig, out: Path, teacher, tokenizer) -> str:
    from loopfit.analysis import analyze, print_table, save_plot

    path = out / "analysis" / "layers.json"
    if not path.exists():
        t0 = _stage("1/7 layer analysis (block influence, angular distance)")
        result = analyze(
            teacher, tokenizer, data=cfg.data, num_samples=cfg.analysis_samples, seq_len=cfg.seq_len, chat=cfg.chat
        )
        print_table(result)
        save_plot(result, out / "analysis" / "layers.png")
        write_json(path, result.to_json())
        _done(t0)
    suggested = json.loads(path.read_text())["suggested_layers"]
    print(f"analysis suggests --layers {suggested}")
    return suggested


def convert(cfg: DemoConfig, out: Path, teacher, tokenizer, layers: str) -> Path:
    from loopfit.convert import parse_layout, to_looped

    folder = out / "converted"
    if not folder.exists():
        t0 = _stage(f"2/7 convert to a looped model, layers {layers} (identity adapter)")
        model = to_looped(
            teacher, parse_layout(layers, teacher.config.num_hidden_layers), mean_recurrence=cfg.max_mean_rec
        )
        with atomic_dir(folder) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        _done(t0)
    return folder


def data(cfg: DemoConfig, tokenizer, max_documents: int | None, val_fraction: float):
    from loopfit.data import build_dataset

    return build_dataset(
        cfg.data,
        tokenizer,
        cfg.seq_len,
        chat=cfg.chat,
        val_fraction=val_fraction,
        seed=cfg.seed,
        max_documents=max_documents,
    )


def train_config(
    cfg: DemoConfig,
    converted: Path,
    run: Path,
    steps: int,
    max_documents: int | None,
    cache: Path | None,
    val_fraction: float,
):
    """The healing run: LoRA + the loop adapter trained fully, KD from the cached teacher, curriculum of the mean."""
    from loopfit.train.config import DistillationConfig, LoRAConfig, MeanRecurrenceSchedule, OptimConfig, TrainConfig

    return TrainConfig(
        model_name=str(converted),
        out=str(run),
        data=cfg.data,
        chat=cfg.chat,
        max_documents=max_documents,
        val_fraction=val_fraction,
        seq_len=cfg.seq_len,
        batch_size=cfg.batch_size,
        max_steps=steps,
        max_minutes=cfg.budget_minutes * 1.2,
        seed=cfg.seed,
        eval_batches=4,
        backprop_depth=cfg.backprop_depth,
        resume=(run / "config.yaml").exists(),
        lora=LoRAConfig(enabled=True, r=cfg.lora_r, lora_alpha=2 * cfg.lora_r, modules_to_save=["adapter"]),
        distillation=DistillationConfig(
            enabled=cache is not None, teacher_cache=str(cache) if cache else None, alpha=0.5, temperature=2.0
        ),
        mean_recurrence_schedule=MeanRecurrenceSchedule(turn_on=True, warmup=0.5, max_mean_rec=cfg.max_mean_rec),
        optim_config=OptimConfig(lr=cfg.lr),
    )


@dataclass(frozen=True)
class Plan:
    """What the timing probe decided; saved as `plan.json` so a resumed demo keeps the same plan."""

    steps: int
    """Training steps that fit the budget."""
    max_documents: int
    """Documents to read so that training gets `steps * batch_size` rows."""
    val_fraction: float
    """Held-out fraction of those documents (enough for `eval_rows` sequences)."""
    seconds_per_step: float
    """Probe's measured seconds per step."""


def plan(cfg: DemoConfig, out: Path, converted: Path, tokenizer) -> Plan:
    """Steps that fit the budget (a 3-step timing probe, cost integrated over the curriculum) and the documents
    that give that many training rows, so the teacher is cached over exactly what training will read."""
    from loopfit.sweep.budget import plan_steps, probe_run

    path = out / "plan.json"
    if path.exists():
        return Plan(**json.loads(path.read_text()))
    t0 = _stage("3/7 plan: time a few training steps to fit the healing into the budget")
    probe_docs = 64 if cfg.max_documents is None else min(64, cfg.max_documents)
    probe_cfg = train_config(cfg, converted, out / ".probe", 3, probe_docs, None, cfg.val_fraction)
    probe_cfg.max_minutes = None
    probe = probe_run(probe_cfg, out / ".probe", 3)
    steps = max(10, plan_steps(cfg.budget_minutes * 60, probe, 0.0, None))
    rows = steps * cfg.batch_size
    # Hold out enough documents to score `eval_rows` sequences, but cache and train only what the steps read.
    val_fraction = max(cfg.val_fraction, (cfg.eval_rows + 2) / (rows + cfg.eval_rows + 2))
    docs = math.ceil(rows / (1 - val_fraction)) + 8
    while cfg.max_documents is None or docs < cfg.max_documents:
        if len(data(cfg, tokenizer, docs, val_fraction).train) >= rows:
            break
        docs = math.ceil(docs * 1.25)
    if cfg.max_documents is not None:
        docs = min(docs, cfg.max_documents)
    result = Plan(steps, docs, val_fraction, probe.seconds_per_step)
    print(f"    {steps} steps of ~{probe.seconds_per_step:.1f} s fit {cfg.budget_minutes:g} min; {docs} documents")
    write_json(path, asdict(result))
    _done(t0)
    return result


def cache_teacher(cfg: DemoConfig, out: Path, max_documents: int, val_fraction: float) -> Path:
    from loopfit.cache.commands import cache_teacher_command

    folder = out / "teacher-cache"
    if not (folder / "manifest.json").exists():
        t0 = _stage(f"4/7 cache the teacher's next-token distributions ({cfg.estimator}, k={cfg.top_k})")
        # The same data flags as training: the cache is keyed on the exact rows training reads.
        cache_teacher_command(
            teacher=cfg.model,
            data=cfg.data,
            out=str(folder),
            seq_len=cfg.seq_len,
            estimator=cfg.estimator,
            top_k=cfg.top_k,
            chat=cfg.chat,
            max_documents=max_documents,
            val_fraction=val_fraction,
            seed=cfg.seed,
        )
        _done(t0)
    return folder


def heal(cfg: DemoConfig, out: Path, converted: Path, cache: Path, p: Plan) -> Path:
    from loopfit.train.commands import export_command
    from loopfit.train.recipe import train

    run, healed = out / "heal", out / "healed"
    if healed.exists():
        return healed
    t0 = _stage(
        f"5/7 heal: LoRA r={cfg.lora_r} + KD from the cached teacher, mean depth ramping 1 -> "
        f"{cfg.max_mean_rec}, {p.steps} steps (~{cfg.budget_minutes:g} min)"
    )
    train(train_config(cfg, converted, run, p.steps, p.max_documents, cache, p.val_fraction))
    export_command(str(run), out=str(healed), overwrite=True)
    _done(t0)
    return healed


def evaluate(cfg: DemoConfig, out: Path, teacher, converted: Path, healed: Path, packed) -> dict:
    from loopfit.evaluate import depth_sweep, plot_sweep
    from loopfit.loading import load_model

    path = out / "depths.json"
    if path.exists():
        return json.loads(path.read_text())
    t0 = _stage(f"6/7 loss at depths {cfg.depths} on {cfg.eval_rows} held-out sequences")
    batches = _val_batches(packed.val, cfg.eval_rows, cfg.batch_size)
    teacher_loss = depth_sweep(teacher, batches, [1])["loss"][0]
    before = depth_sweep(load_model(converted), batches, cfg.depths)
    after = depth_sweep(load_model(healed), batches, cfg.depths)
    result = {
        "depths": cfg.depths,
        "teacher_loss": teacher_loss,
        "before": before["loss"],
        "after": after["loss"],
        "tokens": after["tokens"],
    }
    write_json(path, result)
    plot_sweep(
        {**after, "baseline_loss": teacher_loss},
        str(out / "loss-vs-depth.png"),
        title="healed looped model vs teacher (dashed)",
    )
    _done(t0)
    return result


def samples(cfg: DemoConfig, out: Path, healed: Path, tokenizer, packed) -> list[dict]:
    from loopfit.data import read_documents
    from loopfit.generate import generate_text
    from loopfit.loading import load_model

    path = out / "samples.json"
    if path.exists():
        return json.loads(path.read_text())
    t0 = _stage("7/7 generate at two depths")
    docs = [d for d in read_documents(cfg.data, seed=cfg.seed + 1, limit=50) if d.prompt][:3]
    model = load_model(healed).eval()
    prompts = [d.prompt for d in docs]
    rows = [{"prompt": p, "reference": d.response} for p, d in zip(prompts, docs)]
    for depth in (1, cfg.max_mean_rec):
        for row, text in zip(rows, generate_text(model, tokenizer, prompts, depth, 96, chat=cfg.chat)):
            row[f"R={depth}"] = text.strip()
            print(f"[R={depth}] {row['prompt'][:60]!r} -> {text.strip()[:120]!r}")
    write_json(path, rows)
    _done(t0)
    return rows


def plot_training(run: Path, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    fig.tight_layout()
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)


def report(cfg: DemoConfig, out: Path, layers: str, suggested: str, result: dict, rows: list[dict]) -> Path:
    plot_training(out / "heal", out / "training.png")
    t, before, after = result["teacher_loss"], result["before"], result["after"]
    d = result["depths"]
    train_depth = d.index(cfg.max_mean_rec) if cfg.max_mean_rec in d else len(d) - 1
    gap = before[train_depth] - t
    closed = (before[train_depth] - after[train_depth]) / gap if gap > 0 else float("nan")
    lines = [
        "# loopfit demo report",
        "",
        f"Source and teacher: `{cfg.model}`. Layout `{layers}` (prelude:block:coda; the layer analysis suggested "
        f"`{suggested}`, see `analysis/layers.png`). Healed for {cfg.budget_minutes:g} minutes with LoRA r = "
        f"{cfg.lora_r} (+ the loop adapter trained fully) and distillation from the teacher's cached distributions "
        f"(`{cfg.estimator}`), the mean depth ramping to {cfg.max_mean_rec}.",
        "",
        f"Held-out loss on {result['tokens']} tokens of the same data (lower is better):",
        "",
        "| depth R | " + " | ".join(map(str, d)) + " |",
        "|---|" + "---|" * len(d),
        "| converted (before) | " + " | ".join(f"{x:.3f}" for x in before) + " |",
        "| healed (after) | " + " | ".join(f"{x:.3f}" for x in after) + " |",
        f"| teacher | {t:.3f} |" + " |" * (len(d) - 1),
        "",
        f"At the training depth R = {d[train_depth]} healing took the loss from {before[train_depth]:.3f} to "
        f"{after[train_depth]:.3f}, "
        + (
            f"closing {100 * closed:.0f}% of the gap to the teacher ({t:.3f}). "
            if closed <= 1
            else f"below the teacher's {t:.3f}: besides distillation, the CE term taught the student the format of "
            "this data, which the teacher never trained on (the gap to the teacher is closed). "
        )
        + f"One loop gives {after[0]:.3f}; "
        + (
            "deeper loops than the training depth "
            + ("do not hurt" if after[-1] <= after[train_depth] + 0.02 else "cost some quality")
            + f" (R = {d[-1]}: {after[-1]:.3f})."
        ),
        "",
        "Plots: `analysis/layers.png` (layer analysis), `training.png` (training curves), `loss-vs-depth.png`.",
        "",
        "## Sample generations",
        "",
    ]
    for row in rows:
        lines += [f"**Q:** {row['prompt']}", ""]
        lines += [f"- {k}: {v}" for k, v in row.items() if k.startswith("R=")]
        lines += [f"- reference: {row['reference']}", ""]
    path = out / "report.md"
    with atomic_file(path) as f:
        f.write("\n".join(lines) + "\n")
    return path


def demo(cfg: DemoConfig) -> Path:
    out, teacher, tokenizer = setup(cfg)
    suggested = analyze_layers(cfg, out, teacher, tokenizer)
    layers = suggested if cfg.layers == "auto" else cfg.layers
    converted = convert(cfg, out, teacher, tokenizer, layers)
    p = plan(cfg, out, converted, tokenizer)
    packed = data(cfg, tokenizer, p.max_documents, p.val_fraction)
    cache = cache_teacher(cfg, out, p.max_documents, p.val_fraction)
    healed = heal(cfg, out, converted, cache, p)
    result = evaluate(cfg, out, teacher, converted, healed, packed)
    rows = samples(cfg, out, healed, tokenizer, packed)
    path = report(cfg, out, layers, suggested, result, rows)
    print(f"\nwrote {path}")
    return path
