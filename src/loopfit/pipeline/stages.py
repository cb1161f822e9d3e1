"""The demo's stages, each skipped when its output already exists in the run folder: load, analyze, convert, plan, the
teacher's training texts (`teacher_train`), cache the teacher, heal, score at every depth, generate. Each calls the
library (never another command)."""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path

from loopfit.analysis import analyze, print_table, save_plot
from loopfit.cache import CacheSettings, build_teacher_cache
from loopfit.convert import parse_layout, to_looped
from loopfit.data import build_dataset, read_documents
from loopfit.data.chat import format_prompt
from loopfit.errors import LoopfitError
from loopfit.evaluate import depth_sweep
from loopfit.io import atomic_dir, write_json
from loopfit.loading import load_model, load_tokenizer
from loopfit.pipeline.config import HELDOUT_PROMPTS, DemoConfig, Plan
from loopfit.pipeline.heldout import HeldOut
from loopfit.pipeline.progress import end_stage, generate_ids, progress_bar, start_stage
from loopfit.pipeline.report import plot_losses
from loopfit.pipeline.teacher_train import heal_data
from loopfit.sweep.budget import plan_steps, probe_run
from loopfit.train.config import DistillationConfig, LoRAConfig, MeanRecurrenceSchedule, OptimConfig, TrainConfig
from loopfit.train.export import export_run
from loopfit.train.recipe import train


def setup(cfg: DemoConfig) -> tuple[Path, object, object]:
    if cfg.budget_minutes <= 0:
        raise LoopfitError(f"--budget_minutes must be > 0, got {cfg.budget_minutes}")
    if not 0 < cfg.val_fraction < 1:
        raise LoopfitError(f"--val_fraction must be in (0, 1), got {cfg.val_fraction}")
    if not cfg.depths or min(cfg.depths) < 1:
        raise LoopfitError("--depths must be one or more integers >= 1")
    cfg.depths = sorted(set(cfg.depths))  # the order depth_sweep reports them in
    if cfg.teacher_texts < 1 or cfg.teacher_text_tokens < 1:
        raise LoopfitError("--teacher_texts and --teacher_text_tokens must be >= 1")
    if not 0 <= cfg.teacher_train_share < 1:
        raise LoopfitError(f"--teacher_train_share must be in [0, 1), got {cfg.teacher_train_share}")
    out = Path(cfg.out)
    check_resumable(cfg, out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "demo-config.json", cfg.__dict__)
    t0 = start_stage(f"loading {cfg.model}")
    teacher = load_model(cfg.model).eval()
    tokenizer = load_tokenizer(cfg.model)
    if tokenizer.eos_token_id is None:  # before any stage: the teacher's texts end with it, packing separates with it
        raise LoopfitError(f"the tokenizer of {cfg.model} has no EOS token, which the demo's data needs")
    end_stage(t0, out, "loading")
    return out, teacher, tokenizer


def check_resumable(cfg: DemoConfig, out: Path) -> None:
    """Refuse to resume a run folder whose teacher cache or heal read another data mix than `cfg` asks for (a run
    folder from before `--teacher_train_share` counts as share 0): resuming would mix the two or report the wrong one.
    """
    try:
        before = json.loads((out / "demo-config.json").read_text()).get("teacher_train_share", 0.0)
    except (OSError, ValueError, AttributeError):
        return  # a new run folder (or no readable record of the old one: nothing to compare)
    if before != cfg.teacher_train_share and any((out / d).exists() for d in ("teacher-cache", "heal", "healed")):
        raise LoopfitError(
            f"{out} was healed with --teacher_train_share {before:g} (its teacher cache and heal read that data "
            f"mix); rerun with --teacher_train_share {before:g}, or use another --out"
        )


def analyze_layers(cfg: DemoConfig, out: Path, teacher, tokenizer) -> str:
    path = out / "analysis" / "layers.json"
    if not path.exists():
        t0 = start_stage("1/9 layer analysis (block influence, angular distance)")
        result = analyze(
            teacher, tokenizer, data=cfg.data, num_samples=cfg.analysis_samples, seq_len=cfg.seq_len, chat=cfg.chat
        )
        print_table(result)
        save_plot(result, out / "analysis" / "layers.png")
        write_json(path, result.to_json())
        end_stage(t0, out, "analysis")
    suggested = json.loads(path.read_text())["suggested_layers"]
    print(f"analysis suggests --layers {suggested}")
    return suggested


