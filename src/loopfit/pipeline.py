"""`loopfit demo`: the whole promise in one command, read top to bottom.

analyze -> convert -> plan -> cache the teacher -> the teacher samples held-out text -> heal (LoRA + KD under the
curriculum) -> loss at every depth of teacher, converted and healed models -> generate at two depths -> report.md.
Each stage writes into the run folder and is skipped when its output already exists, so an interrupted demo picks
up where it stopped.

The report leads with a teacher-referenced yardstick: the loss on text the teacher itself sampled (temperature 1,
no truncation) from built-in prompts that share nothing with the training data. On its own samples the teacher is
the floor: any model's expected loss there exceeds the teacher's by their KL divergence, so "(converted - healed) /
(converted - teacher)" is the fraction of the teacher gap healing closed. The held-out rows of the training data
come second and are labelled in-format: the student's CE term trained on that format and the teacher never did, so
a student below the teacher there says nothing about healing.
"""

from __future__ import annotations

import hashlib
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
    budget_minutes: float = 8.0
    """Wall-clock minutes of healing. The rest of the demo (loading, analysis, the teacher cache for the planned
    steps, the teacher's held-out texts, the depth sweep, samples) takes about 8 more on 2 CPU cores: 16 in all."""
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
    eval_rows: int = 16
    """Held-out sequences of the training data scored at each depth (the report's second, in-format rows; the
    healed model's sweep to the deepest R over them is the costliest part of evaluating)."""
    teacher_texts: int = 32
    """Texts the teacher samples (temperature 1) from the built-in prompts, cycled: the teacher-referenced held-out
    data."""
    teacher_text_tokens: int = 128
    """New tokens per teacher-sampled text (fewer where the teacher ends it)."""
    val_data: str | None = None
    """Your own held-out data (.txt/.md, JSONL, Parquet or HF dataset), scored like the teacher's texts by teacher,
    converted and healed models: its first `eval_rows x seq_len` tokens, cut into `seq_len` chunks."""
    seed: int = 0
    """Seeds data order and split, depth sampling and the cache's draws."""


# Plain-text openings of many kinds, none of them arithmetic word problems or chat: the teacher continues each, so
# the scored text is the teacher's own distribution on data the student never trained on.
HELDOUT_PROMPTS = (
    "The history of the printing press begins",
    "Photosynthesis is the process by which",
    "def merge_sorted(a, b):\n",
    "Dear Sam,\n\nThank you for",
    "The recipe calls for two cups of flour and",
    "In 1969, the first humans to walk on the Moon",
    "The main difference between a virus and a bacterium is",
    "Once upon a time, in a small village by the sea,",
    "To reset your router, first",
    "The stock market fell sharply on Monday after",
    "Q: Why is the sky blue?\nA:",
    "The best way to learn a new language is",
    "Chapter 1\n\nThe rain had not stopped for three days when",
    "Water boils at a lower temperature on a mountain because",
    "Here is a short poem about autumn:\n",
    "The city council voted on Tuesday to",
)
TEACHER_TEXTS = "teacher-texts.json"


def _stage(title: str) -> float:
    print(f"\n=== {title} ===", flush=True)
    return time.perf_counter()


def _done(t0: float, out: Path, name: str) -> None:
    """Print the stage's seconds and record them in `timings.json` (the report lists them)."""
    seconds = time.perf_counter() - t0
    print(f"    ({seconds:.0f} s)", flush=True)
    path = out / "timings.json"
    timings = json.loads(path.read_text()) if path.exists() else {}
    write_json(path, {**timings, name: round(seconds, 1)})


