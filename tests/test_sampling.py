"""`loopfit.models.sampling`: batched sampling with a preallocated KV cache decodes what an uncached forward
predicts, token for token, draws from the temperature / nucleus distribution, gives `generate`'s greedy tokens,
and ends rows at EOS as `generate` does."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHS, make_tiny_model
from transformers.cache_utils import DynamicLayer

from loopfit.convert import layout_from_sizes, to_looped
from loopfit.data.packing import left_pad
from loopfit.models.sampling import PreallocatedLayer, draw, sample

pytestmark = pytest.mark.usefixtures("one_thread")
PAD = 0
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]  # left padding of 0, 5 and 3 tokens


def _looped(arch: str = "llama", cache_mode: str = "full"):
    src = make_tiny_model(arch, num_layers=6, hidden=32)
    return to_looped(src, layout_from_sizes(6, 1, 2, 1), mean_recurrence=3, cache_mode=cache_mode).eval()


@pytest.fixture(scope="module")
def looped():
    return _looped()


def _uncached(model, prompts, n, generator, temperature, top_p, num_steps):
    """The reference: every token drawn from a full forward over the padded rows so far, no cache, same draws."""
    ids, mask = left_pad(prompts, PAD)
    out = []
    kw = {} if num_steps is None else {"num_steps": num_steps}
    for _ in range(n):
        pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, **kw).logits[:, -1]
        tok = draw(logits, generator, temperature, top_p)
        out.append(tok)
        ids, mask = torch.cat([ids, tok[:, None]], 1), torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return torch.stack(out, 1)


@pytest.mark.parametrize("kind", ["looped-full", "looped-compress", "plain"])
def test_samples_are_what_an_uncached_forward_draws(kind):
    if kind == "plain":
        model, num_steps = make_tiny_model("llama", num_layers=4, hidden=32), None
    else:
        model, num_steps = _looped(cache_mode=kind.split("-")[1]), 3
    ids, mask = left_pad(PROMPTS, PAD)
    got = sample(model, ids, mask, 12, [], PAD, torch.Generator().manual_seed(3), 0.8, 0.95, num_steps)
    if kind == "looped-compress":
        # Huginn's compressed cache keeps one slot per block layer (the last iteration's entries), so an uncached
        # forward is not the reference: the same decoding through the default cache `generate` uses is.
        want = _compress_reference(model, ids, mask, 12, 0.8, 0.95)
    else:
        want = _uncached(model, PROMPTS, 12, torch.Generator().manual_seed(3), 0.8, 0.95, num_steps)
    assert torch.equal(got, want)
    assert len(set(got.flatten().tolist())) > 3  # really sampled, not a constant


def _compress_reference(model, ids, mask, n, temperature, top_p):
    """Compress mode through `generate`'s own cache (a `DynamicCache`), step by step with the same draws."""
    from transformers.cache_utils import DynamicCache

    g = torch.Generator().manual_seed(3)
    cache, out = DynamicCache(), []
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True,
                       num_steps=3).logits[:, -1]  # fmt: skip
        pos = pos[:, -1:]
        for _ in range(n):
            tok = draw(logits, g, temperature, top_p)
            out.append(tok)
            mask, pos = torch.cat([mask, torch.ones_like(mask[:, :1])], 1), pos + 1
            logits = model(input_ids=tok[:, None], attention_mask=mask, position_ids=pos, cache=cache,
                           use_cache=True, num_steps=3).logits[:, -1]  # fmt: skip
    return torch.stack(out, 1)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_greedy_gives_generates_tokens_for_every_family(arch):
    model = _looped(arch)
    ids, mask = left_pad(PROMPTS, PAD)
    got = sample(model, ids, mask, 10, [], PAD, num_steps=2, do_sample=False)
    with torch.no_grad():
        want = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=10,
                              min_new_tokens=10, pad_token_id=PAD, eos_token_id=None, num_steps=2)  # fmt: skip
    assert torch.equal(got, want[:, ids.shape[1] :])


def test_plain_model_greedy_gives_generates_tokens():
    model = make_tiny_model("gemma2", num_layers=4, hidden=32)  # sliding-window layers: the config's own cache
    ids, mask = left_pad(PROMPTS, PAD)
    got = sample(model, ids, mask, 10, [], PAD, do_sample=False)
    with torch.no_grad():
        want = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=10,
                              min_new_tokens=10, pad_token_id=PAD, eos_token_id=None)  # fmt: skip
    assert torch.equal(got, want[:, ids.shape[1] :])


def test_rows_end_at_their_first_eos_and_the_call_ends_with_the_last_row(looped):
    ids, mask = left_pad(PROMPTS, PAD)
    free = sample(looped, ids, mask, 10, [], PAD, torch.Generator().manual_seed(0), num_steps=3)
    eos = int(free[0, 2])
    first = [row.index(eos) if eos in row else None for row in free.tolist()]
    got = sample(looped, ids, mask, 10, [eos], PAD, torch.Generator().manual_seed(0), num_steps=3)
    for i, f in enumerate(first):
        if f is None:
            assert got[i].tolist() == free[i, : got.shape[1]].tolist()
        else:
            assert got[i, : f + 1].tolist() == free[i, : f + 1].tolist()
            assert (got[i, f + 1 :] == PAD).all()
    if all(f is not None for f in first):
        assert got.shape[1] == max(first) + 1
    every = sample(looped, ids, mask, 10, list(range(260)), PAD, torch.Generator().manual_seed(0), num_steps=3)
    assert every.shape == (3, 1)  # every token ends a row: one token each


