"""`loopfit.models.graphed`: fixed-depth decoding on a static KV cache, its one-token step replayed from a CUDA graph.

On CPU the decoder runs the same step eagerly (`use_graph=False`), and that is compared with `model.generate` token
for token: left padding, both cache modes, sliding windows, eager and sdpa attention, every state init, relaxed
blocks, end-of-sequence handling, sampling with a seeded RNG, reuse across calls. The CUDA tests (skipped without a
GPU) compare the graph's replays with the eager step bit for bit and with `model.generate`.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model

from loopfit.convert import layout_from_sizes, to_looped
from loopfit.models.graphed import GraphedDecoder, graph_unsupported

pytestmark = pytest.mark.usefixtures("one_thread")
CUDA = torch.cuda.is_available()


def _looped(arch="llama", init="zeros", mode="full", device="cpu", **kw):
    src = make_tiny_model(arch, num_layers=6, **kw)
    model = to_looped(src, layout_from_sizes(6, 1, 3, 2), state_init=init).eval().to(device)
    model.config.cache_mode = mode
    return model


def _batch(rows=3, length=7, seed=0, device="cpu"):
    """Left-padded prompts: row 0 has 3 padding tokens, row 1 one, the rest none."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 250, (rows, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    if rows > 1:
        mask[1, :1] = 0
    ids[mask == 0] = 0
    return ids.to(device), mask.to(device)


def _reference(model, ids, mask, new, r, **kw):
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, num_steps=r, pad_token_id=0, **kw)
    return out[:, ids.shape[1] :]


@pytest.mark.parametrize(
    "arch, init, mode, extra",
    [
        ("llama", "zeros", "full", {}),
        ("mistral", "normal", "full", {"sliding_window": 4}),  # sliding masks; host-side state noise
        ("gemma2", "embed", "compress", {}),  # eager attention (additive masks), soft-capping, overwritten slots
        ("qwen3", "zeros", "compress", {}),
        ("phi3", "normal", "full", {}),
    ],
)  # fmt: skip
def test_static_decoding_equals_generate(arch, init, mode, extra):
    model = _looped(arch, init, mode, **extra)
    ids, mask = _batch()
    want = _reference(model, ids, mask, 12, 3)
    dec = GraphedDecoder(model, batch_size=3, max_len=32, num_steps=3, use_graph=False)
    assert torch.equal(dec.generate(ids, mask, max_new_tokens=12), want)
    # Reused for other prompts of another length: the cache and positions start over.
    ids2, mask2 = _batch(length=11, seed=1)
    assert torch.equal(dec.generate(ids2, mask2, max_new_tokens=9), _reference(model, ids2, mask2, 9, 3))


def test_relaxed_block_equals_generate():
    src = make_tiny_model("llama", num_layers=10)
    model = to_looped(src, layout_from_sizes(10, 1, 2, 1), relaxation_rank=4).eval()
    ids, mask = _batch(rows=2)
    dec = GraphedDecoder(model, batch_size=2, max_len=24, num_steps=5, use_graph=False)
    assert torch.equal(dec.generate(ids, mask, max_new_tokens=10), _reference(model, ids, mask, 10, 5))


def test_end_of_sequence_pads_finished_rows_and_stops_when_all_have():
    model = _looped()
    ids, mask = _batch()
    free = _reference(model, ids, mask, 12, 2)
    eos = int(free[0, 4])  # a token row 0 emits at step 4: the rows finish at different steps (or never)
    want = _reference(model, ids, mask, 12, 2, eos_token_id=eos)
    dec = GraphedDecoder(model, batch_size=3, max_len=32, num_steps=2, use_graph=False)
    got = dec.generate(ids, mask, max_new_tokens=12, eos_token_id=[eos], pad_token_id=0)
    assert torch.equal(got, want)
    assert (got[0, 5:] == 0).all()


def test_sampling_draws_what_generate_draws_from_the_same_seed():
    model = _looped()
    ids, mask = _batch()
    torch.manual_seed(3)
    want = _reference(model, ids, mask, 10, 2, do_sample=True, temperature=0.7, top_k=None, top_p=None)
    dec = GraphedDecoder(model, batch_size=3, max_len=32, num_steps=2, use_graph=False)
    torch.manual_seed(3)
    assert torch.equal(dec.generate(ids, mask, max_new_tokens=10, do_sample=True, temperature=0.7), want)


def test_refusals():
    plain = make_tiny_model("llama", num_layers=2)
    assert "plain model" in graph_unsupported(plain, "cuda")
    model = _looped()
    assert "CUDA GPU" in graph_unsupported(model, "cpu")
    assert graph_unsupported(model) is None  # the model alone: the eager static step runs anywhere
    assert "plain model" in graph_unsupported(plain)
    with pytest.raises(ValueError, match="CUDA GPU"):
        GraphedDecoder(model, 2, 16, 2)  # use_graph on a CPU model
    model.config.base_config._attn_implementation = "flash_attention_2"
    assert "sdpa or eager" in graph_unsupported(model, "cuda")
    model.config.base_config._attn_implementation = "sdpa"
    dec = GraphedDecoder(model, 3, 16, 2, use_graph=False)
    ids, mask = _batch()
    with pytest.raises(ValueError, match="3 rows of 16 tokens"):
        dec.generate(ids, mask, max_new_tokens=10)  # 7 + 10 > 16
    with pytest.raises(ValueError, match="3 rows"):
        dec.generate(ids[:2], mask[:2], max_new_tokens=2)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode, init", [("full", "zeros"), ("compress", "normal")])
