"""Offline teacher cache: the teacher's next-token distributions, run once, stored sparse, read zero-copy.

Layout of a cache folder (all paths in the manifest are relative, so the folder can be moved or copied):

    manifest.json                 settings, tokenizer/data hashes, dtypes, shards with sha256 per file
    shard-00000.counts.npy        (rows, seq_len) entries per position (0 where no target follows)
    shard-00000.ids.npy           (entries,) token ids, smallest unsigned dtype holding the vocabulary
    shard-00000.values.npy        (entries,) float16 log-probabilities at T = 1 (topk, topk_tail) or counts (sampled)
    shard-00000.tail.npy          (rows, seq_len) float16 log of the mass outside the k ids (topk_tail only)

Entries are stored CSR-style (position-major), so a position costs only what it holds: `sampled` stores the
unique ids drawn with their counts, and positions without a target cost one byte. Position j of row i holds the
teacher's distribution after reading tokens 0..j of row i of the training data, i.e. it is aligned with the
logits (score it with label j + 1 after the usual shift). Every `.npy` file opens with `np.load(mmap_mode="r")`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from loopfit.errors import LoopfitError
from loopfit.io import (
    atomic_file,
    check_replaceable,
    fsync_dir,
    inside,
    install_dir,
    pid_alive,
    remove_leftovers,
    sha256_file,
    write_json,
    write_marker,
)
from loopfit.losses.estimators import ESTIMATOR_REGISTRY, ESTIMATORS, Estimator
from loopfit.models.packed_attention import packed_kwargs

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PROGRESS = "progress.json"
IGNORE_INDEX = -100


@dataclass
class CacheSettings:
    """What `cache-teacher` stores per position."""

    estimator: str = "topk_tail"
    """`topk`, `topk_tail` or `sampled` (see `loopfit.losses.estimators`: what each stores, and its bias)."""
    top_k: int = 64
    """Tokens kept per position for `topk` / `topk_tail`."""
    samples: int = 32
    """Draws per position for `sampled` (unique ids are stored with their counts)."""
    temperature: float = 1.0
    """Sampling temperature of `sampled`; training must use the same. `topk*` always store T = 1 log-probs."""
    shard_rows: int = 256
    """Sequences per shard (the unit of resumption and of checksums)."""
    batch_size: int = 4
    """Sequences per teacher forward pass (batches never cross a shard)."""
    seed: int = 0
    """Seed of the draws of `sampled` (row i always uses the same generator, so resumed runs are identical)."""

    def validate(self, vocab_size: int) -> None:
        if self.estimator not in ESTIMATORS:
            raise LoopfitError(f"--estimator must be one of {', '.join(ESTIMATORS)}, got {self.estimator}")
        est = self.definition
        try:
            est.check(self, vocab_size)
        except ValueError as e:  # losses/ stands alone; the user-facing error is this layer's
            raise LoopfitError(str(e)) from None
        if not self.temperature > 0:
            raise LoopfitError(f"--temperature must be > 0, got {self.temperature}")
        if not est.tempered and self.temperature != 1.0:
            tempered = ", ".join(n for n, e in ESTIMATOR_REGISTRY.items() if e.tempered)
            raise LoopfitError(f"--temperature only applies to --estimator {tempered} ({self.estimator} stores T = 1 "
                               "log-probs)")  # fmt: skip
        if self.shard_rows < 1 or self.batch_size < 1:
            raise LoopfitError("--shard_rows and --batch_size must be >= 1")

    @property
    def definition(self) -> Estimator:
        """The estimator's definition (`loopfit.losses.estimators`)."""
        return ESTIMATOR_REGISTRY[self.estimator]

    @property
    def width(self) -> int:
        """Most entries a position can hold."""
        return self.definition.width(self)


def smallest_uint(max_value: int) -> np.dtype:
    """The smallest unsigned integer dtype that holds `max_value`."""
    for dt in (np.uint8, np.uint16, np.uint32):
        if max_value <= np.iinfo(dt).max:
            return np.dtype(dt)
    return np.dtype(np.uint64)


def target_positions(labels: torch.Tensor) -> torch.Tensor:
    """`(..., S)` bool: position j has a target when label j + 1 is not ignored (the last position never does)."""
    valid = torch.zeros_like(labels, dtype=torch.bool)
    valid[..., :-1] = labels[..., 1:] != IGNORE_INDEX
    return valid


