"""Pieces of the looped model below the loop itself: source attention types, the loop adapter, the KV-cache slot
view, and the names the installed transformers gives the cache argument and activation checkpointing."""

from __future__ import annotations

import inspect
from functools import partial

import torch
from torch import nn
from transformers.cache_utils import Cache
from transformers.masking_utils import create_causal_mask

# transformers 5.24 renamed the KV-cache argument of the mask builders and the output field from `past_key_values`
# to `cache`; older releases in our range only know the old name. Resolved once, from the installed version's API.
_MASK_CACHE_KW = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"
ATTENTION_TYPES = ("full_attention", "sliding_attention")
COMPILED_MARK = "_loopfit_compiled"  # set on a decoder layer whose forward `compile_loop` compiled


def enable_activation_checkpointing(model) -> None:
    """Recompute each decoder layer's activations in the backward pass instead of storing them (non-reentrant),
    on any HF model, looped or not (for a looped model every loop iteration is recomputed with its own iteration
    state: `LoopedPreTrainedModel._set_gradient_checkpointing`).

    transformers 5.24 renamed `gradient_checkpointing_enable` to `activation_checkpointing_enable` and deprecates
    the old name (removed in v6); older releases in our range have only the old one.
    """
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def attention_types(base_config) -> list[str]:
    """The attention type of every source layer: `full_attention` or `sliding_attention`.

    Read from the config's per-layer `layer_types` where it has them (Qwen2, Qwen3, ...); otherwise one
    `sliding_window` for all layers (Mistral) makes every layer sliding. Raises `ValueError` for another type
    (e.g. chunked or linear attention), which the loop does not support.
    """
    n = base_config.num_hidden_layers
    types = getattr(base_config, "layer_types", None)
    if types:
        types = list(types)
    elif getattr(base_config, "sliding_window", None) is not None and getattr(base_config, "use_sliding_window", True):
        types = ["sliding_attention"] * n
    else:
        types = ["full_attention"] * n
    bad = sorted(set(types) - set(ATTENTION_TYPES))
    if bad:
        raise ValueError(f"attention type(s) {bad} of the source model are not supported; supported: {ATTENTION_TYPES}")
    return types


class LoopAdapter(nn.Linear):
    """`Linear(2h -> h)` that merges the recurrent state with the prelude output: input is `concat[s, e]`."""

    def __init__(self, hidden_size: int):
        super().__init__(2 * hidden_size, hidden_size, bias=False)


class _CacheSlot:
    """Routes a decoder layer's KV-cache writes to slot `slot` of a shared cache.

    The same layer module runs once per loop iteration, and its attention writes to `self.layer_idx`; this view
    gives each (iteration, layer) pair its own slot (full mode) or makes later iterations overwrite the entries the
    first one wrote for the current tokens (compress mode).
    """

    def __init__(self, cache: Cache, slot: int, overwrite: bool):
        self.cache, self.slot, self.overwrite = cache, slot, overwrite

    def update(self, key_states, value_states, layer_idx=None, *args, **kwargs):
        if self.overwrite:
            # A cache that stages the current tokens' entries itself (adaptive decoding's `_StagedCache`) says how
            # to replace them; a plain cache has them appended at its end, to be cut.
            replace = getattr(self.cache, "replace_current", None) or partial(_replace_current, self.cache)
            return replace(key_states, value_states, self.slot, *args, **kwargs)
        return self.cache.update(key_states, value_states, self.slot, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.cache, name)


class _CompiledCacheSlot(_CacheSlot):
    """`_CacheSlot` under torch.compile (`loopfit.models.compiled`): the write is a graph break run eagerly, so the
    slot number is no guard and one graph serves every (iteration, layer) slot instead of one compilation per slot.
    Eager code uses `_CacheSlot`, whose write skips the disabled function's wrapper (~30 calls per decoded token)."""

    update = torch.compiler.disable(_CacheSlot.update)


def cache_slot(layer: nn.Module, cache: Cache, slot: int, overwrite: bool) -> _CacheSlot:
    """The view of `cache` that routes `layer`'s writes to `slot`: a `_CompiledCacheSlot` for a layer whose forward
    `loopfit.models.compiled.compile_loop` compiled (marked `COMPILED_MARK`), a `_CacheSlot` otherwise."""
    cls = _CompiledCacheSlot if layer.__dict__.get(COMPILED_MARK, False) else _CacheSlot
    return cls(cache, slot, overwrite)


def _replace_current(cache: Cache, key_states, value_states, slot: int, *args, **kwargs):
    """Replace slot `slot`'s entries for the current `key_states.shape[-2]` tokens (the last ones) of `cache`."""
    layer = cache.layers[slot]
    q = key_states.shape[-2]
    layer.keys, layer.values = layer.keys[..., :-q, :], layer.values[..., :-q, :]
    return cache.update(key_states, value_states, slot, *args, **kwargs)


def _pop_cache(cache, kwargs: dict):
    """The KV cache, passed as `cache` (transformers >= 5.24) or `past_key_values` (older releases)."""
    old = kwargs.pop("past_key_values", None)
    if cache is not None and old is not None and old is not cache:
        raise ValueError("pass the KV cache as `cache` or as `past_key_values`, not both")
    return cache if cache is not None else old