def _bar(total: int, desc: str, unit: str):
    """A progress bar that also shows when stderr is not a terminal (`loopfit demo ... | tee log`), at most once a
    second there so that a log stays small."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=False, mininterval=1.0, dynamic_ncols=True)


def _generate(model, prompts: list[list[int]], pad_id: int, desc: str, **kwargs) -> list[list[int]]:
    """Continue token-id prompts (left-padded into one batch) with `model.generate(**kwargs)`, one progress tick per
    new token. Returns each row's new tokens, `max_new_tokens` long (padding after an end of text included)."""
    from transformers.generation.streamers import BaseStreamer

    class Ticks(BaseStreamer):
        # generate puts the prompt first, then each step's new tokens
        def __init__(self, bar):
            self.bar, self.prompt_seen = bar, False

        def put(self, value):
            if self.prompt_seen:
                self.bar.update(1)
            self.prompt_seen = True

        def end(self):
            pass

    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.as_tensor(p)
        mask[i, width - len(p) :] = 1
    with _bar(kwargs["max_new_tokens"], desc, "tok") as bar, torch.inference_mode():
        out = model.eval().generate(
            input_ids=ids, attention_mask=mask, pad_token_id=pad_id, streamer=Ticks(bar), **kwargs
        )
    return out[:, width:].tolist()


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
    if not cfg.depths or min(cfg.depths) < 1:
        raise LoopfitError("--depths must be one or more integers >= 1")
    cfg.depths = sorted(set(cfg.depths))  # the order depth_sweep reports them in
    if cfg.teacher_texts < 1 or cfg.teacher_text_tokens < 1:
        raise LoopfitError("--teacher_texts and --teacher_text_tokens must be >= 1")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "demo-config.json", cfg.__dict__)
    t0 = _stage(f"loading {cfg.model}")
    teacher = load_model(cfg.model).eval()
    tokenizer = load_tokenizer(cfg.model)
    _done(t0, out, "loading")
    return out, teacher, tokenizer


def analyze_layers(cfg: DemoConfig, out: Path, teacher, tokenizer) -> str:
    from loopfit.analysis import analyze, print_table, save_plot

    path = out / "analysis" / "layers.json"
    if not path.exists():
        t0 = _stage("1/8 layer analysis (block influence, angular distance)")
        result = analyze(
            teacher, tokenizer, data=cfg.data, num_samples=cfg.analysis_samples, seq_len=cfg.seq_len, chat=cfg.chat
        )
        print_table(result)
        save_plot(result, out / "analysis" / "layers.png")
        write_json(path, result.to_json())
        _done(t0, out, "analysis")
    suggested = json.loads(path.read_text())["suggested_layers"]
    print(f"analysis suggests --layers {suggested}")
    return suggested


def convert(cfg: DemoConfig, out: Path, teacher, tokenizer, layers: str) -> Path:
    from loopfit.convert import parse_layout, to_looped

    folder = out / "converted"
    if not folder.exists():
        t0 = _stage(f"2/8 convert to a looped model, layers {layers} (identity adapter)")
        model = to_looped(
            teacher, parse_layout(layers, teacher.config.num_hidden_layers), mean_recurrence=cfg.max_mean_rec
        )
        with atomic_dir(folder) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        _done(t0, out, "convert")
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
            enabled=cache is not None, teacher_cache=str(cache) if cache else None, temperature=2.0
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
    t0 = _stage("3/8 plan: time a few training steps to fit the healing into the budget")
    probe_docs = 64 if cfg.max_documents is None else min(64, cfg.max_documents)
    probe_cfg = train_config(cfg, converted, out / ".probe", 3, probe_docs, None, cfg.val_fraction)
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
    _done(t0, out, "plan")
    return result


def cache_teacher(cfg: DemoConfig, out: Path, max_documents: int, val_fraction: float) -> Path:
    from loopfit.cache.commands import cache_teacher_command

    folder = out / "teacher-cache"
    if not (folder / "manifest.json").exists():
        t0 = _stage(f"4/8 cache the teacher's next-token distributions ({cfg.estimator}, k={cfg.top_k})")
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
        _done(t0, out, "cache teacher")
    return folder


def heal(cfg: DemoConfig, out: Path, converted: Path, cache: Path, p: Plan) -> Path:
    from loopfit.train.commands import export_command
    from loopfit.train.recipe import train

    run, healed = out / "heal", out / "healed"
    if healed.exists():
        return healed
    t0 = _stage(
        f"6/8 heal: LoRA r={cfg.lora_r} + KD from the cached teacher, mean depth ramping 1 -> "
        f"{cfg.max_mean_rec}, {p.steps} steps (~{cfg.budget_minutes:g} min)"
    )
    train(train_config(cfg, converted, run, p.steps, p.max_documents, cache, p.val_fraction))
    export_command(str(run), out=str(healed), overwrite=True)
    _done(t0, out, "heal")
    return healed


