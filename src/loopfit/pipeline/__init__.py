"""`loopfit demo`: the whole promise in one command, read top to bottom.

analyze -> convert -> plan -> the teacher writes training text -> cache the teacher -> the teacher samples held-out text
-> heal (LoRA + KD under the curriculum, on the task data mixed with the teacher's training text) -> loss at every depth
of teacher, converted and healed models -> generate at two depths -> report.md.
With `--baseline static` the static pruned model (no loop) is also healed, with the same recipe for the same training
FLOPs or minutes as the looped heal (`baseline`), and scored beside it.
Each stage writes into the run folder and is skipped when its output already exists, so an interrupted demo picks
up where it stopped.

The report leads with a teacher-referenced yardstick: the loss on text the teacher itself sampled (temperature 1,
no truncation) from built-in openings that share nothing with the training data (the teacher's training texts
start from other openings). On its own samples the teacher is
the floor: any model's expected loss there exceeds the teacher's by their KL divergence, so "(converted - healed) /
(converted - teacher)" is the fraction of the teacher gap healing closed. The held-out rows of the training data
come second and are labelled in-format: the student's CE term trained on that format and the teacher never did, so
a student below the teacher there says nothing about healing.

Modules: `config` (`DemoConfig`, `Plan`, the held-out and training prompts), `stages` (one function per stage, each on
library functions), `teacher_train` (the teacher's training texts and the heal's data mix), `baseline` (the optional
static baseline's stages), `heldout` (the scored sets), `progress` (banners, bars, stage times), `report` (`report.md`,
plots).
"""

from __future__ import annotations

from pathlib import Path

from loopfit.pipeline.baseline import check_baseline, static_heal, static_model, static_plan
from loopfit.pipeline.config import DemoConfig, Plan
from loopfit.pipeline.heldout import (
    HeldOut,
    in_format_label,
    teacher_texts,
    text_batches,
    texts_source,
    user_batches,
    val_batches,
)
from loopfit.pipeline.report import report
from loopfit.pipeline.stages import analyze_layers, cache_teacher, convert, data, evaluate, heal, plan, samples, setup
from loopfit.pipeline.teacher_train import teacher_train_texts

__all__ = ["DemoConfig", "Plan", "demo"]


def demo(cfg: DemoConfig) -> Path:
    """Run every stage of the demo into `cfg.out` (skipping those already done) and return the path of `report.md`.
    Raises `LoopfitError` for bad settings or a missing `--val_data` before any stage runs."""
    check_baseline(cfg, Path(cfg.out))
    out, teacher, tokenizer = setup(cfg)
    # --val_data is read now, so that a wrong path fails before the analysis and the healing, not after them.
    user = user_batches(cfg, tokenizer) if cfg.val_data is not None else None
    suggested = analyze_layers(cfg, out, teacher, tokenizer)
    layers = suggested if cfg.layers == "auto" else cfg.layers
    converted = convert(cfg, out, teacher, tokenizer, layers)
    p = plan(cfg, out, converted, tokenizer)
    teacher_train_texts(cfg, out, teacher, tokenizer, p)  # the general-text half of the heal's data (or nothing)
    packed = data(cfg, tokenizer, p.max_documents, p.val_fraction)
    cache = cache_teacher(cfg, out, p.max_documents, p.val_fraction)
    texts = teacher_texts(cfg, out, teacher, tokenizer)
    healed = heal(cfg, out, converted, cache, p)
    static, baseline = None, None
    if cfg.baseline == "static":  # off by default: the static pruned model healed at equal FLOPs or minutes
        folder = static_model(cfg, out, teacher, tokenizer, layers)
        bp = static_plan(cfg, out, converted, folder, cache, p)
        static, baseline = static_heal(cfg, out, folder, cache, p, bp)
    sets = [HeldOut("teacher_text", "the teacher's own text", texts_source(texts), text_batches(texts, cfg.batch_size))]
    if user is not None:
        sets.append(HeldOut("val_data", f"your --val_data `{cfg.val_data}`", cfg.val_data, user))
    in_format = val_batches(packed.val, cfg.eval_rows, cfg.batch_size)
    source = f"{cfg.data or 'arithmetic'}:{p.max_documents}:{p.val_fraction}:{cfg.eval_rows}:{cfg.seed}"
    sets.append(HeldOut("in_format", in_format_label(cfg), source, in_format))
    result = evaluate(cfg, out, teacher, converted, healed, sets, static)
    rows = samples(cfg, out, healed, tokenizer)
    path = report(cfg, out, layers, suggested, p, result, rows, baseline)
    print(f"\nwrote {path}")
    return path
