"""Training text the teacher writes itself: the general-text half of the demo's heal (`--teacher_train_share`).

Healing on the task data alone teaches the task's format and forgets the rest: on text the teacher wrote, the healed
loop ended worse than the pruned model it started from. Training also on the teacher's own samples (sequence-level
knowledge distillation, Kim & Rush 2016, arXiv:1606.07947; the cached teacher adds its token-level distributions
on them as on every training row) keeps the student near its teacher's distribution on general text.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from loopfit.data.sources import ARITHMETIC
from loopfit.io import atomic_file
from loopfit.models.prepacked import prepacked_linears
from loopfit.models.sampling import sample
from loopfit.pipeline.config import TEACHER_TRAIN, TRAIN_PROMPTS, DemoConfig, Plan
from loopfit.pipeline.progress import end_stage, left_padded, progress_bar, start_stage

BATCH = 32  # rows sampled at once: the weights are read once per token step for all of them (228 tok/s on 2 cores)


def heal_data(cfg: DemoConfig, out: Path) -> str | list[str] | None:
    """What the heal (and the teacher cache, which is keyed on the rows training reads) reads: `cfg.data` alone, or
    `cfg.data` and the teacher's training texts mixed by token share (`loopfit.data.build_dataset`'s `:weight`)."""
    if cfg.teacher_train_share <= 0:
        return cfg.data
    share = cfg.teacher_train_share
    return [f"{cfg.data or ARITHMETIC}:{1 - share:g}", f"{out / TEACHER_TRAIN}:{share:g}"]


def needed_tokens(cfg: DemoConfig, p: Plan) -> int:
    """Tokens of teacher text the planned steps read at the share asked for, plus what the held-out split carves off
    (a tenth by default)."""
    return math.ceil(cfg.teacher_train_share * p.steps * cfg.batch_size * cfg.seq_len / (1 - p.val_fraction))


def target_tokens(cfg: DemoConfig, p: Plan) -> int:
    """`needed_tokens` and a twentieth more for packing: the mix then needs no second epoch of the teacher's texts."""
    return math.ceil(needed_tokens(cfg, p) * 1.05)


def teacher_train_texts(cfg: DemoConfig, out: Path, teacher, tokenizer, p: Plan) -> Path | None:
    """Sample texts from the teacher (temperature 1, top-p 1, at most `cfg.teacher_text_tokens` new tokens each,
    ended at its end-of-text token; seeded from `cfg.seed`) until they hold `target_tokens` tokens or number
    `p.max_documents` (what the heal reads of each source), openings cycled from `TRAIN_PROMPTS`; written atomically
    to `TEACHER_TRAIN` in `out`, one `{"text": opening + continuation}` per line. Returns that path (None with
    `teacher_train_share` 0); an existing file is kept (a resumed demo)."""
    if cfg.teacher_train_share <= 0:
        return None
    path = out / TEACHER_TRAIN
    if path.exists():
        return path
    target = target_tokens(cfg, p)
    t0 = start_stage(
        f"4/9 the teacher writes {target:,} tokens of training text from {len(TRAIN_PROMPTS)} openings "
        f"({cfg.teacher_train_share:.0%} of the heal's tokens)"
    )
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    generator = torch.Generator(next(teacher.parameters()).device).manual_seed(cfg.seed)
    lines, tokens, start = [], 0, 0
    with progress_bar(target, "teacher writes", "tok") as bar, prepacked_linears(teacher, BATCH):
        while tokens < target and len(lines) < p.max_documents:
            prompts = [TRAIN_PROMPTS[(start + i) % len(TRAIN_PROMPTS)] for i in range(BATCH)]
            start += BATCH
            ids, mask = left_padded([tokenizer(x)["input_ids"] for x in prompts], pad)
            new = sample(teacher, ids, mask, cfg.teacher_text_tokens, [eos], pad, generator)  # the new tokens only
            for prompt, row, prompt_len in zip(prompts, new.tolist(), mask.sum(1).tolist()):
                if len(lines) == p.max_documents:  # the heal reads no more of this source: the count stays exact
                    break
                if eos in row:
                    row = row[: row.index(eos)]
                lines.append(json.dumps({"text": prompt + tokenizer.decode(row, skip_special_tokens=True)}))
                tokens += prompt_len + len(row)
                bar.update(prompt_len + len(row))
    if tokens < needed_tokens(cfg, p):
        print(f"    note: the heal reads at most {p.max_documents} documents of each source, so the teacher's texts "
              f"hold about {tokens:,} of the {needed_tokens(cfg, p):,} tokens their share asks for; the mix keeps the "
              "share with fewer task tokens")  # fmt: skip
    with atomic_file(path) as f:
        f.write("\n".join(lines) + "\n")
    seconds = time.perf_counter() - t0
    print(f"    {len(lines)} texts, {tokens:,} tokens ({tokens / seconds:.0f} tok/s) -> {path}")
    end_stage(t0, out, "teacher writes")
    return path