def convert(cfg: DemoConfig, out: Path, teacher, tokenizer, layers: str) -> Path:
    folder = out / "converted"
    if not folder.exists():
        t0 = start_stage(f"2/9 convert to a looped model, layers {layers} (identity adapter)")
        model = to_looped(
            teacher, parse_layout(layers, teacher.config.num_hidden_layers), mean_recurrence=cfg.max_mean_rec
        )
        with atomic_dir(folder) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        end_stage(t0, out, "convert")
    return folder


def data(cfg: DemoConfig, tokenizer, max_documents: int | None, val_fraction: float):
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
    task_only: bool = False,
):
    """The healing run: LoRA + the loop adapter trained fully, KD from the cached teacher, curriculum of the mean.
    It reads `heal_data` (the task data and the teacher's training texts), or with `task_only` the task data alone
    (the timing probe, which runs before the teacher has written anything)."""

    return TrainConfig(
        model_name=str(converted),
        out=str(run),
        data=cfg.data if task_only else heal_data(cfg, Path(cfg.out)),
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
            enabled=cache is not None, teacher_cache=str(cache) if cache else None, temperature=2.0
        ),
        mean_recurrence_schedule=MeanRecurrenceSchedule(turn_on=True, warmup=0.5, max_mean_rec=cfg.max_mean_rec),
        optim_config=OptimConfig(lr=cfg.lr),
    )


def plan(cfg: DemoConfig, out: Path, converted: Path, tokenizer) -> Plan:
    """Steps that fit the budget (a 3-step timing probe, cost integrated over the curriculum) and the documents
    that give that many training rows, so the teacher is cached over exactly what training will read."""

    path = out / "plan.json"
    if path.exists():
        return Plan(**json.loads(path.read_text()))
    t0 = start_stage("3/9 plan: time a few training steps to fit the healing into the budget")
    probe_docs = 64 if cfg.max_documents is None else min(64, cfg.max_documents)
    probe_cfg = train_config(cfg, converted, out / ".probe", 3, probe_docs, None, cfg.val_fraction, task_only=True)
    probe_cfg.max_minutes = None
    # The probe trains without a bar (budget.probe_run turns it off), so say what the silent half minute is.
    print("    timing 3 training steps and one validation pass of the converted model ...", flush=True)
    probe = probe_run(probe_cfg, out / ".probe", 3)
    print(f"    setup {probe.setup_s:.0f} s, validation {probe.validate_s:.0f} s", flush=True)
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
    end_stage(t0, out, "plan")
    return result


def cache_teacher(cfg: DemoConfig, out: Path, max_documents: int, val_fraction: float) -> Path:
    folder = out / "teacher-cache"
    if not (folder / "manifest.json").exists():
        t0 = start_stage(f"5/9 cache the teacher's next-token distributions ({cfg.estimator}, k={cfg.top_k})")
        # The same data flags as training: the cache is keyed on the exact rows training reads.
        settings = CacheSettings(estimator=cfg.estimator, top_k=cfg.top_k, seed=cfg.seed)
        path = build_teacher_cache(cfg.model, heal_data(cfg, out), folder, settings, seq_len=cfg.seq_len, chat=cfg.chat,
                                   max_documents=max_documents, val_fraction=val_fraction)  # fmt: skip
        print(f"wrote {path}")
        end_stage(t0, out, "cache teacher")
    return folder


def heal(cfg: DemoConfig, out: Path, converted: Path, cache: Path, p: Plan) -> Path:
    run, healed = out / "heal", out / "healed"
    if healed.exists():
        return healed
    t0 = start_stage(
        f"7/9 heal: LoRA r={cfg.lora_r} + KD from the cached teacher, mean depth ramping 1 -> "
        f"{cfg.max_mean_rec}, {p.steps} steps (~{cfg.budget_minutes:g} min)"
    )
    train(train_config(cfg, converted, run, p.steps, p.max_documents, cache, p.val_fraction))
    export_run(run, healed, overwrite=True)
    end_stage(t0, out, "heal")
    return healed


def _sweep(model, batches: list[dict], depths: list[int], bar) -> dict:
    """`depth_sweep` one batch at a time, so that the stage's bar moves (its own bar hides when piped); token-weighted
    mean loss (nats/token) per depth and the tokens scored."""

    sums, tokens = [0.0] * len(depths), 0
    for batch in batches:
        if (batch["labels"][:, 1:] != -100).any():
            r = depth_sweep(model, [batch], depths)
            sums = [s + x * r["tokens"] for s, x in zip(sums, r["loss"])]
            tokens += r["tokens"]
        bar.update(1)
    if tokens == 0:
        raise LoopfitError("a held-out set has no tokens to score")
    return {"loss": [s / tokens for s in sums], "tokens": tokens}


