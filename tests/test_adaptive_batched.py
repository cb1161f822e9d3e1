"""Depth-wise batched adaptive decoding equals decoding each sequence alone: tokens, depths, log-probs, KV cache."""

import pytest
import torch
from conftest import make_tiny_model, make_tiny_tokenizer

from loopfit.adaptive import (
    AdaptiveDecoder,
    ExitConfig,
    generate_adaptive,
    generate_adaptive_batch,
    left_pad,
    score_adaptive,
    score_adaptive_batch,
)
from loopfit.convert import Layout, to_looped

R = 6
SEED = 20  # the random adapter's seed: with the thresholds below, rows exit at different iterations (asserted)
LENGTHS = (7, 3, 11, 5)  # different prompt lengths: the batch is left-padded
# Thresholds that give rows exiting at different iterations within one step on these tiny models (asserted below).
CASES = {
    "full": [("kl", 0.02), ("state", 0.3), ("argmax", 1), ("argmax", 2), ("none", None)],
    "compress": [("kl", 0.0005), ("state", 0.1), ("argmax", 2), ("none", None)],
}


def _model(cache_mode):
    src = make_tiny_model("llama", num_layers=4, hidden=32)
    return to_looped(src, Layout([0], [1, 2], [3]), adapter_init="random", cache_mode=cache_mode, seed=SEED).eval()


def _prompts(lengths=LENGTHS, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 260, (n,), generator=g).tolist() for n in lengths]


def _mixed_exits(outs) -> bool:
    """Some step where the rows of the batch used different numbers of iterations."""
    steps = min(len(o.iterations) for o in outs)
    return any(len({o.iterations[k] for o in outs}) > 1 for k in range(steps))


@pytest.mark.parametrize("cache_mode,criterion,threshold", [(m, c, t) for m, cases in CASES.items() for c, t in cases])
def test_batched_equals_one_by_one(cache_mode, criterion, threshold):
    lm, prompts = _model(cache_mode), _prompts()
    x = ExitConfig(criterion, threshold, max_num_steps=R)
    batched = generate_adaptive_batch(lm, prompts, x, max_new_tokens=10)
    for out, p in zip(batched, prompts):
        alone = generate_adaptive(lm, torch.tensor([p]), x, max_new_tokens=10)
        assert out.tokens == alone.tokens
        assert out.iterations == alone.iterations
        assert len(out.tokens) == 10 and len(out.iterations) == 9
    if criterion == "none":
        assert all(o.iterations == [R] * 9 for o in batched)
    else:
        assert _mixed_exits(batched)  # the block really ran on a subset of the rows
        assert min(min(o.iterations) for o in batched) < R


def test_batched_fixed_depth_equals_hf_generate():
    lm, prompts = _model("full"), _prompts()
    ids, mask = left_pad(prompts)
    ref = lm.generate(ids, attention_mask=mask, num_steps=R, max_new_tokens=8, do_sample=False, pad_token_id=0)
    out = generate_adaptive_batch(lm, prompts, ExitConfig("none", max_num_steps=R), max_new_tokens=8)
    assert [o.tokens for o in out] == ref[:, ids.shape[1] :].tolist()


def test_min_num_steps_and_check_every_batched():
    lm, prompts = _model("full"), _prompts()
    x = ExitConfig("argmax", 1, min_num_steps=2, check_every=2, max_num_steps=R)
    batched = generate_adaptive_batch(lm, prompts, x, max_new_tokens=8)
    for out, p in zip(batched, prompts):
        alone = generate_adaptive(lm, torch.tensor([p]), x, max_new_tokens=8)
        assert (out.tokens, out.iterations) == (alone.tokens, alone.iterations)
        assert set(out.iterations) <= {2, 4, R}
    assert _mixed_exits(batched)


