"""Prepared data folders: packed rows in N Parquet shards plus `manifest.json` (`loopfit prepare` writes them).

Layout: `train-00000-of-0000N.parquet` ... (contiguous slices of the shuffled train rows, so reading the shards
in order gives back exactly the rows `build_dataset` made, and the same `data_hash`), `val.parquet` and
`manifest.json`. Columns: `input_ids`, `labels`, `position_ids` (fixed-size int32 lists) and `num_tokens`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from loopfit.data.chat import tokenizer_hash
from loopfit.data.packing import MANIFEST, PackedData, PackedDataset, PackedRows, data_hash
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
