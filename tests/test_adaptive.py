import pytest
import torch
from conftest import make_tiny_model, make_tiny_tokenizer

from loopfit.adaptive import AdaptiveDecoder, ExitConfig, generate_adaptive, score_adaptive
from loopfit.convert import Layout, to_looped
from loopfit.errors import LoopfitError

R = 5
SEED = 5  # the random adapter's seed: with the thresholds below, loose exits save iterations (asserted)


def _model(cache_mode):
    src = make_tiny_model("llama", num_layers=4, hidden=32)
    return to_looped(src, Layout([0], [1, 2], [3]), adapter_init="random", cache_mode=cache_mode, seed=SEED).eval()


def _prompt():
    return torch.randint(4, 260, (1, 7), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("cache_mode", ["full", "compress"])
@pytest.mark.parametrize("criterion,threshold", [("kl", 0), ("state", 0), ("argmax", 100), ("none", None)])
def test_threshold_zero_equals_fixed_depth(cache_mode, criterion, threshold):
    lm = _model(cache_mode)
    ids = _prompt()
    ref = lm.generate(ids, num_steps=R, max_new_tokens=12, do_sample=False)[0, ids.shape[1] :].tolist()
    out = generate_adaptive(lm, ids, ExitConfig(criterion, threshold, max_num_steps=R), max_new_tokens=12)
    assert out.tokens == ref
    assert out.iterations == [R] * 11


@pytest.mark.parametrize("cache_mode", ["full", "compress"])
@pytest.mark.parametrize("criterion,threshold", [("kl", 0.5), ("state", 0.5), ("argmax", 1)])
def test_loose_threshold_uses_fewer_iterations(cache_mode, criterion, threshold):
    lm = _model(cache_mode)
    out = generate_adaptive(lm, _prompt(), ExitConfig(criterion, threshold, max_num_steps=R), max_new_tokens=12)
    assert len(out.tokens) == 12
    assert all(1 <= n <= R for n in out.iterations)
    assert out.mean_iterations < R


def test_min_num_steps_and_check_every():
    lm = _model("full")
    out = generate_adaptive(lm, _prompt(), ExitConfig("kl", 10.0, min_num_steps=3, max_num_steps=R), max_new_tokens=8)
    assert set(out.iterations) == {3}  # the loosest threshold exits at the first allowed check
    out = generate_adaptive(lm, _prompt(), ExitConfig("kl", 10.0, check_every=2, max_num_steps=R), max_new_tokens=8)
    assert set(out.iterations) == {2}


def test_full_cache_fills_skipped_iterations_and_checks_write_no_coda_entries():
    lm = _model("full")
    dec = AdaptiveDecoder(lm, ExitConfig("kl", 0.5, max_num_steps=R))
    dec.prefill(_prompt())
    used = [int(dec.step(torch.tensor([t]))[1]) for t in (10, 20, 30, 40)]
    assert min(used) < R
    p, b, q = 1, 2, 1
    lengths = [layer.keys.shape[-2] for layer in dec.cache.layers]
    assert len(lengths) == p + q + R * b and set(lengths) == {7 + 4}  # every slot has every token, coda included
    for k, u in enumerate(used):  # skipped iterations hold a copy of the last computed one
        pos = 7 + k
        for it in range(u, R):
            for j in range(b):
                last = dec.cache.layers[p + q + (u - 1) * b + j].keys[..., pos, :]
                assert torch.equal(dec.cache.layers[p + q + it * b + j].keys[..., pos, :], last)


def test_score_adaptive_fixed_depth_equals_forward():
    lm = _model("full")
    ids = torch.randint(4, 260, (1, 12), generator=torch.Generator().manual_seed(2))
    out = score_adaptive(lm, ids, 4, ExitConfig("none", max_num_steps=3))
    with torch.no_grad():
        logp = lm(ids, num_steps=3).logits.log_softmax(-1)[0]
    expected = [logp[t - 1, ids[0, t]].item() for t in range(4, 12)]
    assert out.logprobs == pytest.approx(expected, abs=1e-4)
    assert out.iterations == [3] * 7
    loose = score_adaptive(lm, ids, 4, ExitConfig("kl", 0.5, max_num_steps=3))
    assert loose.mean_iterations < 3 and len(loose.logprobs) == 8


def test_bad_exit_config_is_a_clear_error():
    with pytest.raises(LoopfitError, match="exit_criterion"):
        ExitConfig("entropy")
    with pytest.raises(LoopfitError, match="exit_threshold"):
        ExitConfig("argmax", 0.5)
    with pytest.raises(LoopfitError, match="one prompt"):
        generate_adaptive(_model("full"), torch.zeros(2, 3, dtype=torch.long), ExitConfig())


def test_generate_command_with_exit(tmp_path, capsys):
    from loopfit.cli import main

    folder = tmp_path / "m"
    _model("compress").save_pretrained(folder)
    make_tiny_tokenizer().save_pretrained(folder)
    main(["generate", str(folder), "--prompt", "hello", "--num_steps", "4", "--max_new_tokens", "6",
          "--exit_criterion", "state", "--exit_threshold", "0.5"])  # fmt: skip
    out = capsys.readouterr().out
    assert "iterations]" in out and "of 4 iterations" in out
