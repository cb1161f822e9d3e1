"""`loopfit prepare`: tokenize, chat-format, mask, pack and mix data into a prepared folder of Parquet shards."""

from __future__ import annotations

from pathlib import Path

from loopfit.data.dataset import build_dataset, check_format_flags, check_sources
from loopfit.data.shards import save_prepared
from loopfit.errors import LoopfitError, check_count, check_output
from loopfit.loading import check_seq_len, load_tokenizer


def prepare_command(
    data: list[str] | str | None = None,
    format: str = "auto",
    text_field: str | None = None,
    chat: bool = False,
    assistant_only: bool = False,
    system_prompt: str | None = None,
    tokenizer: str = "smollm2-135m",
    seq_len: int = 512,
    shards: int = 1,
    val_fraction: float = 0.0,
    seed: int = 0,
    max_documents: int | None = None,
    position_ids: bool = False,
    text_stream: bool = False,
    out: str | None = None,
    overwrite: bool = False,
) -> None:
    """Tokenise, pack, mix and shuffle data once into Parquet shards plus a manifest, for training and evaluation.

    Args:
        data: a source, repeatable (`--data a.txt:0.7 --data b.parquet:0.3`): text file, .jsonl, .parquet, HF
            dataset folder or hub name, or `arithmetic`; `:weight` mixes by token share. Default: the built-in
            arithmetic word-problem generator.
        format: `auto` (from the file name), `text`, `jsonl`, `parquet`, `hf`, `gsm8k` or `arithmetic`.
        text_field: record field holding free text (default: question/answer pairs if present, else `text`).
        chat: format question/answer pairs with the tokenizer's chat template.
        assistant_only: train only on the assistant's (answer's) tokens of pairs.
        system_prompt: system turn for chat formatting (default: whatever the template adds).
        tokenizer: model whose tokenizer is used (folder, hub id, .gguf or `smollm2-135m`).
        seq_len: tokens per packed row.
        shards: number of train Parquet shards.
        val_fraction: fraction of each source's documents held out in `val.parquet` (0: everything is train).
        seed: seed for the generator, the held-out split, mixing and shuffling.
        max_documents: at most this many documents per source (generator default: 2000).
        position_ids: also store per-document position ids.
        text_stream: text files as one contiguous token stream cut into `seq_len` windows, each a row of its own
            (default: each paragraph a document, packed among the others).
        out: output folder (required).
        overwrite: replace an existing output folder.
    """
    if out is None:
        raise LoopfitError("--out is required")
    check_count("shards", shards)
    check_count("seq_len", seq_len, 2)
    check_count("max_documents", max_documents)
    if not 0 <= val_fraction < 1:
        raise LoopfitError(f"--val_fraction must be in [0, 1), got {val_fraction}")
    if Path(out).exists() and not overwrite:
        raise LoopfitError(f"output folder {out} already exists (pass --overwrite=true to replace it)")
    check_output("out", out, folder=True)
    check_sources(data, format, text_field)
    check_format_flags(chat, assistant_only, system_prompt)
    tok = load_tokenizer(tokenizer)
    check_seq_len(tokenizer, seq_len)  # training on these rows would refuse them later
    built = build_dataset(
        data, tok, seq_len, chat=chat, assistant_only=assistant_only, system_prompt=system_prompt,
        val_fraction=val_fraction, seed=seed, max_documents=max_documents, position_ids=position_ids,
        format=format, text_field=text_field, text_stream=text_stream,
    )  # fmt: skip
    save_prepared(built, out, shards=shards, overwrite=overwrite)
    for s in built.manifest["sources"]:
        print(
            f"{s['spec']}: {s['documents']} documents, {s['val_documents']} held out, "
            f"{s['train_documents_used']}/{s['train_documents_available']} train {s['train_units']} used"
        )
    tr, va = built.manifest["counts"]["train"], built.manifest["counts"]["val"]
    print(
        f"wrote {out}: {tr['rows']} train rows ({tr['tokens']} tokens, {tr['target_tokens']} targets, "
        f"{tr['padding_tokens']} padding) in {shards} shards, {va['rows']} val rows; data hash {built.data_hash}"
    )
