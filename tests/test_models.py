"""The looped model: parity with the source, depth behaviour, round trips, caching, truncated backprop."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model, make_tiny_tokenizer
from transformers import AutoModelForCausalLM, pipeline

from loopfit.convert import Layout, layout_from_sizes, to_looped
from loopfit.models import LoopedConfig, LoopedForCausalLM, parse_num_steps, sample_num_steps


def _cache_of(out):
    """The KV cache of an output: field `cache` from transformers 5.24 on, `past_key_values` before."""
    return out["cache"] if "cache" in out else out["past_key_values"]


def _inputs(batch=2, seq=12, vocab=260, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, seq), generator=g)


@pytest.mark.parametrize("depth", [1, 4])
def test_identity_adapter_reproduces_source(arch, depth):
    src = make_tiny_model(arch)
    x = _inputs()
    looped = to_looped(src, layout_from_sizes(6, 2, 2, 2), adapter_init="identity").eval()
    torch.testing.assert_close(looped(x, num_steps=depth).logits, src(x).logits)


def test_identity_adapter_reproduces_pruned_model():
    """With layers dropped, the identity adapter computes the pruned model (layers 0,1,4,5) at any depth."""
    src = make_tiny_model("llama")
    x = _inputs()
    ref = src(x, output_hidden_states=True)
    looped = to_looped(src, Layout([0], [4], [5]), adapter_init="identity").eval()
    pruned = make_tiny_model("llama", num_layers=3)
    pruned.model.embed_tokens.load_state_dict(src.model.embed_tokens.state_dict())
    pruned.model.norm.load_state_dict(src.model.norm.state_dict())
    for j, i in enumerate([0, 4, 5]):
        pruned.model.layers[j].load_state_dict(src.model.layers[i].state_dict())
    assert ref.logits.shape == pruned(x).logits.shape
    for depth in (1, 3):
        torch.testing.assert_close(looped(x, num_steps=depth).logits, pruned(x).logits)


def test_random_adapter_depth_changes_output(arch):
    src = make_tiny_model(arch)
    x = _inputs()
    looped = to_looped(src, layout_from_sizes(6, 2, 2, 2), adapter_init="random").eval()
    a, b = looped(x, num_steps=1).logits, looped(x, num_steps=4).logits
    assert (a - b).abs().max() > 1e-3
    torch.testing.assert_close(looped(x, num_steps=4).logits, b)  # eval mode is deterministic


@pytest.mark.parametrize("state_init", ["normal", "zeros", "embed"])
def test_state_init_deterministic_in_eval(state_init):
    src = make_tiny_model("llama")
    looped = to_looped(src, layout_from_sizes(6, 2, 2, 2), adapter_init="random", state_init=state_init).eval()
    x = _inputs()
    torch.testing.assert_close(looped(x, num_steps=3).logits, looped(x, num_steps=3).logits)


def test_save_load_round_trip_and_pipeline(tmp_path):
    src = make_tiny_model("qwen2")
    looped = to_looped(src, layout_from_sizes(6, 1, 3, 2), adapter_init="random", mean_recurrence=3).eval()
    looped.save_pretrained(tmp_path)
    make_tiny_tokenizer().save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, LoopedForCausalLM)
    assert loaded.config.block_layers == [1, 2, 3] and loaded.config.mean_recurrence == 3
    for k, v in looped.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v, rtol=0, atol=0)
    x = _inputs()
    torch.testing.assert_close(loaded(x, num_steps=5).logits, looped(x, num_steps=5).logits, rtol=0, atol=0)
    pipe = pipeline("text-generation", model=str(tmp_path))
    out = pipe("Hello", max_new_tokens=4, do_sample=False)
    assert isinstance(out[0]["generated_text"], str)


def test_tied_and_untied_embeddings():
    src = make_tiny_model("llama", tie=True)
    tied = to_looped(src, layout_from_sizes(6, 2, 2, 2))
    assert tied.lm_head.weight.data_ptr() == tied.model.embed_tokens.weight.data_ptr()
    untied = to_looped(src, layout_from_sizes(6, 2, 2, 2), untie_embeddings=True)
    assert untied.lm_head.weight.data_ptr() != untied.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(untied.lm_head.weight, untied.model.embed_tokens.weight)


@pytest.mark.parametrize("depth", [1, 3])
def test_cached_generation_equals_uncached(depth):
    src = make_tiny_model("llama")
    looped = to_looped(src, layout_from_sizes(6, 2, 2, 2), adapter_init="random").eval()
    x = _inputs(batch=1, seq=8)
    assert (looped(x, num_steps=1).logits - looped(x, num_steps=3).logits).abs().max() > 1e-3
    cached = looped.generate(x, num_steps=depth, max_new_tokens=10, do_sample=False, use_cache=True)
    uncached = looped.generate(x, num_steps=depth, max_new_tokens=10, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_compress_cache_constant_memory():
    src = make_tiny_model("llama")
    looped = to_looped(src, layout_from_sizes(6, 2, 2, 2), adapter_init="random", cache_mode="compress").eval()
    x = _inputs(batch=1, seq=8)
    cache = _cache_of(looped(x, num_steps=5, use_cache=True))
    assert len(cache.layers) == 2 + 2 + 2  # one slot per distinct layer, whatever the depth
    assert cache.get_seq_length() == 8
    full = to_looped(src, layout_from_sizes(6, 2, 2, 2), adapter_init="random").eval()
    assert len(_cache_of(full(x, num_steps=5, use_cache=True)).layers) == 2 + 2 + 5 * 2
    ids = looped.generate(x, num_steps=3, max_new_tokens=6, do_sample=False)
    assert ids.shape == (1, 14)


def test_truncated_backprop_gradients_match_detached_run():
    src = make_tiny_model("llama")
    looped = to_looped(src, layout_from_sizes(6, 2, 2, 2), adapter_init="random", state_init="zeros").train()
    x = _inputs()
    looped.zero_grad()
    out = looped(x, num_steps=(3, 2), labels=x)
    assert out.num_steps == (3, 2)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in looped.named_parameters() if p.grad is not None}

    # Reference: run 3 iterations detached by hand, then 2 with gradients.
    looped.zero_grad()
    m = looped.model
    x_emb = m.embed_tokens(x)
    ctx = m.prepare(x_emb)
    e = m.run_prelude(x_emb, ctx)
    s = torch.zeros_like(e)
    for it in range(5):
        s = m.iterate(s, e, it, ctx)
        if it < 3:
            s = s.detach()
    logits = looped.lm_head(m.run_coda(s, ctx))
    loss = looped.loss_function(logits=logits, labels=x, vocab_size=looped.config.vocab_size)
    torch.testing.assert_close(loss, out.loss)
    loss.backward()
    for n, p in looped.named_parameters():
        if p.grad is not None or n in grads:
            torch.testing.assert_close(p.grad, grads[n], msg=n)


def test_no_grad_iterations_do_not_keep_activations():
    """Peak autograd memory does not grow with the number of no-grad iterations."""
    src = make_tiny_model("llama", hidden=64)
    looped = to_looped(src, layout_from_sizes(6, 2, 2, 2), adapter_init="random").train()
    x = _inputs(batch=4, seq=64)

    def saved_bytes(steps):
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            looped(x, num_steps=steps).logits.sum()
        return total

    assert saved_bytes((0, 2)) == saved_bytes((6, 2))
    assert saved_bytes((0, 4)) > saved_bytes((0, 2))


def test_training_mode_samples_depth():
    src = make_tiny_model("llama")
    looped = to_looped(src, layout_from_sizes(6, 2, 2, 2), mean_recurrence=4).train()
    torch.manual_seed(0)
    depths = {sum(looped(_inputs(), labels=_inputs()).num_steps) for _ in range(8)}
    assert len(depths) > 1


def test_sampler_mean_and_backprop_depth():
    g = torch.Generator().manual_seed(0)
    draws = [sample_num_steps(8, 4, g) for _ in range(4000)]
    r = torch.tensor([n + k for n, k in draws], dtype=torch.float64)
    # E[R] = E[Poisson(rate)] + 1 = mean + 1 (the lognormal's mean is exactly `mean`)
    assert abs(r.mean().item() - 9.0) < 0.25
    assert all(k == min(4, n + k) for n, k in draws)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert [sample_num_steps(4, 8, g1) for _ in range(20)] == [sample_num_steps(4, 8, g2) for _ in range(20)]


def test_parse_num_steps_and_config_validation():
    assert parse_num_steps(4) == (0, 4)
    assert parse_num_steps((2, 3)) == (2, 3)
    for bad in (0, -1, (0, 0), (1, 2, 3)):
        with pytest.raises(ValueError):
            parse_num_steps(bad)
    src = make_tiny_model("llama")
    with pytest.raises(ValueError, match="out of range"):
        LoopedConfig(base_config=src.config, prelude_layers=[0], block_layers=[9], coda_layers=[5])
    with pytest.raises(ValueError, match="more than once"):
        LoopedConfig(base_config=src.config, prelude_layers=[0, 1], block_layers=[1, 2], coda_layers=[5])
    with pytest.raises(ValueError, match="state_init"):
        LoopedConfig(base_config=src.config, block_layers=[1], state_init="bogus")
