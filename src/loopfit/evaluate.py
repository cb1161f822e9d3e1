"""Depth sweep: loss and perplexity of a looped model at many depths, against a baseline, on the same tokens.

Chunking of a held-out file (`--data FILE`): the whole file is tokenized once (a plain text file as one string,
without special tokens; other sources document by document, joined with the EOS token), the token stream is cut
into consecutive, non-overlapping `seq_len`-token chunks (the last one shorter), and the loss is the mean next-token
cross-entropy over every predicted token of every chunk (each chunk predicts its tokens 2..n; nothing is
predicted across chunk boundaries). With `--val_fraction` the chunks are instead the validation rows of
`loopfit.data.build_dataset`, the same deterministic split training uses, formatted as training formats them when
given the run's data flags (`--chat`, `--assistant_only`, `--system_prompt`, `--max_documents`, `--position_ids`,
`--text_stream`; `--max_rows` for a run's first `eval_batches`). `--val_fraction 0`, or those flags without it,
evaluates all of `--data` as training's `--val_data` reads it: the rows `build_dataset` packs from the whole source.
So the loss equals the run's own `val_loss` on the same rows and depth (`loopfit.train.recipe.validate`).

For a looped model, one pass at the largest depth gives every depth: iterations are deterministic in eval mode,
so the state after iteration R of that pass is the state an R-step run ends with, and only the coda and head run
once per depth.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from loopfit.data import build_dataset
from loopfit.data.dataset import check_format_flags, check_sources, is_prepared, parse_source
from loopfit.data.sources import document_text, read_documents, read_text
from loopfit.errors import LoopfitError, check_count, check_output
from loopfit.io import write_json
from loopfit.loading import check_seq_len, load_model, load_tokenizer
from loopfit.models.packed_attention import packed_kwargs
from loopfit.plotting import pyplot, save_png

DEFAULT_DEPTHS = [1, 2, 4, 8, 16, 32, 64]
_TEXT_SUFFIXES = {".txt", ".md", ".text"}


def is_looped(model) -> bool:
    return getattr(model.config, "model_type", None) == "looped"


def parse_depths(depths: list[int] | str | None, default: list[int]) -> list[int]:
    """Depths from a list or a comma-separated string (`1,2,4`), validated (each >= 1)."""
    if depths is None:
        return list(default)
    if isinstance(depths, str):
        try:
            depths = [int(d) for d in depths.strip("[] ").split(",") if d.strip()]
        except ValueError:
            raise LoopfitError(f"--depths must be integers such as 1,2,4,8, got '{depths}'") from None
    depths = [int(d) for d in depths]
    if not depths or min(depths) < 1:
        raise LoopfitError(f"--depths must be one or more integers >= 1, got {depths}")
    return depths


def chunk_tokens(ids: list[int], seq_len: int, batch_size: int) -> list[dict]:
    """Cut a token stream into `seq_len` chunks and batch them (`input_ids`, `labels` with -100 on padding)."""
    if seq_len < 2:
        raise LoopfitError(f"--seq_len must be >= 2, got {seq_len}")
    chunks = [ids[i : i + seq_len] for i in range(0, len(ids), seq_len)]
    chunks = [c for c in chunks if len(c) >= 2]
    if not chunks:
        raise LoopfitError("the data has fewer than 2 tokens")
    batches = []
    for i in range(0, len(chunks), batch_size):
        group = chunks[i : i + batch_size]
        n = max(len(c) for c in group)
        input_ids = torch.zeros(len(group), n, dtype=torch.long)
        labels = torch.full((len(group), n), -100, dtype=torch.long)
        mask = torch.zeros(len(group), n, dtype=torch.long)
        for j, c in enumerate(group):
            input_ids[j, : len(c)] = labels[j, : len(c)] = torch.tensor(c)
            mask[j, : len(c)] = 1
        batches.append({"input_ids": input_ids, "labels": labels, "attention_mask": mask})
    return batches


def _token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    """Summed next-token cross-entropy and the number of predicted tokens (labels unshifted, -100 ignored)."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum")
    return loss.item(), int((labels != -100).sum())


