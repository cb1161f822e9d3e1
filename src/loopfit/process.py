"""Process-wide defaults of the `loopfit` command, set when `loopfit.cli` is imported (before its other imports).

Each is only a default: a value already in the environment wins.

- `TOKENIZERS_PARALLELISM=false`: no fork warnings from HF tokenizers.
- `THP_MEM_ALLOC_ENABLE=1`: PyTorch's CPU allocator puts tensors of 2 MiB and more on transparent huge pages
  (`madvise`), so the large activations and logits a training step allocates afresh fault in 2 MiB pages instead of
  4 KiB ones. PyTorch reads the variable once, at its first CPU allocation of any size (importing peft makes one),
  so it must be set before any tensor exists: `loopfit.cli` imports this module first, after only the package's
  `__init__` (`loopfit.models`), which must create no tensor at import (tests/test_process_defaults.py guards it).
  The peers benchmark on the 2-core CPU (docs/benchmarks.md): loopfit's step goes from 110-190k page faults to 1-10k
  but not measurably faster (228.6 vs 228.1 tokens/s, 3 repeats each: its fused loss allocates little afresh), TRL's
  GKD step is 38% faster; same peak memory. Nothing changes on GPU or where the kernel's THP mode is `never`;
  `THP_MEM_ALLOC_ENABLE=0` keeps PyTorch's default.
"""

from __future__ import annotations

import os


def process_defaults() -> None:
    """Set the defaults above in `os.environ` where they are not set (idempotent)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


process_defaults()
