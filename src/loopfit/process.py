"""Process-wide defaults of the `loopfit` command, set when `loopfit.cli` is imported (before its other imports).

Each is only a default: a value already in the environment wins.

- `TOKENIZERS_PARALLELISM=false`: no fork warnings from HF tokenizers.
- `THP_MEM_ALLOC_ENABLE=1`: PyTorch's CPU allocator puts tensors of 2 MiB and more on transparent huge pages
  (`madvise`), so the large activations and logits a training step allocates afresh fault in 2 MiB pages instead of
  4 KiB ones. PyTorch reads the variable once, at its first large allocation, which importing peft already makes:
  hence set before anything else is imported. The peers benchmark's step (docs/benchmarks.md, 2-core CPU): 110-190k
  page faults -> 1-10k per step, 2-4% faster, same peak memory. Nothing changes on GPU or where the kernel's THP mode
  is `never`; `THP_MEM_ALLOC_ENABLE=0` keeps PyTorch's default.
"""

from __future__ import annotations

import os


def process_defaults() -> None:
    """Set the defaults above in `os.environ` where they are not set (idempotent)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


process_defaults()