def teacher_texts(cfg: DemoConfig, out: Path, teacher, tokenizer) -> list[dict]:
    """The teacher-referenced held-out data: `cfg.teacher_texts` texts the teacher samples (temperature 1, seeded)
    from `HELDOUT_PROMPTS`, cycled. Kept in `heldout/teacher-texts.json`, so a resumed demo scores the same texts.

    Each text is `{"prompt", "prompt_ids", "ids", "text"}`: `ids` are the sampled tokens, up to and including the
    first end of text (at most `cfg.teacher_text_tokens`).
    """
    path = out / "heldout" / TEACHER_TEXTS
    if path.exists():
        return json.loads(path.read_text())["texts"]
    t0 = _stage(
        f"5/8 the teacher samples {cfg.teacher_texts} held-out texts of up to {cfg.teacher_text_tokens} tokens "
        "(the teacher-referenced yardstick)"
    )
    prompts = [HELDOUT_PROMPTS[i % len(HELDOUT_PROMPTS)] for i in range(cfg.teacher_texts)]
    prompt_ids = [tokenizer(p)["input_ids"] for p in prompts]
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        # Every sampling knob is explicit: the teacher's own generation_config (say temperature 0.7, top_p 0.8) would
        # fill in those left unset, and the teacher is the loss floor only on samples of its actual distribution.
        new = _generate(
            teacher,
            prompt_ids,
            pad,
            "teacher samples",
            max_new_tokens=cfg.teacher_text_tokens,
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            typical_p=1.0,
            repetition_penalty=1.0,
            eos_token_id=eos,
        )
    texts = []
    for prompt, p_ids, ids in zip(prompts, prompt_ids, new):
        if eos in ids:
            ids = ids[: ids.index(eos) + 1]
        text = tokenizer.decode(ids, skip_special_tokens=True)
        texts.append({"prompt": prompt, "prompt_ids": p_ids, "ids": ids, "text": text})
    seconds = time.perf_counter() - t0
    info = {"model": cfg.model, "seed": cfg.seed, "temperature": 1.0, "max_new_tokens": cfg.teacher_text_tokens}
    write_json(path, {**info, "seconds": round(seconds, 1), "texts": texts})
    n = sum(len(t["ids"]) for t in texts)
    print(f"    {n:,} tokens ({n / seconds:.0f} tok/s); {texts[0]['prompt']!r} -> {texts[0]['text'][:100]!r}")
    _done(t0, out, "teacher texts")
    return texts


def _text_batches(texts: list[dict], batch_size: int) -> list[dict]:
    """Batches of prompt + sampled tokens, right-padded, with only the sampled tokens as labels (the prompts are ours,
    not the teacher's): `input_ids`, `labels` (-100 elsewhere), `attention_mask`, each (B, longest text)."""
    rows = sorted(texts, key=lambda t: len(t["prompt_ids"]) + len(t["ids"]))  # similar lengths together: less padding
    batches = []
    for i in range(0, len(rows), batch_size):
        group = rows[i : i + batch_size]
        width = max(len(t["prompt_ids"]) + len(t["ids"]) for t in group)
        ids = torch.zeros(len(group), width, dtype=torch.long)
        labels = torch.full_like(ids, -100)
        mask = torch.zeros_like(ids)
        for j, t in enumerate(group):
            p, n = len(t["prompt_ids"]), len(t["prompt_ids"]) + len(t["ids"])
            ids[j, :n] = torch.as_tensor(t["prompt_ids"] + t["ids"])
            labels[j, p:n] = torch.as_tensor(t["ids"])
            mask[j, :n] = 1
        batches.append({"input_ids": ids, "labels": labels, "attention_mask": mask})
    return batches


def _user_batches(cfg: DemoConfig, tokenizer) -> list[dict]:
    """`--val_data`: its first `eval_rows * seq_len` tokens in `seq_len` chunks (as `loopfit eval --data` cuts it)."""
    from loopfit.evaluate import chunk_tokens, file_token_ids

    return chunk_tokens(
        file_token_ids(cfg.val_data, tokenizer, cfg.eval_rows * cfg.seq_len), cfg.seq_len, cfg.batch_size
    )