@pytest.mark.parametrize("cache_mode", ["full", "compress"])
def test_rows_that_hit_eos_leave_the_batch(cache_mode):
    lm, prompts = _model(cache_mode), _prompts()
    x = ExitConfig("argmax", 2, max_num_steps=R)
    free = [generate_adaptive(lm, torch.tensor([p]), x, max_new_tokens=10) for p in prompts]
    eos = free[1].tokens[3]  # a token row 1 produces mid-way: it (and any row producing it) stops there
    batched = generate_adaptive_batch(lm, prompts, x, max_new_tokens=10, eos_token_id=eos)
    lengths = [len(o.tokens) for o in batched]
    assert lengths[1] <= 4 and max(lengths) == 10
    for out, p in zip(batched, prompts):
        alone = generate_adaptive(lm, torch.tensor([p]), x, max_new_tokens=10, eos_token_id=eos)
        assert (out.tokens, out.iterations) == (alone.tokens, alone.iterations)
        assert len(out.iterations) == len(out.tokens) - 1


@pytest.mark.parametrize("cache_mode", ["full", "compress"])
def test_cache_rows_equal_their_one_sequence_caches(cache_mode):
    """Every slot of every row holds what the row's own decoder holds, skipped iterations' copies included."""
    lm, prompts = _model(cache_mode), _prompts()
    x = ExitConfig(*CASES[cache_mode][1], max_num_steps=R)
    ids, mask = left_pad(prompts)
    dec = AdaptiveDecoder(lm, x)
    dec.prefill(ids, mask)
    feed = torch.tensor([[10, 20, 30, 40], [50, 60, 70, 80], [90, 100, 110, 120], [5, 6, 7, 8]])
    used = torch.stack([dec.step(feed[:, k])[1] for k in range(feed.shape[1])], 1)
    assert len(used.unique()) > 1
    for b, p in enumerate(prompts):
        one = AdaptiveDecoder(lm, x)
        one.prefill(torch.tensor([p]))
        assert torch.equal(torch.stack([one.step(feed[b, k : k + 1])[1][0] for k in range(feed.shape[1])]), used[b])
        pad = ids.shape[1] - len(p)
        assert len(dec.cache.layers) == len(one.cache.layers)
        for big, small in zip(dec.cache.layers, one.cache.layers):
            torch.testing.assert_close(big.keys[b, :, pad:], small.keys[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(big.values[b, :, pad:], small.values[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cache_mode", ["full", "compress"])
def test_score_batched_equals_one_by_one(cache_mode):
    lm = _model(cache_mode)
    ids = torch.randint(4, 260, (4, 14), generator=torch.Generator().manual_seed(3))
    x = ExitConfig(*CASES[cache_mode][0], max_num_steps=R)
    batched = score_adaptive_batch(lm, ids, 4, x)
    for b, out in enumerate(batched):
        alone = score_adaptive(lm, ids[b : b + 1], 4, x)
        assert out.tokens == alone.tokens == ids[b, 4:].tolist()
        assert out.iterations == alone.iterations
        assert out.logprobs == pytest.approx(alone.logprobs, abs=1e-4)
    assert _mixed_exits(batched)
    if cache_mode == "compress":
        return  # compress mode's cache only approximates the uncached forward
    fixed = score_adaptive_batch(lm, ids, 4, ExitConfig("none", max_num_steps=R))
    with torch.no_grad():
        logp = lm(ids, num_steps=R).logits.log_softmax(-1)
    for b, out in enumerate(fixed):
        assert out.logprobs == pytest.approx([logp[b, t - 1, ids[b, t]].item() for t in range(4, 14)], abs=1e-4)


def test_generate_command_batches_prompts(tmp_path, capsys):
    from loopfit.cli import main

    folder = tmp_path / "m"
    _model("full").save_pretrained(folder)
    make_tiny_tokenizer().save_pretrained(folder)
    prompts = ["hello", "a much longer prompt than the first", "12*7", "x"]
    args = ["--num_steps", "4", "--max_new_tokens", "5", "--exit_criterion", "argmax", "--exit_threshold", "1"]
    lines = {}
    for size in ("1", "3"):
        main(["generate", str(folder), *[a for p in prompts for a in ("--prompt", p)], *args, "--batch_size", size])
        lines[size] = capsys.readouterr().out.strip().splitlines()
    assert len(lines["1"]) == 4 and all("of 4 iterations]" in line for line in lines["1"])
    assert lines["1"] == lines["3"]  # batches of 3 (and a last one of 1) print what one at a time prints
