"""The held-out data every model is scored on: the teacher's own sampled texts (the teacher-referenced yardstick),
the user's `--val_data`, and held-out rows of the training data (in-format)."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from loopfit.errors import LoopfitError
from loopfit.evaluate import chunk_tokens, file_token_ids
from loopfit.io import write_json
from loopfit.pipeline.config import HELDOUT_PROMPTS, TEACHER_TEXTS, DemoConfig
from loopfit.pipeline.progress import end_stage, generate_ids, start_stage


def teacher_texts(cfg: DemoConfig, out: Path, teacher, tokenizer) -> list[dict]:
    """The teacher-referenced held-out data: `cfg.teacher_texts` texts the teacher samples (temperature 1, seeded)
    from `HELDOUT_PROMPTS`, cycled. Kept in `heldout/teacher-texts.json`, so a resumed demo scores the same texts.

    Each text is `{"prompt", "prompt_ids", "ids", "text"}`: `ids` are the sampled tokens, up to and including the
    first end of text (at most `cfg.teacher_text_tokens`).
    """
    path = out / "heldout" / TEACHER_TEXTS
    if path.exists():
        return json.loads(path.read_text())["texts"]
    t0 = start_stage(
        f"6/9 the teacher samples {cfg.teacher_texts} held-out texts of up to {cfg.teacher_text_tokens} tokens "
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
        new = generate_ids(
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
    end_stage(t0, out, "teacher texts")
    return texts


def text_batches(texts: list[dict], batch_size: int) -> list[dict]:
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


def val_batches(val, rows: int, batch_size: int) -> list[dict]:
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


def user_batches(cfg: DemoConfig, tokenizer) -> list[dict]:
    """`--val_data`: its first `eval_rows * seq_len` tokens in `seq_len` chunks (as `loopfit eval --data` cuts it)."""

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


def texts_source(texts: list[dict]) -> str:
    ids = json.dumps([t["prompt_ids"] + t["ids"] for t in texts]).encode()
    return f"{TEACHER_TEXTS}:{hashlib.sha256(ids).hexdigest()[:16]}"


def in_format_label(cfg: DemoConfig) -> str:
    if cfg.data is None:
        return "in-format: held-out arithmetic word problems (student trained on this format; the teacher did not)"
    return f"in-format: held-out rows of `{cfg.data}` (student trained on this data)"
