"""Sliding-window attention of every kind the source declares, and generation in training mode.

Sequences run well past the window, so a layer that ignored its window would drift from the source.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model

from loopfit.convert import Layout, layout_from_sizes, to_looped
from loopfit.models.modeling_looped import attention_types

WINDOW = 8
# One window for all layers (Mistral), per-layer types from max_window_layers (Qwen2), explicit per-layer types.
PATTERNS = {
    "mistral-all": ("mistral", {"sliding_window": WINDOW}),
    "qwen2-max-window-layers": (
        "qwen2",
        {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 3},
    ),
    "qwen2-layer-types": (
        "qwen2",
        {
            "use_sliding_window": True,
            "sliding_window": WINDOW,
            "layer_types": ["sliding_attention", "full_attention"] * 3,
        },
    ),
}


def _source(pattern):
    arch, kw = PATTERNS[pattern]
    return make_tiny_model(arch, **kw)


def _ids(batch, seq, seed=1):
    return torch.randint(3, 260, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _pruned(src, keep: list[int]):
    """The source with only layers `keep` (a plain HF model of the same family)."""
    arch = {"mistral": "mistral", "qwen2": "qwen2"}[src.config.model_type]
    kw = {k: getattr(src.config, k) for k in ("sliding_window", "use_sliding_window", "max_window_layers")
          if hasattr(src.config, k)}  # fmt: skip
    if getattr(src.config, "layer_types", None) and src.config.model_type == "qwen2":
        kw["layer_types"] = [src.config.layer_types[i] for i in keep]
        kw.pop("max_window_layers", None)
    pruned = make_tiny_model(arch, num_layers=len(keep), **kw)
    pruned.model.embed_tokens.load_state_dict(src.model.embed_tokens.state_dict())
    pruned.model.norm.load_state_dict(src.model.norm.state_dict())
    pruned.lm_head.load_state_dict(src.lm_head.state_dict())
    for j, i in enumerate(keep):
        pruned.model.layers[j].load_state_dict(src.model.layers[i].state_dict())
    assert attention_types(pruned.config) == [attention_types(src.config)[i] for i in keep]
    return pruned


@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_attention_types_read_from_the_config(pattern):
    types = attention_types(_source(pattern).config)
    assert len(types) == 6 and "sliding_attention" in types
    if pattern == "qwen2-max-window-layers":
        assert types == ["full_attention"] * 3 + ["sliding_attention"] * 3
    assert attention_types(make_tiny_model("llama").config) == ["full_attention"] * 6


@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("depth", [1, 4])
def test_identity_adapter_matches_source_past_the_window(pattern, depth):
    """4 x the window, padded batch: the identity-adapter loop equals the source (nothing dropped)."""
    src = _source(pattern)
    x = _ids(2, 4 * WINDOW)
    mask = torch.ones_like(x)
    mask[1, :5] = 0  # left padding in the second row
    looped = to_looped(src, layout_from_sizes(6, 2, 2, 2), adapter_init="identity").eval()
    ref = src(x, attention_mask=mask).logits
    got = looped(x, attention_mask=mask, num_steps=depth).logits
    torch.testing.assert_close(got[mask.bool()], ref[mask.bool()], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_pruned_layout_matches_pruned_source_past_the_window(pattern):
    src = _source(pattern)
    x = _ids(2, 4 * WINDOW)
    keep = [0, 4, 5]
    looped = to_looped(src, Layout([0], [4], [5]), adapter_init="identity").eval()
    ref = _pruned(src, keep)(x).logits
    for depth in (1, 3):
        torch.testing.assert_close(looped(x, num_steps=depth).logits, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("cache_mode", ["full", "compress"])
def test_cached_decoding_equals_uncached_past_the_window(pattern, cache_mode):
    """A random adapter decoding 3 x the window: every logit of the cached run equals the uncached run's.

    `full` at R = 3; `compress` (one slot per block layer, overwritten by later iterations, so equal to uncached
    only at R = 1 by design) at R = 1.
    """
    src = _source(pattern)
    looped = to_looped(src, layout_from_sizes(6, 2, 2, 2), adapter_init="random", cache_mode=cache_mode).eval()
    depth = 3 if cache_mode == "full" else 1
    prompt = _ids(1, 6)
    kw = dict(num_steps=depth, max_new_tokens=3 * WINDOW, do_sample=False, output_logits=True,
              return_dict_in_generate=True)  # fmt: skip
    cached = looped.generate(prompt, use_cache=True, **kw)
    uncached = looped.generate(prompt, use_cache=False, **kw)
    assert torch.equal(cached.sequences, uncached.sequences)
    for a, b in zip(cached.logits, uncached.logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_generation_in_training_mode_draws_one_depth_per_call():
    """Train mode, no num_steps, padded batch with an attention mask: one depth for every decoding step."""
    src = make_tiny_model("llama")
    looped = to_looped(src, layout_from_sizes(6, 2, 2, 2), adapter_init="random", mean_recurrence=4).train()
    seen = []
    looped.model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["num_steps"]), with_kwargs=True)
    x = _ids(2, 6)
    mask = torch.ones_like(x)
    mask[0, :2] = 0
    torch.manual_seed(0)
    depths = set()
    for _ in range(6):
        seen.clear()
        out = looped.generate(x, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert out.shape == (2, 11)
        assert len(seen) == 5 and len({tuple(s) if isinstance(s, tuple) else s for s in seen}) == 1
        depths.add(sum(seen[0]) if isinstance(seen[0], tuple) else seen[0])
    assert len(depths) > 1  # still a draw per call: different calls get different depths