def _coda_logits(model, state: torch.Tensor, attention_mask, position_ids: torch.Tensor) -> torch.Tensor:
    """Coda, final norm and head applied to a recurrent state (no cache), as the model's forward does."""
    dec = model.model
    return model.logits_from_hidden(dec.run_coda(state, dec.prepare(state, attention_mask, position_ids)))


@torch.inference_mode()
def depth_sweep(model, batches: Iterable[dict], depths: list[int] | None = None) -> dict:
    """Mean next-token loss and perplexity at each depth over all batches.

    `batches` yields dicts with `input_ids` and unshifted `labels` (-100 ignored), optionally `attention_mask` and
    `position_ids` (per-document positions of packed rows: each document then attends only to itself).
    Returns `{"depths", "loss", "ppl", "tokens"}`; a plain (non-looped) model gives the same loss at every depth.
    """
    depths = sorted(set(depths or DEFAULT_DEPTHS))
    if depths[0] < 1:
        raise LoopfitError(f"depths must be >= 1, got {depths[0]}")
    model.eval()
    sums = dict.fromkeys(depths, 0.0)
    tokens = 0

    for batch in tqdm(batches, desc="depth sweep", unit="batch", disable=None, leave=False):
        ids, labels = batch["input_ids"], batch["labels"]
        mask, given = batch.get("attention_mask"), batch.get("position_ids")
        if not is_looped(model):
            # packed rows as training reads them: no KV cache (HF drops the packed-document mask with one)
            logits = model(input_ids=ids, attention_mask=mask, **packed_kwargs(model, given)).logits
            s, n = _token_losses(logits, labels)
            for r in depths:
                sums[r] += s
        else:
            out = model.model(input_ids=ids, attention_mask=mask, num_steps=depths[-1], output_states=True,
                              **packed_kwargs(model, given))  # fmt: skip
            pos = given if given is not None else torch.arange(ids.shape[1]).unsqueeze(0)
            for r in depths:
                s, n = _token_losses(_coda_logits(model, out.states[r - 1], mask, pos), labels)
                sums[r] += s
        tokens += n
    if tokens == 0:
        raise LoopfitError("no tokens to evaluate")
    loss = [sums[r] / tokens for r in depths]
    return {"depths": depths, "loss": loss, "ppl": [math.exp(min(x, 700)) for x in loss], "tokens": tokens}


def baseline_loss(model, batches: Iterable[dict]) -> float:
    """Mean next-token loss of a plain model on the same batches."""
    return depth_sweep(model, batches, [1])["loss"][0]


def file_token_ids(data: str, tokenizer, limit_tokens: int | None = None) -> list[int]:
    """All token ids of a held-out source (see the module docstring for how it is tokenized)."""
    path = Path(data)
    if path.suffix.lower() in _TEXT_SUFFIXES:
        if not path.is_file():
            raise LoopfitError(f"data file not found: {data}")

        ids = tokenizer(read_text(path), add_special_tokens=False)["input_ids"]
    else:
        ids = []
        for doc in read_documents(data):
            ids += tokenizer(document_text(doc), add_special_tokens=False)["input_ids"]
            if tokenizer.eos_token_id is not None:
                ids.append(tokenizer.eos_token_id)
            if limit_tokens is not None and len(ids) >= limit_tokens:
                break
    return ids[:limit_tokens] if limit_tokens is not None else ids