def test_cuda_graph_replays_equal_the_eager_step_and_generate(mode, init):
    model = _looped("llama", init, mode, device="cuda")
    ids, mask = _batch(device="cuda")
    graphed = GraphedDecoder(model, 3, 64, 3, use_graph=True)
    eager = GraphedDecoder(model, 3, 64, 3, use_graph=False)
    got = graphed.generate(ids, mask, max_new_tokens=20)
    assert graphed.graph is not None  # the steps after the first were replays
    assert torch.equal(got, eager.generate(ids, mask, max_new_tokens=20))  # the same kernels: the same bits
    assert torch.equal(got, _reference(model, ids, mask, 20, 3))
    ids2, mask2 = _batch(length=13, seed=1, device="cuda")  # the captured graph serves the next call
    assert torch.equal(graphed.generate(ids2, mask2, max_new_tokens=20), _reference(model, ids2, mask2, 20, 3))


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cli_cuda_graphs_prints_what_eager_prints(tmp_path, capsys):
    from conftest import make_tiny_tokenizer

    from loopfit.cli import main

    model = _looped()
    model.save_pretrained(tmp_path / "m")
    make_tiny_tokenizer().save_pretrained(tmp_path / "m")
    argv = ["generate", str(tmp_path / "m"), "--prompt", "abc", "--prompt", "hello there", "--max_new_tokens", "8",
            "--device", "cuda", "--num_steps", "3"]  # fmt: skip
    main(argv)
    eager = capsys.readouterr().out
    main([*argv, "--cuda_graphs=true"])
    assert capsys.readouterr().out == eager


def test_generate_text_through_the_decoder_pool_prints_what_generate_prints(monkeypatch):
    """`generate_text(..., graphs=pool)` (the path of `--cuda_graphs=true`), run here with the eager step: the same
    texts as `model.generate`, one decoder per (batch, cache length, R), reused by a second call."""
    import functools

    from conftest import make_tiny_tokenizer

    from loopfit import generate as gen

    monkeypatch.setattr(gen, "GraphedDecoder", functools.partial(GraphedDecoder, use_graph=False))
    model, tok = _looped(), make_tiny_tokenizer()
    model.generation_config.eos_token_id = 2
    prompts = ["abc", "hello there", "x"]
    want = gen.generate_text(model, tok, prompts, num_steps=3, max_new_tokens=10)
    pool = {}
    assert gen.generate_text(model, tok, prompts, num_steps=3, max_new_tokens=10, graphs=pool) == want
    assert list(pool) == [(3, 128, 3)]
    assert gen.generate_text(model, tok, prompts[:1] * 3, num_steps=3, max_new_tokens=10, graphs=pool) == (
        gen.generate_text(model, tok, prompts[:1] * 3, num_steps=3, max_new_tokens=10)
    )
    assert len(pool) == 1  # another prompt length, the same bucket: the decoder (and its graph) reused


@pytest.mark.parametrize("mode, init, arch", [("full", "zeros", "llama"), ("compress", "normal", "gemma2")])
def test_the_decoding_step_traces_as_one_graph_with_no_host_reads(mode, init, arch):
    """What a CUDA graph needs, checked on CPU: dynamo traces the one-token step (masks, the loop, the static cache
    writes) into one graph with no break, so nothing in it reads a tensor's value on the host (`.item()`, a branch
    on a tensor) or leaves the graph."""
    model = _looped(arch, init, mode)
    dec = GraphedDecoder(model, 2, 32, 3, use_graph=False)
    ids, mask = _batch(rows=2)
    dec.generate(ids, mask, 3)  # prefill: the static layers allocated
    with torch.inference_mode():
        explained = torch._dynamo.explain(dec._decode_step)()
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    assert explained.graph_count == 1


def test_generation_settings_the_decoder_does_not_apply_are_named_and_the_default_depth_is_generates_own():
    from loopfit.generate import graph_blockers
    from loopfit.models.depth import generation_depth

    model = _looped()
    gc = model.generation_config
    assert graph_blockers(gc, do_sample=True) == []
    gc.repetition_penalty, gc.min_p, gc.top_k = 1.3, 0.1, 20  # top-k: generate_text overrides it on both paths
    assert graph_blockers(gc, do_sample=False) == ["repetition_penalty=1.3"]  # min-p changes sampling only
    assert graph_blockers(gc, do_sample=True) == ["repetition_penalty=1.3", "min_p=0.1"]
    gc.repetition_penalty, gc.min_p = 1.0, None
    assert graph_blockers(gc, do_sample=True) == []
    model.config.mean_recurrence, gc.num_steps = 4, 7
    assert generation_depth(model) == 7  # as `generate` picks it
    gc.num_steps = None
    assert generation_depth(model) == 4
