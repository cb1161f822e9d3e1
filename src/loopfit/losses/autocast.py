"""Casting to the autocast dtype where autocast cannot: one definition of "the autocast dtype, if on" and of "cast
once, reuse while unchanged", for the fused loss's operands (`autocast_operands`) and for the linear layers' shared
input casts (`loopfit.train.casts`).

Why it is needed: the fused loss writes its products into preallocated buffers (`out=`), which autocast does not
intercept; and a tensor read by several linear layers is cast by each of them. Both cast themselves, as `F.linear`
under `torch.autocast` would (round to nearest), and keep the copy while the tensor is unchanged.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype `torch.autocast` casts to on `device_type` ("cpu", "cuda", ...), or None where autocast is off."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def cached_cast(cache: WeakIdKeyDictionary, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`t` cast to `dtype` without autograd (detached), kept in `cache` under `t` and reused while `t` holds the same
    storage at the same version: an in-place change bumps `t._version`, `.data =` changes its storage, and either
    gets a fresh cast. The cache is weakly keyed: an entry lives as long as `t` does. Shapes: `t`'s."""
    key = (t.data_ptr(), t._version, dtype)
    hit = cache.get(t)
    if hit is None or hit[0] != key:
        # The entry holds the storage it was cast from: while it lives no other storage can be given its address,
        # so an equal data pointer is the same storage. (Without it, two `.data =` between casts could put the
        # second tensor at the first's freed address with the version unchanged, and a stale cast be reused.)
        hit = (key, t.detach().to(dtype), t.untyped_storage())
        cache[t] = hit
    return hit[1]


_FROZEN_CASTS = WeakIdKeyDictionary()  # frozen parameter -> ((storage, version, dtype), its cast)


def autocast_operands(*tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """`tensors` cast to the autocast dtype where autocast is on for their device, as `F.linear` would cast them.

    Why: the fused loss is an `autograd.Function` whose products write into preallocated buffers (`out=`), which
    autocast does not intercept, so under `torch.autocast(dtype=torch.bfloat16)` the float32 hidden states and
    lm_head weights of a mixed-precision run would be multiplied in float32 (on a CPU with bf16 units, 2.5x the
    time of the bf16 product). Cast here, outside the Function, the casts are recorded by autograd and the gradients
    reach the float32 tensors in float32. A tensor given twice (a teacher lm_head shared with the student's) is cast
    once; None, non-floating tensors and tensors already in the autocast dtype pass through unchanged. A frozen
    `nn.Parameter` (an lm_head tied to the embeddings under LoRA, which cannot be stored in bf16) is cast once for
    all calls while it stays unchanged (`cached_cast`; V x H x 2 bytes for a bf16 lm_head, the copy each step made
    anyway), not once per step.
    """
    first = next((t for t in tensors if t is not None), None)
    dtype = None if first is None else autocast_dtype(first.device.type)
    if dtype is None:
        return tensors
    cast: dict[tuple, torch.Tensor] = {}
    out = []
    for t in tensors:
        if t is not None and t.is_floating_point() and t.dtype != dtype:
            # The same memory (not only the same Python object: a shared head reached through another module) once.
            key = (t.data_ptr(), t.shape, t.stride(), t.requires_grad)
            if key not in cast:
                frozen = isinstance(t, nn.Parameter) and not t.requires_grad
                cast[key] = cached_cast(_FROZEN_CASTS, t, dtype) if frozen else t.to(dtype)
            t = cast[key]
        out.append(t)
    return tuple(out)