def validation_batches(
    data: str | list[str],
    tokenizer,
    seq_len: int,
    val_fraction: float,
    batch_size: int,
    seed: int,
    max_rows: int | None = None,
    **pipeline,
) -> list:
    """The rows the training data pipeline makes of `data`, batched: its validation split (same deterministic
    split) with `0 < val_fraction < 1`, all of it (as training's `--val_data`) with `val_fraction == 0`; the first
    `max_rows` of them if given.

    `pipeline`: `build_dataset`'s formatting flags (`chat`, `assistant_only`, `system_prompt`, `max_documents`,
    `position_ids`, `text_stream`), to be the run's. Batches hold `input_ids` and `labels` `(rows, seq_len)`; with
    `position_ids` they carry the rows' per-document `position_ids` (each document attends only to itself, as in
    training) and no attention mask, otherwise an `attention_mask` over the real tokens. Raises `LoopfitError`
    when there are no rows, and whatever `build_dataset` refuses (a prepared folder made with other flags).
    """
    packed = build_dataset(data, tokenizer, seq_len, val_fraction=val_fraction, seed=seed, **pipeline)
    name = data if isinstance(data, str) else " + ".join(data)
    rows_set = packed.val if val_fraction > 0 else packed.train
    if rows_set is None or len(rows_set) == 0:
        what = f"--val_fraction {val_fraction} leaves no validation rows" if val_fraction > 0 else "no rows"
        raise LoopfitError(f"{what} in {name}")
    rows = [rows_set[i] for i in range(min(len(rows_set), max_rows or len(rows_set)))]
    real = torch.as_tensor(rows_set.num_tokens)
    keys = ("input_ids", "labels", "position_ids") if pipeline.get("position_ids") else ("input_ids", "labels")
    batches = []
    for i in range(0, len(rows), batch_size):
        batch = {k: torch.stack([r[k] for r in rows[i : i + batch_size]]) for k in keys}
        # With position ids the padding at a row's end is a document of its own, which no real token attends to.
        if "position_ids" not in batch:
            n = real[i : i + len(batch["input_ids"]), None]
            batch["attention_mask"] = (torch.arange(batch["input_ids"].shape[1])[None] < n).long()
        batches.append(batch)
    return batches