def test_draw_follows_the_temperature_and_nucleus_distribution():
    n = 40_000
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, float("-inf")])
    g = torch.Generator().manual_seed(0)
    for temperature, top_p in [(1.0, 1.0), (0.5, 1.0), (1.5, 0.8)]:
        probs = (logits / temperature).softmax(-1)
        ranked = probs.sort(descending=True)
        keep = torch.zeros_like(probs, dtype=torch.bool)
        keep[ranked.indices[(ranked.values.cumsum(0) - ranked.values) < top_p]] = True
        want = torch.where(keep, probs, 0.0)
        want = want / want.sum()
        tokens = draw(logits.expand(n, -1), g, temperature, top_p)
        freq = torch.bincount(tokens, minlength=len(logits)).double() / n
        assert freq[-1] == 0 and (freq[~keep] == 0).all()  # probability 0 or outside the nucleus: never drawn
        torch.testing.assert_close(freq, want.double(), atol=0.012, rtol=0)  # ~4 standard errors at p = 0.5
    assert 0 < int(keep.sum()) < 5  # the last case cut the tail


def test_draw_is_reproducible_from_the_generator_and_refuses_nan():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(1))
    a = draw(logits, torch.Generator().manual_seed(7))
    b = draw(logits, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    state = torch.get_rng_state()
    draw(logits, torch.Generator().manual_seed(7))
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is not touched
    with pytest.raises(ValueError, match="not finite"):
        draw(torch.full((2, 5), float("nan")))


def test_sample_restores_training_mode_and_leaves_the_global_rng(looped):
    ids, mask = left_pad(PROMPTS, PAD)
    looped.train()
    state = torch.get_rng_state()
    try:
        a = sample(looped, ids, mask, 6, [], PAD, torch.Generator().manual_seed(5), num_steps=2)
        assert looped.training
        assert torch.equal(state, torch.get_rng_state())
        b = sample(looped, ids, mask, 6, [], PAD, torch.Generator().manual_seed(5), num_steps=2)
        assert torch.equal(a, b)  # eval mode inside: no training-mode state noise or depth draw
    finally:
        looped.eval()


def test_preallocated_layer_returns_what_a_dynamic_layer_returns():
    g = torch.Generator().manual_seed(0)

    def kv(batch, new):
        return torch.randn(batch, 2, new, 4, generator=g), torch.randn(batch, 2, new, 4, generator=g)

    ours, ref = PreallocatedLayer(capacity=8), DynamicLayer()

    def same():
        assert ours.get_seq_length() == ref.get_seq_length()
        assert ours.get_mask_sizes(1) == ref.get_mask_sizes(1)
        if ref.get_seq_length():
            assert torch.equal(ours.keys, ref.keys) and torch.equal(ours.values, ref.values)

    for step in [5, 1, 1]:  # prefill, then decoding inside the buffer
        k, v = kv(3, step)
        got, want = ours.update(k, v), ref.update(k, v)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
        same()
    buffer = ours.keys.data_ptr()
    ours.crop(-2), ref.crop(-2)  # compress mode's overwrite of the current token cuts then writes again
    same()
    k, v = kv(3, 1)
    ours.update(k, v), ref.update(k, v)
    same()
    assert ours.keys.data_ptr() == buffer  # written in place, no new allocation
    k, v = kv(3, 4)  # past the capacity (5 + 4 > 8): moved to a larger buffer, past kept
    ours.update(k, v), ref.update(k, v)
    same()
    rows = torch.tensor([2, 0])
    ours.batch_select_indices(rows), ref.batch_select_indices(rows)
    k, v = kv(2, 1)
    ours.update(k, v), ref.update(k, v)  # keys replaced by a selection: moved back into a buffer of its own
    same()
    ours.reset(), ref.reset()
    k, v = kv(2, 3)
    ours.update(k, v), ref.update(k, v)
    same()


def test_bad_temperature_or_top_p_is_refused_before_any_work(looped):
    logits = torch.randn(2, 10)
    for temperature, top_p in [(0.0, 1.0), (-1.0, 1.0), (1.0, 0.0), (1.0, 1.5), (float("nan"), 1.0)]:
        with pytest.raises(ValueError, match="temperature must be > 0 and top_p in"):
            draw(logits, None, temperature, top_p)
    ids, mask = left_pad(PROMPTS, PAD)
    with pytest.raises(ValueError, match="top_p"):
        sample(looped, ids, mask, 4, [], PAD, top_p=0.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        sample(looped, ids, mask, 0, [], PAD)
    assert sample(looped, ids, mask, 3, [], PAD, top_p=0.0, do_sample=False).shape == (3, 3)  # greedy: unused
