"""Attention over packed documents without the quadratic mask: SDPA run causally on each document of a row.

A packed row with position ids restarting at each document (`loopfit train --position_ids=true`) is, for HF's
`sdpa` implementation, one `(seq, seq)` block-diagonal causal mask: every document pays for attending to the whole
row and the kernel cannot skip the upper triangle. Flash-attention's varlen kernels avoid that on GPU; this module
does the same with plain SDPA, on any device: the implementation `loopfit_sdpa` (registered with HF's
`AttentionInterface`, masks as `sdpa`'s) runs `sdpa_attention_forward` with `is_causal=True` on each document's
slice of the row when the layer is given `loopfit_segments`, and is exactly `sdpa` otherwise. HF still builds its
mask once per forward (~15 ms for 678 tokens on 2 CPU threads); the attention no longer runs over it. On a 2-core
CPU, the peers benchmark's 4 GSM8K records packed in one 678-token row: attention 0.73 -> 0.24 s per training step
(docs/benchmarks.md). On GPU it is one SDPA call per document, row and layer: launch-bound for many short documents
(not measured); flash-attention reads packed position ids itself.

On CPU under bf16 autocast a short document whose attention needs gradients is computed in float32
(`FLOAT32_MAX_TOKENS_X_HEAD_DIM`): there PyTorch's bf16 flash-attention backward costs up to 2.6x the float32 one.

Segments are the document boundaries of each row, `[[0, s_1, ..., seq], ...]`, read from the position ids once per
forward (`segments`) and passed down as a layer keyword argument, so a recomputed (gradient-checkpointed) layer
gets them too.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "loopfit_sdpa"
"""The attention implementation's name (`config._attn_implementation`)."""
KWARG = "loopfit_segments"
"""The layer keyword argument that carries the segments."""


def packed_sdpa_forward(module: nn.Module, query, key, value, attention_mask, loopfit_segments=None, **kwargs):
    """HF attention function: `query` `(batch, heads, seq, head_dim)`, `key` / `value` `(batch, kv_heads, seq,
    head_dim)` -> `((batch, seq, heads, head_dim), None)`, as `sdpa_attention_forward`.

    With `loopfit_segments` (one boundary list per row) the mask is ignored: each segment attends causally to
    itself alone, which is what the packed-sequence mask HF builds from the same position ids says. Without them
    (generation, padded batches, a KV cache), and on a sliding-window layer when a segment is longer than the
    window (the mask then holds the window too): `sdpa_attention_forward` with the mask, unchanged.
    """
    window = _sliding_window(module)
    if loopfit_segments is None or (
        window is not None and max(b - a for row in loopfit_segments for a, b in zip(row[:-1], row[1:])) > window
    ):  # a sliding-window layer with a document longer than its window: HF's mask has both, use it
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if query.shape[2] != key.shape[2]:
        raise ValueError("packed segments need queries and keys of the same length (no KV cache)")
    kwargs.pop("is_causal", None)
    sizes = [[stop - start for start, stop in zip(row[:-1], row[1:])] for row in loopfit_segments]
    device = query.device.type
    if not torch.is_autocast_enabled(device):
        return _per_document(module, (query, key, value), sizes, kwargs), None
    dtype = torch.get_autocast_dtype(device)
    upcast = _upcast_short_documents(device, dtype, (query, key, value))
    short = FLOAT32_MAX_TOKENS_X_HEAD_DIM // query.shape[-1] if upcast else 0  # in tokens, for this head size
    # Cast once, not each document's slice (SDPA's autocast: the same numbers): to float32 for the short documents
    # whose backward pass is faster there, to the autocast dtype for the others.
    low = [t.to(dtype) for t in (query, key, value)] if max(map(max, sizes)) > short else None
    high = [t.float() for t in (query, key, value)] if min(map(min, sizes)) <= short else None
    with torch.autocast(device, enabled=False):  # each call in its inputs' dtype
        return _per_document(module, low, sizes, kwargs, high, short, dtype), None