@torch.no_grad()
def sparse_targets(logits: torch.Tensor, valid: torch.Tensor, settings: CacheSettings, generators) -> list[dict]:
    """Per row of `logits (B, S, V)`: CSR arrays (counts per position, ids, values, tail) of the valid positions,
    as the estimator encodes them (positions without a target hold nothing, and a tail of 0)."""
    est = settings.definition
    rows = []
    for b in range(logits.shape[0]):
        pos = valid[b].nonzero().squeeze(-1)
        entries, ids, values, rest = est.encode(logits[b, pos], settings, generators[b])
        counts = torch.zeros(logits.shape[1], dtype=torch.long)
        counts[pos] = entries
        tail = None
        if rest is not None:
            tail = torch.zeros(logits.shape[1])
            tail[pos] = rest
        rows.append({"counts": counts, "ids": ids, "values": values, "tail": tail})
    return rows


def _save_npy(folder: Path, name: str, array: np.ndarray) -> dict:
    with atomic_file(folder / name, mode="wb") as f:
        np.save(f, array, allow_pickle=False)
    return {"file": name, "sha256": sha256_file(folder / name)}


def _row_generator(seed: int, row: int) -> torch.Generator:
    return torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(f"{seed}:{row}".encode()).digest()[:7], "big"))


def write_cache(
    teacher,
    dataset,
    out: str | os.PathLike,
    settings: CacheSettings,
    info: dict,
    overwrite: bool = False,
    progress: bool = True,
    on_shard=None,
) -> Path:
    """Run `teacher` over every row of `dataset` and write the cache to `out`, resuming a partial run.

    Args:
        teacher: a causal LM called as `teacher(input_ids=..., position_ids=...)` returning `.logits (B, S, V)`.
        dataset: the training rows (`PackedDataset`): items with `input_ids`, `labels` (unshifted), maybe
            `position_ids`.
        info: recorded in the manifest and compared on resume: `teacher`, `tokenizer_hash`, `data_hash`,
            `vocab_size` (required) and anything else about the data.
        on_shard: called with the shard index after each shard is durably written (tests use it to interrupt).

    The work happens in `.partial-<name>` beside `out`: each shard's files are written atomically (fsynced), then
    recorded in `progress.json` with their sha256; a rerun with the same settings checks them and continues after
    the last recorded shard (with other settings it is refused, or with `overwrite` started over). The finished
    folder gets the loopfit marker and replaces `out` by rename only once complete; an existing `out` is replaced
    only with `overwrite` and only if loopfit wrote it.
    """
    out = Path(out)
    vocab = int(info["vocab_size"])
    settings.validate(vocab)
    check_cache_output(out, overwrite)
    n_rows, seq_len = len(dataset), int(dataset[0]["input_ids"].shape[0]) if len(dataset) else 0
    if n_rows == 0:
        raise LoopfitError("the data has no rows to run the teacher on")
    config = {"format_version": FORMAT_VERSION, "settings": asdict(settings), "rows": n_rows, "seq_len": seq_len,
              **{k: info[k] for k in sorted(info)}}  # fmt: skip
    work = out.parent / f".partial-{out.name}"
    done = _resume_partial(work, config, overwrite)
    work.mkdir(parents=True, exist_ok=True)
    ids_dtype, width_dtype = smallest_uint(vocab - 1), smallest_uint(settings.width)
    has_tail = settings.definition.has_tail
    values_dtype = width_dtype if settings.definition.counts else np.dtype(np.float16)
    shard_starts = list(range(0, n_rows, settings.shard_rows))
    bar = tqdm(total=n_rows * seq_len, unit="tok", unit_scale=True, disable=not progress, desc="teacher")
    bar.update(sum(s["rows"][1] - s["rows"][0] for s in done) * seq_len)
    teacher.eval()
    for index in range(len(done), len(shard_starts)):
        start, stop = shard_starts[index], min(shard_starts[index] + settings.shard_rows, n_rows)
        parts = []
        for b0 in range(start, stop, settings.batch_size):
            items = [dataset[i] for i in range(b0, min(b0 + settings.batch_size, stop))]
            batch = {k: torch.stack([it[k] for it in items]) for k in items[0]}
            # Per-document positions and attention, as training reads the rows (no KV cache: with one HF would
            # ignore the packed documents).
            kwargs = packed_kwargs(teacher, batch.get("position_ids"))
            with torch.no_grad():
                logits = teacher(input_ids=batch["input_ids"], **kwargs).logits
            if logits.shape[-1] < vocab:
                raise LoopfitError(f"the teacher has {logits.shape[-1]} logits but the vocabulary has {vocab} tokens")
            generators = [_row_generator(settings.seed, i) for i in range(b0, b0 + len(items))]
            parts += sparse_targets(logits[..., :vocab], target_positions(batch["labels"]), settings, generators)
            bar.update(len(items) * seq_len)
        name = f"shard-{index:05d}"
        arrays = {
            "counts": torch.stack([p["counts"] for p in parts]).numpy().astype(width_dtype),
            "ids": torch.cat([p["ids"] for p in parts]).numpy().astype(ids_dtype),
            "values": torch.cat([p["values"] for p in parts]).numpy().astype(values_dtype),
        }
        if has_tail:
            arrays["tail"] = torch.stack([p["tail"] for p in parts]).numpy().astype(np.float16)
        files = {key: _save_npy(work, f"{name}.{key}.npy", arr) for key, arr in arrays.items()}
        done.append(
            {"index": index, "rows": [start, stop], "entries": int(sum(len(p["ids"]) for p in parts)), "files": files}
        )
        write_json(work / PROGRESS, {"config": config, "shards": done, "pid": os.getpid()})
        if on_shard is not None:
            on_shard(index)
    bar.close()
    dtypes = {"counts": str(width_dtype), "ids": str(ids_dtype), "values": str(values_dtype)}
    if has_tail:
        dtypes["tail"] = "float16"
    manifest = {**config, "dtypes": dtypes, "shards": done}
    write_json(work / MANIFEST, manifest)
    (work / PROGRESS).unlink()
    for stray in work.glob(".tmp-*"):  # temporaries of a killed earlier run (this process owns the folder now)
        stray.unlink()
    write_marker(work, "teacher-cache")  # the checksums are the manifest's
    fsync_dir(work)
    check_cache_output(out, overwrite)  # again: `out` may have appeared while the teacher ran
    install_dir(work, out)  # an old `out` is renamed aside, then deleted: never a moment without a cache
    return out