@dataclass
class HeldOut:
    """One held-out set that every model is scored on."""

    key: str
    """`teacher_text`, `val_data` or `in_format`."""
    label: str
    """What the report calls it."""
    source: str
    """What it was made from: a resumed demo scores a set again when this changed."""
    batches: list[dict]
    """Batches with `input_ids`, unshifted `labels` (-100 ignored) and `attention_mask`, each (B, S)."""


def _texts_source(texts: list[dict]) -> str:
    ids = json.dumps([t["prompt_ids"] + t["ids"] for t in texts]).encode()
    return f"{TEACHER_TEXTS}:{hashlib.sha256(ids).hexdigest()[:16]}"


def _sweep(model, batches: list[dict], depths: list[int], bar) -> dict:
    """`depth_sweep` one batch at a time, so that the stage's bar moves (its own bar hides when piped); token-weighted
    mean loss (nats/token) per depth and the tokens scored."""
    from loopfit.evaluate import depth_sweep

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


def evaluate(cfg: DemoConfig, out: Path, teacher, converted: Path, healed: Path, sets: list[HeldOut]) -> dict:
    """Loss (nats/token) of the teacher, the converted and the healed model on every held-out set, the looped ones at
    each depth of `cfg.depths`. Saved as `depths.json`: `{"depths", "sets": {key: {"label", "source", "tokens",
    "teacher", "converted": [per depth], "healed": [per depth]}}}`; a resumed demo scores only new or changed sets."""
    from loopfit.loading import load_model

    path = out / "depths.json"
    result = json.loads(path.read_text()) if path.exists() else {}
    if result.get("depths") != cfg.depths or "sets" not in result:
        result = {"depths": cfg.depths, "sets": {}}
    todo = [h for h in sets if result["sets"].get(h.key, {}).get("source") != h.source]
    if todo:
        t0 = _stage(
            f"7/8 loss at depths {cfg.depths} of teacher, converted and healed models on "
            + ", ".join(h.key for h in todo)
        )
        scores = {h.key: {"label": h.label, "source": h.source} for h in todo}
        # The converted model's identity adapter makes every iteration compute block(e): its loss is the same at
        # every R (tests/test_models.py checks the equality), so it is scored once, at R = 1, and that value stands
        # for every depth; this keeps the whole demo inside 20 minutes on 2 cores.
        models = (
            ("teacher", lambda: teacher, [1]),
            ("converted", lambda: load_model(converted), [1]),
            ("healed", lambda: load_model(healed), cfg.depths),
        )
        with _bar(len(models) * sum(len(h.batches) for h in todo), "loss", "batch") as bar:
            for name, load, depths in models:
                model = load().eval()
                for h in todo:
                    t1 = time.perf_counter()
                    r = _sweep(model, h.batches, depths, bar)
                    scores[h.key][name] = {"teacher": r["loss"][0], "converted": r["loss"][:1] * len(cfg.depths)}.get(
                        name, r["loss"]
                    )
                    scores[h.key]["tokens"] = r["tokens"]
                    losses = "  ".join(f"R={d}: {x:.3f}" for d, x in zip(depths, r["loss"]))
                    bar.write(f"    {name:<9}  {h.key:<12}  {losses}  ({time.perf_counter() - t1:.0f} s)")
        result["sets"].update(scores)
        result["sets"] = {h.key: result["sets"][h.key] for h in sets}
        write_json(path, result)
        plot_losses(result, out / "loss-vs-depth.png")
        _done(t0, out, "evaluate")
    return result