FLOAT32_MAX_TOKENS_X_HEAD_DIM = 240 * 64
"""On CPU under bf16 autocast, a document whose attention needs gradients runs SDPA in float32, its output cast back to
bf16, when its tokens x head_dim are at most this (240 tokens at head_dim 64, 120 at 128, 60 at 256): PyTorch's CPU
flash-attention backward has a large fixed cost in bf16. Forward + backward, casts included, one causal document, torch
2.13, 2-core Xeon with AMX (`python -m benchmarks.sdpa_dtype`), float32 time over bf16 at 64 / 132 / 170 / 218 / 256
tokens: 9 query / 3 key-value heads x 64 (SmolLM2) 0.38 / 0.56 / 0.58 / 0.89 / 1.02; 16/8 x 128 0.63 / 0.72 / 0.82 /
1.23 / 1.52; 8/4 x 256 0.94 / 1.07 / 1.31 / 1.60 / 2.00. Break-even ~250 tokens at head_dim 64, ~190 at 128, ~100 at
256: the limit stays below each. The peers benchmark's step (SmolLM2, documents of 132-218 tokens) on that Xeon: 0.983
-> 0.917 s (-6.8%). Without gradients (a teacher, evaluation) bf16 is faster at every length and is kept; on GPU
nothing changes."""


def _upcast_short_documents(device: str, dtype: torch.dtype, tensors) -> bool:
    return (device == "cpu" and dtype == torch.bfloat16 and torch.is_grad_enabled()
            and any(t.requires_grad for t in tensors))  # fmt: skip


def _per_document(module, low, sizes, kwargs, high=None, short=0, dtype=None) -> torch.Tensor:
    """One causal SDPA call per document and row -> `(batch, seq, heads, head_dim)`: on the slices of `high` (q, k, v)
    for documents of at most `short` tokens, of `low` for the others; each output cast to `dtype` where given."""
    # `split`, not slicing: the backward pass joins the documents' gradients in one `cat`, where each slice's
    # backward would fill and copy a zero tensor of the whole row.
    by_row = [None if ts is None else list(zip(*(t.split(1) for t in ts))) for ts in (low, high)]
    rows = []
    for b, row_sizes in enumerate(sizes):
        docs = [None if r is None else list(zip(*(t.split(row_sizes, dim=2) for t in r[b]))) for r in by_row]
        parts = []
        for i, n in enumerate(row_sizes):
            q, k, v = docs[1][i] if n <= short else docs[0][i]
            out = sdpa_attention_forward(module, q, k, v, None, is_causal=True, **kwargs)[0]
            parts.append(out if dtype is None else out.to(dtype))
        rows.append(torch.cat(parts, dim=1) if len(parts) > 1 else parts[0])
    return torch.cat(rows, dim=0) if len(rows) > 1 else rows[0]


def _sliding_window(module: nn.Module) -> int | None:
    """The layer's sliding window: its own attribute where the family sets one per layer (Gemma, Qwen2: None on
    full-attention layers), else the config's (Mistral slides every layer), else None."""
    if hasattr(module, "sliding_window"):
        return module.sliding_window
    return getattr(getattr(module, "config", None), "sliding_window", None)


AttentionInterface.register(NAME, packed_sdpa_forward)
AttentionMaskInterface.register(NAME, sdpa_mask)


def segments(position_ids: torch.Tensor) -> list[list[int]]:
    """Document boundaries of each row of `position_ids` `(batch, seq)`, by HF's rule for packed sequences
    (`masking_utils.find_packed_sequence_indices`): a document starts at the row's start and wherever a position is
    not its predecessor + 1. One host sync per forward."""
    seq = position_ids.shape[-1]
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] - position_ids[:, :-1] != 1
    return [[*torch.nonzero(row).flatten().tolist(), seq] for row in starts.cpu()]


def use_packed_attention(model: nn.Module) -> bool:
    """Switch a model's `sdpa` attention to `loopfit_sdpa` (the same computation unless segments are passed);
    other implementations (eager, flash-attention, which handles packed position ids itself) are kept. Covers a
    looped model's source config and PEFT wrappers. Returns whether anything was switched. Not saved: HF does not
    write the attention implementation into `config.json`."""
    switched = False
    for module in model.modules():
        config = getattr(module, "config", None)
        for c in (config, getattr(config, "base_config", None)):
            if c is not None and getattr(c, "_attn_implementation", None) == "sdpa":
                c._attn_implementation = NAME
                switched = True
    return switched


def packed_kwargs(model: nn.Module, position_ids: torch.Tensor | None) -> dict:
    """Forward keyword arguments for packed rows: `position_ids`, no KV cache (with one HF ignores the packed
    documents), and the segments where the model attends with `loopfit_sdpa`; `{}` for `position_ids` None."""
    if position_ids is None:
        return {}
    kw = {"position_ids": position_ids, "use_cache": False}
    config = getattr(model, "config", None)
    if NAME in (getattr(config, "_attn_implementation", None),
                getattr(getattr(config, "base_config", None), "_attn_implementation", None)):  # fmt: skip
        kw[KWARG] = segments(position_ids)
    return kw