def evaluate(
    cfg: DemoConfig, out: Path, teacher, converted: Path, healed: Path, sets: list[HeldOut], static: Path | None = None
) -> dict:
    """Loss (nats/token) of the teacher, the converted and the healed model (and, given `static`, the healed static
    baseline) on every held-out set, the looped ones at each depth of `cfg.depths`. Saved as `depths.json`:
    `{"depths", "sets": {key: {"label", "source", "tokens", "teacher", "converted": [per depth], "healed": [per
    depth], "static": [per depth]}}}`; a resumed demo scores only the models missing on new or changed sets."""

    path = out / "depths.json"
    result = json.loads(path.read_text()) if path.exists() else {}
    if result.get("depths") != cfg.depths or "sets" not in result:
        result = {"depths": cfg.depths, "sets": {}}
    for h in sets:  # a set made from other data is scored again by every model
        if result["sets"].get(h.key, {}).get("source") != h.source:
            result["sets"][h.key] = {"label": h.label, "source": h.source}
    result["sets"] = {h.key: result["sets"][h.key] for h in sets}  # in the order given; sets no longer scored go
    for s in result["sets"].values() if static is None else ():  # a demo rerun without --baseline reports none
        s.pop("static", None)
    # The converted model's identity adapter makes every iteration compute block(e): its loss is the same at every
    # R (tests/test_models.py checks the equality), so it is scored once, at R = 1, and that value stands for every
    # depth; this keeps the whole demo inside 20 minutes on 2 cores. A static model has no loop: one value too.
    models = [
        ("teacher", lambda: teacher, [1]),
        ("converted", lambda: load_model(converted), [1]),
        ("healed", lambda: load_model(healed), cfg.depths),
    ] + ([("static", lambda: load_model(static), [1])] if static is not None else [])
    todo = [(m, [h for h in sets if m[0] not in result["sets"][h.key]]) for m in models]
    todo = [(m, hs) for m, hs in todo if hs]
    if todo:
        names = ", ".join(h.key for h in sets if any(h is x for _, hs in todo for x in hs))
        t0 = start_stage(f"8/9 loss at depths {cfg.depths} of {', '.join(m[0] for m, _ in todo)} on {names}")
        with progress_bar(sum(len(h.batches) for _, hs in todo for h in hs), "loss", "batch") as bar:
            for (name, load, depths), hs in todo:
                model = load().eval()
                for h in hs:
                    t1 = time.perf_counter()
                    r = _sweep(model, h.batches, depths, bar)
                    loss = r["loss"] if len(depths) > 1 else r["loss"] * len(cfg.depths)  # one value: every R
                    loss = loss[0] if name == "teacher" else loss
                    result["sets"][h.key].update({name: loss, "tokens": r["tokens"]})
                    losses = "  ".join(f"R={d}: {x:.3f}" for d, x in zip(depths, r["loss"]))
                    bar.write(f"    {name:<9}  {h.key:<12}  {losses}  ({time.perf_counter() - t1:.0f} s)")
        write_json(path, result)
        plot_losses(result, out / "loss-vs-depth.png")
        end_stage(t0, out, "evaluate")
    return result


def samples(cfg: DemoConfig, out: Path, healed: Path, tokenizer) -> list[dict]:
    path = out / "samples.json"
    if path.exists():
        return json.loads(path.read_text())
    depths = sorted({1, cfg.max_mean_rec})
    t0 = start_stage(f"9/9 generate at depths {depths}")
    docs = [d for d in read_documents(cfg.data, seed=cfg.seed + 1, limit=50) if d.prompt][:3]
    chat = cfg.chat and bool(docs)  # text data has no questions: continue three of the held-out openings instead
    prompts = [d.prompt for d in docs] or list(HELDOUT_PROMPTS[:3])
    rows = [{"prompt": p, "reference": d.response} for p, d in zip(prompts, docs)] or [{"prompt": p} for p in prompts]
    ids = [tokenizer(format_prompt(tokenizer, p, chat), add_special_tokens=not chat)["input_ids"] for p in prompts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model = load_model(healed).eval()
    for depth in depths:
        new = generate_ids(model, ids, pad, f"R={depth}", max_new_tokens=96, do_sample=False, num_steps=depth)
        for row, tokens in zip(rows, new):
            row[f"R={depth}"] = text = tokenizer.decode(tokens, skip_special_tokens=True).strip()
            print(f"[R={depth}] {row['prompt'][:60]!r} -> {text[:120]!r}")
    write_json(path, rows)
    end_stage(t0, out, "samples")
    return rows
