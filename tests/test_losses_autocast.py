"""The casts the fused loss and the shared linear inputs make where autocast cannot: which dtype, once per tensor,
reused while unchanged."""

from __future__ import annotations

import torch
from torch.utils.weak import WeakIdKeyDictionary

from loopfit.losses.autocast import autocast_dtype, autocast_operands, cached_cast


def test_autocast_dtype_is_none_outside_autocast():
    assert autocast_dtype("cpu") is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert autocast_dtype("cpu") is torch.bfloat16
        with torch.autocast("cpu", enabled=False):
            assert autocast_dtype("cpu") is None


def test_cached_cast_reuses_until_the_tensor_or_the_dtype_changes():
    cache = WeakIdKeyDictionary()
    x = torch.randn(3, 4, requires_grad=True)
    first = cached_cast(cache, x, torch.bfloat16)
    assert not first.requires_grad and torch.equal(first, x.detach().bfloat16())
    assert cached_cast(cache, x, torch.bfloat16) is first
    half = cached_cast(cache, x, torch.float16)
    assert half.dtype == torch.float16 and cached_cast(cache, x, torch.bfloat16) is not first
    with torch.no_grad():
        x.add_(1)
    assert torch.equal(cached_cast(cache, x, torch.bfloat16), x.detach().bfloat16())
    del x
    assert len(cache) == 0  # weakly keyed: gone with the tensor


def test_cached_cast_is_fresh_after_two_data_assignments():
    """`.data =` twice between two casts: without the entry holding its storage, the allocator hands the second
    tensor the first's freed address (every time here, glibc's malloc) with the version unchanged."""
    cache = WeakIdKeyDictionary()
    p = torch.nn.Parameter(torch.zeros(64, 64), requires_grad=False)
    for i in range(1, 21):
        cached_cast(cache, p, torch.bfloat16)
        p.data = torch.full((64, 64), float(i))
        p.data = torch.full((64, 64), i + 0.5)
        assert torch.equal(cached_cast(cache, p, torch.bfloat16), torch.full((64, 64), i + 0.5, dtype=torch.bfloat16))


def test_autocast_operands_casts_each_memory_once_and_nothing_outside_autocast():
    w = torch.randn(8, 4)
    h = torch.randn(3, 4, requires_grad=True)
    ids = torch.arange(3)
    assert autocast_operands(h, w, None, ids) == (h, w, None, ids)  # autocast off: the very same tensors
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ch, cw, none, cids, cw2, cview = autocast_operands(h, w, None, ids, w, w.detach())
    assert ch.dtype == cw.dtype == torch.bfloat16 and ch.requires_grad and not cw.requires_grad
    assert cw2 is cw and cview is cw  # a shared head (the same memory, another tensor object) is cast once
    assert none is None and cids is ids


def test_autocast_operands_keeps_a_frozen_parameters_cast_until_it_changes():
    """A frozen `nn.Parameter` (a tied lm_head under LoRA) is cast once across calls; an in-place update, a new
    storage (`.data =`) or a trainable parameter gets a fresh cast; the values are always the parameter's now."""
    w = torch.nn.Parameter(torch.randn(8, 4), requires_grad=False)
    trainable = torch.nn.Parameter(torch.randn(8, 4))
    h = torch.randn(3, 4)

    def cast(p):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return autocast_operands(h, p)[1]

    first = cast(w)
    assert cast(w) is first and torch.equal(first, w.bfloat16())
    with torch.no_grad():
        w.mul_(2)
    second = cast(w)
    assert second is not first and torch.equal(second, w.bfloat16())
    w.data = torch.randn(8, 4)
    third = cast(w)
    assert third is not second and torch.equal(third, w.bfloat16())
    a = cast(trainable)
    assert a.requires_grad and cast(trainable) is not a