def plot_sweep(result: dict, path: str, title: str | None = None) -> None:
    """Loss against depth (log2 axis), with the baseline loss as a horizontal line."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(result["depths"], result["loss"], "o-", label="looped")
    if result.get("baseline_loss") is not None:
        ax.axhline(result["baseline_loss"], color="C3", ls="--", label=f"baseline {result['baseline_loss']:.3f}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("recurrence depth R")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title or f"{result['tokens']:,} tokens")
    ax.legend()
    save_png(fig, path)


def eval_command(
    model: str,
    data: str | list[str] | None = None,
    seq_len: int = 256,
    depths: list[int] | str | None = None,
    baseline: str | None = None,
    json: str | None = None,
    plot: str | None = None,
    batch_size: int = 4,
    val_fraction: float | None = None,
    limit_tokens: int | None = None,
    seed: int = 0,
    chat: bool = False,
    assistant_only: bool = False,
    system_prompt: str | None = None,
    max_documents: int | None = None,
    position_ids: bool = False,
    text_stream: bool = False,
    max_rows: int | None = None,
) -> None:
    """Loss and perplexity at each depth on held-out data, with a baseline model's loss on the same tokens.

    Args:
        model: looped (or plain) model: folder, hub id, .gguf file or `smollm2-135m`.
        data: held-out data: a text file (tokenized whole, cut into --seq_len chunks), JSONL, Parquet or HF dataset;
            with the training pipeline (below) also a `loopfit prepare` folder or the run's several `path:weight`
            sources (`--data a.txt:0.7 --data b.jsonl:0.3`).
        seq_len: tokens per chunk (the run's `--seq_len` for its rows).
        depths: loop depths to evaluate, e.g. `1,2,4` (default 1,2,4,8,16,32,64); ignored for a plain model.
        baseline: a plain model (same tokenizer) whose loss on the same tokens is reported and plotted.
        json: write `{"depths", "loss", "ppl", "baseline_loss", "tokens", ...}` and the flags used here.
        plot: write a PNG of loss against depth here.
        batch_size: chunks per forward pass.
        val_fraction: the run's: score the validation split of the training data pipeline; 0: all of --data as the
            pipeline packs it (as a run's `--val_data` is read).
        limit_tokens: evaluate on at most this many tokens of --data (the first ones; whole-file chunks only).
        seed: the run's `--seed` (its split, mixing and packing).
        chat: the run's `--chat`: records in the tokenizer's chat template.
        assistant_only: the run's: loss only on assistant tokens (needs --chat).
        system_prompt: the run's: a system message prepended to each conversation (needs --chat).
        max_documents: the run's: the documents per source its split was carved from (with --val_fraction > 0).
        position_ids: the run's: packed documents kept apart (each attends only to itself).
        text_stream: the run's: a text file read as one token stream cut into --seq_len windows.
        max_rows: score only the first N rows of the pipeline (a run validates on its first `eval_batches x
            batch_size x ranks` rows).

    Any of the last eight (or a prepared folder, or several or weighted sources) scores rows of the training data
    pipeline instead of whole-file chunks; a prepared folder brings its own formatting (given flags must match it).
    """

    if data is None:  # check_sources reads None as the built-in generator: not held-out data
        raise LoopfitError("--data is required")
    entries = check_sources(data)
    check_count("seq_len", seq_len, 2)
    check_count("batch_size", batch_size)
    if val_fraction is not None and not 0 <= val_fraction < 1:
        raise LoopfitError(f"--val_fraction must be in [0, 1), got {val_fraction}")
    for flag, value in (("limit_tokens", limit_tokens), ("max_documents", max_documents), ("max_rows", max_rows)):
        check_count(flag, value, 2 if flag == "limit_tokens" else 1)
    check_format_flags(chat, assistant_only, system_prompt)
    if max_documents is not None and not val_fraction:
        raise LoopfitError("--max_documents is the run's cap of the documents its --val_fraction split is carved "
                           "from; without a split (a --val_data source is read whole) use --max_rows")  # fmt: skip
    pipeline = dict(chat=chat, assistant_only=assistant_only, system_prompt=system_prompt,
                    max_documents=max_documents, position_ids=position_ids, text_stream=text_stream)  # fmt: skip
    prepared = is_prepared(entries[0])  # build_dataset refuses flags other than the folder's
    several = len(entries) > 1 or parse_source(entries[0])[0] != entries[0]
    chosen = any(v not in (False, None) for v in pipeline.values())
    from_pipeline = val_fraction is not None or chosen or max_rows is not None or prepared or several
    if from_pipeline and limit_tokens is not None:
        raise LoopfitError("--limit_tokens cuts a whole file into chunks; rows of the training pipeline are capped "
                           "with --max_rows")  # fmt: skip
    depths = parse_depths(depths, DEFAULT_DEPTHS)
    check_output("json", json)
    check_output("plot", plot)

    tok = load_tokenizer(model)
    check_seq_len(model, seq_len)
    if baseline is not None and load_tokenizer(baseline).get_vocab() != tok.get_vocab():
        raise LoopfitError(f"the baseline {baseline} has a different tokenizer than {model}: losses would not compare")
    if from_pipeline:
        batches = validation_batches(entries, tok, seq_len, val_fraction or 0.0, batch_size, seed, max_rows, **pipeline)
    else:
        batches = chunk_tokens(file_token_ids(entries[0], tok, limit_tokens), seq_len, batch_size)
    lm = load_model(model).eval()
    result = depth_sweep(lm, batches, depths if is_looped(lm) else [1])
    result["baseline_loss"] = baseline_loss(load_model(baseline).eval(), batches) if baseline else None
    result.update(model=model, baseline=baseline, data=data, seq_len=seq_len, val_fraction=val_fraction)
    if from_pipeline:
        result.update(seed=seed, max_rows=max_rows, **pipeline)
    else:
        result.update(limit_tokens=limit_tokens)
    for r, loss, ppl in zip(result["depths"], result["loss"], result["ppl"]):
        print(f"R={r:>3}  loss {loss:.4f}  ppl {ppl:.2f}")
    if baseline:
        print(f"baseline  loss {result['baseline_loss']:.4f}  ({result['tokens']:,} tokens)")
    if json is not None:
        write_json(json, result)
    if plot is not None:
        plot_sweep(result, plot)
