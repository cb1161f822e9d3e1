"""Prepared data folders: packed rows in N Parquet shards plus `manifest.json`, and the `loopfit prepare` command.

Layout: `train-00000-of-0000N.parquet` ... (contiguous slices of the shuffled train rows, so reading the shards
in order gives back exactly the rows `build_dataset` made, and the same `data_hash`), `val.parquet` and
`manifest.json`. Columns: `input_ids`, `labels`, `position_ids` (fixed-size int32 lists) and `num_tokens`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from loopfit.data.chat import tokenizer_hash
from loopfit.data.dataset import MANIFEST, PackedData, PackedDataset, build_dataset, data_hash
from loopfit.data.packing import PackedRows
from loopfit.errors import LoopfitError
from loopfit.io import atomic_dir, write_json

_COLUMNS = ("input_ids", "labels", "position_ids")


def _table(rows: PackedRows, start: int, stop: int) -> pa.Table:
    seq_len = rows.input_ids.shape[1]
    cols = {}
    for name in _COLUMNS:
        flat = pa.array(np.ascontiguousarray(getattr(rows, name)[start:stop]).reshape(-1), type=pa.int32())
        cols[name] = pa.FixedSizeListArray.from_arrays(flat, seq_len)
    cols["num_tokens"] = pa.array(rows.num_tokens[start:stop], type=pa.int32())
    return pa.table(cols)


def _read(paths: list[Path], seq_len: int) -> PackedRows:
    arrays: dict[str, list[np.ndarray]] = {name: [] for name in (*_COLUMNS, "num_tokens")}
    for path in paths:
        table = pq.read_table(path)
        for name in _COLUMNS:
            col = table.column(name).combine_chunks()
            arrays[name].append(col.flatten().to_numpy().astype(np.int32).reshape(-1, seq_len))
        arrays["num_tokens"].append(table.column("num_tokens").to_numpy().astype(np.int32))
    empty = {name: np.zeros((0, seq_len), np.int32) for name in _COLUMNS} | {"num_tokens": np.zeros(0, np.int32)}
    return PackedRows(**{k: np.concatenate(v) if v else empty[k] for k, v in arrays.items()})


def save_prepared(data: PackedData, out: str | Path, shards: int = 1, overwrite: bool = False) -> Path:
    """Write `data` as a prepared folder (atomically); returns its path."""
    if shards < 1:
        raise LoopfitError(f"--shards must be >= 1, got {shards}")
    n = len(data.train)
    bounds = np.linspace(0, n, shards + 1).round().astype(int)
    names = [f"train-{i:05d}-of-{shards:05d}.parquet" for i in range(shards)]
    manifest = dict(data.manifest, shards=names, val_file="val.parquet")
    with atomic_dir(out, overwrite=overwrite) as tmp:
        for name, start, stop in zip(names, bounds[:-1], bounds[1:]):
            pq.write_table(_table(data.train.rows, int(start), int(stop)), tmp / name)
        pq.write_table(_table(data.val.rows, 0, len(data.val)), tmp / "val.parquet")
        write_json(tmp / MANIFEST, manifest)
    return Path(out)


def load_prepared(folder: str | Path, tokenizer, seq_len: int, position_ids: bool = False) -> PackedData:
    """Load a prepared folder, checking that it was made for this tokenizer and sequence length."""
    import json

    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        names, want_hash = manifest["shards"], manifest["data_hash"]
    except (OSError, ValueError, KeyError) as e:
        raise LoopfitError(f"{folder} is not a prepared data folder: bad {MANIFEST} ({e})") from None
    if manifest["seq_len"] != seq_len:
        raise LoopfitError(f"{folder} was prepared with seq_len {manifest['seq_len']}, not {seq_len}")
    if tokenizer is not None and manifest["tokenizer"]["hash"] != tokenizer_hash(tokenizer):
        raise LoopfitError(f"{folder} was prepared with another tokenizer ({manifest['tokenizer']['name_or_path']})")
    if position_ids and not manifest.get("position_ids"):
        raise LoopfitError(f"{folder} was prepared without position ids (prepare it with --position_ids=true)")
    missing = [n for n in [*names, manifest.get("val_file", "val.parquet")] if not (folder / n).is_file()]
    if missing:
        raise LoopfitError(f"{folder} is incomplete: {missing[0]} is missing")
    with_pos = bool(manifest.get("position_ids"))
    train = PackedDataset(_read([folder / n for n in names], seq_len), with_pos)
    val = PackedDataset(_read([folder / manifest.get("val_file", "val.parquet")], seq_len), with_pos)
    if data_hash(train, val) != want_hash:
        raise LoopfitError(f"{folder} is corrupt: its data hash does not match the manifest")
    train.with_position_ids = val.with_position_ids = position_ids
    return PackedData(train, val, manifest)


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
        out: output folder (required).
        overwrite: replace an existing output folder.
    """
    from loopfit.data.dataset import check_sources
    from loopfit.errors import check_count, check_output
    from loopfit.loading import check_seq_len, load_tokenizer

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
    tok = load_tokenizer(tokenizer)
    check_seq_len(tokenizer, seq_len)  # training on these rows would refuse them later
    built = build_dataset(
        data, tok, seq_len, chat=chat, assistant_only=assistant_only, system_prompt=system_prompt,
        val_fraction=val_fraction, seed=seed, max_documents=max_documents, position_ids=position_ids,
        format=format, text_field=text_field,
    )  # fmt: skip
    save_prepared(built, out, shards=shards, overwrite=overwrite)
    for s in built.manifest["sources"]:
        print(
            f"{s['spec']}: {s['documents']} documents, {s['val_documents']} held out, "
            f"{s['train_documents_used']}/{s['train_documents_available']} train documents used"
        )
    tr, va = built.manifest["counts"]["train"], built.manifest["counts"]["val"]
    print(
        f"wrote {out}: {tr['rows']} train rows ({tr['tokens']} tokens, {tr['target_tokens']} targets, "
        f"{tr['padding_tokens']} padding) in {shards} shards, {va['rows']} val rows; data hash {built.data_hash}"
    )
