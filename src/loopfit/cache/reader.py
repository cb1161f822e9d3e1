"""Reading a teacher cache: random access by training row, zero-copy from memory-mapped shards; verification.

Every shard file is checked against the manifest's sha256 (and dtype and shape) before it is first read, and the
manifest may only name files inside the cache folder; faults are one-line `LoopfitError`s naming the file.
"""

from __future__ import annotations

import json
import os
from bisect import bisect_right
from pathlib import Path

import numpy as np
import torch

from loopfit.cache.writer import FORMAT_VERSION, MANIFEST, CacheSettings
from loopfit.errors import LoopfitError
from loopfit.io import inside, sha256_file

REBUILD = "rebuild it with loopfit cache-teacher --overwrite=true"


class TeacherCache:
    """Read a teacher cache: `cache[i]` gives the sparse targets of training row `i`, zero-copy from the shards.

    `cache[i]` -> `{"ids": LongTensor (S, W), "values": FloatTensor (S, W), "tail": FloatTensor (S,)}`, with
    `W = top_k` or `samples`; `values` are T = 1 log-probabilities (`topk`, `topk_tail`) or counts (`sampled`);
    `tail` only for `topk_tail`. Positions with fewer entries (no target, or fewer unique draws) are padded with
    id 0 and value 0 (a zero count is ignored by the `sampled` estimator; unused positions are masked by the
    labels). Feed them to `sparse_kd_divergence` / `fused_kd_loss` with `estimator=cache.estimator`.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        path = self.folder / MANIFEST
        if not path.is_file():
            raise LoopfitError(f"{self.folder} is not a teacher cache (no {MANIFEST}): give the folder cache-teacher "
                               "wrote")  # fmt: skip
        try:
            self.manifest = json.loads(path.read_text())
            s = self.manifest["settings"]
            self.settings = CacheSettings(**s)
            self.rows, self.seq_len = int(self.manifest["rows"]), int(self.manifest["seq_len"])
            self.shards = self.manifest["shards"]
            self.vocab_size = int(self.manifest["vocab_size"])
            self.dtypes = dict(self.manifest["dtypes"])
            self._paths = [self._shard_paths(sh) for sh in self.shards]
            self._starts = [int(sh["rows"][0]) for sh in self.shards]
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
            msg = str(e).splitlines()[0] if str(e) else ""
            raise LoopfitError(f"{path} is not a valid teacher-cache manifest ({type(e).__name__}: {msg}); "
                               f"{REBUILD}") from None  # fmt: skip
        if self.manifest.get("format_version") != FORMAT_VERSION:
            raise LoopfitError(f"{path} has format version {self.manifest.get('format_version')}, not {FORMAT_VERSION}")
        self._open: dict[int, dict] = {}
        self._checked: set[int] = set()

    def _shard_paths(self, sh: dict) -> dict[str, tuple[Path, str]]:
        """`{key: (path inside the folder, sha256)}` of one manifest shard entry; KeyError/TypeError if malformed."""
        keys = ["counts", "ids", "values"] + (["tail"] if self.definition.has_tail else [])
        int(sh["index"]), int(sh["entries"]), int(sh["rows"][0]), int(sh["rows"][1])
        files = sh["files"]
        out = {}
        for key in keys:
            rec = files[key]
            if not isinstance(rec["sha256"], str):
                raise TypeError(f"shard {sh['index']} {key}: sha256 is not a string")
            out[key] = (inside(self.folder, rec["file"], self.folder / MANIFEST), rec["sha256"])
        return out

    @property
    def estimator(self) -> str:
        return self.settings.estimator

    @property
    def definition(self):
        """The estimator's definition (`loopfit.losses.estimators.Estimator`): how records become targets, its bias."""
        return self.settings.definition

    @property
    def temperature(self) -> float:
        return self.settings.temperature

    def __len__(self) -> int:
        return self.rows

    def check_compatible(self, tokenizer_hash: str, data_hash: str, temperature: float | None = None) -> None:
        """Raise LoopfitError naming what differs: tokenizer, data, or (for an estimator that draws at the cache's
        temperature, `sampled`) the temperature."""
        problems = []
        if self.manifest.get("tokenizer_hash") != tokenizer_hash:
            problems.append(f"tokenizer (cache {self.manifest.get('tokenizer_hash')}, training {tokenizer_hash})")
        if self.manifest.get("data_hash") != data_hash:
            problems.append(f"data (cache {self.manifest.get('data_hash')}, training {data_hash})")
        if temperature is not None and self.definition.tempered and temperature != self.temperature:
            problems.append(f"temperature (draws made at {self.temperature}, training uses {temperature})")
        if problems:
            raise LoopfitError(f"teacher cache {self.folder} does not match this run: " + "; ".join(problems))

    def check_shard(self, index: int) -> int:
        """Check shard `index`'s files (present, sha256, dtype, shapes against the manifest) once per process;
        returns its number of entries. Raises LoopfitError naming the faulty file."""
        sh = self.shards[index]
        start, stop = (int(x) for x in sh["rows"])
        arrays = {}
        for key, (path, digest) in self._paths[index].items():
            if not path.is_file():
                raise LoopfitError(f"teacher cache file {path} is missing; {REBUILD}")
            if index not in self._checked and sha256_file(path) != digest:
                raise LoopfitError(f"teacher cache file {path} is damaged (its sha256 differs from {MANIFEST}); "
                                   f"{REBUILD}")  # fmt: skip
            try:
                arr = np.load(path, mmap_mode="r", allow_pickle=False)
            except (ValueError, OSError, EOFError) as e:
                raise LoopfitError(f"teacher cache file {path} is not a valid array file ({type(e).__name__}); "
                                   f"{REBUILD}") from None  # fmt: skip
            if str(arr.dtype) != self.dtypes.get(key):
                raise LoopfitError(f"teacher cache file {path} has dtype {arr.dtype}, {MANIFEST} says "
                                   f"{self.dtypes.get(key)}; {REBUILD}")  # fmt: skip
            arrays[key] = arr
        total = int(arrays["counts"].sum(dtype=np.int64)) if arrays["counts"].ndim == 2 else -1
        expect = {"counts": (stop - start, self.seq_len), "ids": (total,), "values": (total,),
                  "tail": (stop - start, self.seq_len)}  # fmt: skip
        for key, arr in arrays.items():
            if arr.shape != expect[key] or total != int(sh["entries"]):
                raise LoopfitError(f"teacher cache file {self._paths[index][key][0]} has shape {arr.shape} / "
                                   f"{total} entries, {MANIFEST} says otherwise; {REBUILD}")  # fmt: skip
        self._checked.add(index)
        return total

    def _shard(self, index: int) -> dict:
        if index not in self._open:
            self.check_shard(index)  # a shard is trusted only once its checksum matched
            arrays = {
                k: np.load(path, mmap_mode="r", allow_pickle=False) for k, (path, _) in self._paths[index].items()
            }
            per_row = arrays["counts"].sum(axis=1, dtype=np.int64)
            arrays["row_offsets"] = np.concatenate([[0], np.cumsum(per_row)])
            self._open[index] = arrays
        return self._open[index]

    def _locate(self, i: int) -> tuple[dict, int]:
        if not 0 <= i < self.rows:
            raise IndexError(f"row {i} is outside the cache's {self.rows} rows")
        index = bisect_right(self._starts, i) - 1
        return self._shard(index), i - self._starts[index]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        shard, r = self._locate(i)
        lo, hi = shard["row_offsets"][r], shard["row_offsets"][r + 1]
        counts = np.asarray(shard["counts"][r], dtype=np.int64)
        width = self.settings.width
        positions = np.repeat(np.arange(self.seq_len), counts)
        cols = np.arange(hi - lo) - np.repeat(np.cumsum(counts) - counts, counts)
        ids = np.zeros((self.seq_len, width), dtype=np.int64)
        values = np.zeros((self.seq_len, width), dtype=np.float32)
        ids[positions, cols] = shard["ids"][lo:hi]
        values[positions, cols] = shard["values"][lo:hi]
        item = {"ids": torch.from_numpy(ids), "values": torch.from_numpy(values)}
        if "tail" in shard:
            item["tail"] = torch.from_numpy(np.asarray(shard["tail"][r], dtype=np.float32))
        return item

    def dense(self, i: int) -> torch.Tensor:
        """Reconstructed `(S, V)` teacher probabilities of row `i` (at T = 1, or the draw temperature of `sampled`),
        for inspection, as the estimator reads its records (`Estimator.dense`: `topk` renormalised, `topk_tail` with
        the tail mass spread evenly over the other tokens, `sampled` as counts / draws). Rows of positions without a
        target are zero."""
        item = self[i]
        shard, r = self._locate(i)
        has = torch.from_numpy(np.asarray(shard["counts"][r]) > 0)
        return self.definition.dense(item["ids"], item["values"], item.get("tail"), has, self.vocab_size)

    def verify(self) -> dict:
        """Check every file's checksum, shape and dtype, and that the shards cover rows 0..rows-1 exactly once.

        Returns a summary; raises LoopfitError on the first fault, naming it.
        """
        expected = 0
        entries = 0
        for i, sh in enumerate(self.shards):
            start, stop = (int(x) for x in sh["rows"])
            if start != expected or stop <= start:
                raise LoopfitError(f"{self.folder / MANIFEST}: shard {sh['index']} covers rows {start}-{stop}, "
                                   f"expected to start at {expected}; {REBUILD}")  # fmt: skip
            expected = stop
            entries += self.check_shard(i)
        if expected != self.rows:
            raise LoopfitError(f"{self.folder / MANIFEST}: the shards cover {expected} rows, the manifest says "
                               f"{self.rows}; {REBUILD}")  # fmt: skip
        size = sum(path.stat().st_size for paths in self._paths for path, _ in paths.values())
        return {"rows": self.rows, "shards": len(self.shards), "entries": entries, "bytes": size,
                "bytes_per_token": size / (self.rows * self.seq_len), "estimator": self.estimator}  # fmt: skip


class TeacherTargetsDataset(torch.utils.data.Dataset):
    """The training rows with their cached targets added as `teacher_ids`, `teacher_values` (and `teacher_tail`)."""

    def __init__(self, dataset, cache: TeacherCache):
        if len(dataset) != len(cache):
            raise LoopfitError(f"the data has {len(dataset)} rows but the teacher cache has {len(cache)}")
        self.dataset, self.cache = dataset, cache

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {**self.dataset[i], **{f"teacher_{k}": v for k, v in self.cache[i].items()}}