def check_cache_output(out: Path, overwrite: bool) -> None:
    """Refuse an existing `out` without `overwrite`, or one loopfit did not write; cleans a killed run's
    leftovers of `out` (not its `.partial-` folder, which a rerun resumes)."""
    remove_leftovers(out)
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise LoopfitError(f"output folder {out} already exists (pass --overwrite=true to replace it)")
        check_replaceable(out)


def _resume_partial(work: Path, config: dict, overwrite: bool) -> list[dict]:
    """The shards a killed earlier run finished in `work`, after checking they are intact and made with the same
    settings; [] when there is no partial run (or `overwrite` discards one made with other settings)."""
    if not (work / PROGRESS).exists():
        return []
    try:
        state = json.loads((work / PROGRESS).read_text())
        pid = state.get("pid")
        same = state.get("config") == config
        done = list(state["shards"]) if same else []
        records = [(rec["file"], rec["sha256"]) for shard in done for rec in shard["files"].values()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise LoopfitError(f"{work / PROGRESS} is damaged; delete {work} and run again") from None
    if isinstance(pid, int) and pid != os.getpid() and pid_alive(pid):
        raise LoopfitError(f"{work} is being written by another process (pid {pid}); wait for it or stop it")
    if not same:
        if overwrite:
            shutil.rmtree(work)
            return []
        raise LoopfitError(
            f"{work} holds a partial cache made with other settings or data; rerun with those, delete it, or pass "
            "--overwrite=true to start over"
        )
    for name, digest in records:  # a partial run is only trusted as far as its files are intact
        path = inside(work, name, work / PROGRESS)
        if not path.is_file() or sha256_file(path) != digest:
            raise LoopfitError(f"{path} is damaged; delete {work} and run again")
    return done