def plot_losses(result: dict, path: Path) -> None:
    """Loss against depth, one panel per held-out set: converted and healed models, the teacher dashed."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = result["sets"]
    fig, axes = plt.subplots(1, len(sets), figsize=(5 * len(sets), 4), squeeze=False)
    for ax, s in zip(axes[0], sets.values()):
        ax.plot(result["depths"], s["converted"], "o-", color="C7", label="converted")
        ax.plot(result["depths"], s["healed"], "o-", color="C0", label="healed")
        ax.axhline(s["teacher"], color="C3", ls="--", label=f"teacher {s['teacher']:.3f}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("recurrence depth R")
        ax.set_ylabel("loss (nats/token)")
        ax.set_title("\n".join(textwrap.wrap(s["label"], 45)), fontsize=9)
        ax.legend()
    fig.tight_layout()
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)


def samples(cfg: DemoConfig, out: Path, healed: Path, tokenizer) -> list[dict]:
    from loopfit.data import read_documents
    from loopfit.data.chat import format_prompt
    from loopfit.loading import load_model

    path = out / "samples.json"
    if path.exists():
        return json.loads(path.read_text())
    depths = sorted({1, cfg.max_mean_rec})
    t0 = _stage(f"8/8 generate at depths {depths}")
    docs = [d for d in read_documents(cfg.data, seed=cfg.seed + 1, limit=50) if d.prompt][:3]
    chat = cfg.chat and bool(docs)  # text data has no questions: continue three of the held-out openings instead
    prompts = [d.prompt for d in docs] or list(HELDOUT_PROMPTS[:3])
    rows = [{"prompt": p, "reference": d.response} for p, d in zip(prompts, docs)] or [{"prompt": p} for p in prompts]
    ids = [tokenizer(format_prompt(tokenizer, p, chat), add_special_tokens=not chat)["input_ids"] for p in prompts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model = load_model(healed).eval()
    for depth in depths:
        new = _generate(model, ids, pad, f"R={depth}", max_new_tokens=96, do_sample=False, num_steps=depth)
        for row, tokens in zip(rows, new):
            row[f"R={depth}"] = text = tokenizer.decode(tokens, skip_special_tokens=True).strip()
            print(f"[R={depth}] {row['prompt'][:60]!r} -> {text[:120]!r}")
    write_json(path, rows)
    _done(t0, out, "samples")
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
        if key != "in_format":
            closed = [_closed(c, h, s["teacher"]) for c, h in zip(s["converted"], s["healed"])]
            lines.append("| | teacher gap closed | " + " | ".join(map(_pct, closed)) + " |")
    return lines


def report(cfg: DemoConfig, out: Path, layers: str, suggested: str, p: Plan, result: dict, rows: list[dict]) -> Path:
    """`report.md`: the teacher-referenced losses first, the in-format ones second and labelled so, then samples."""
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


def in_format_label(cfg: DemoConfig) -> str:
    if cfg.data is None:
        return "in-format: held-out arithmetic word problems (student trained on this format; the teacher did not)"
    return f"in-format: held-out rows of `{cfg.data}` (student trained on this data)"


def demo(cfg: DemoConfig) -> Path:
    out, teacher, tokenizer = setup(cfg)
    # --val_data is read now, so that a wrong path fails before the analysis and the healing, not after them.
    user = _user_batches(cfg, tokenizer) if cfg.val_data is not None else None
    suggested = analyze_layers(cfg, out, teacher, tokenizer)
    layers = suggested if cfg.layers == "auto" else cfg.layers
    converted = convert(cfg, out, teacher, tokenizer, layers)
    p = plan(cfg, out, converted, tokenizer)
    packed = data(cfg, tokenizer, p.max_documents, p.val_fraction)
    cache = cache_teacher(cfg, out, p.max_documents, p.val_fraction)
    texts = teacher_texts(cfg, out, teacher, tokenizer)
    healed = heal(cfg, out, converted, cache, p)
    sets = [
        HeldOut("teacher_text", "the teacher's own text", _texts_source(texts), _text_batches(texts, cfg.batch_size))
    ]
    if user is not None:
        sets.append(HeldOut("val_data", f"your --val_data `{cfg.val_data}`", cfg.val_data, user))
    in_format = _val_batches(packed.val, cfg.eval_rows, cfg.batch_size)
    source = f"{cfg.data or 'arithmetic'}:{p.max_documents}:{p.val_fraction}:{cfg.eval_rows}:{cfg.seed}"
    sets.append(HeldOut("in_format", in_format_label(cfg), source, in_format))
    result = evaluate(cfg, out, teacher, converted, healed, sets)
    rows = samples(cfg, out, healed, tokenizer)
    path = report(cfg, out, layers, suggested, p, result, rows)
    print(f"\nwrote {path}")
    return path
