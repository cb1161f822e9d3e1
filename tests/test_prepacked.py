"""`loopfit.models.prepacked`: linear layers through oneDNN-prepacked weights compute the same function as PyTorch's
default (fp32 rounding apart), generate the same greedy tokens, fall back to their own forward wherever the packed
copy could be stale or the wrong precision, and are restored on exit."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model
from torch import nn

from loopfit.convert import layout_from_sizes, to_looped
from loopfit.models.prepacked import prepack_available, prepacked_linears

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(not prepack_available(), reason="this PyTorch build has no oneDNN linear prepacking"),
]


@pytest.fixture(scope="module")
def looped():
    return to_looped(make_tiny_model("llama", num_layers=6, hidden=32), layout_from_sizes(6, 1, 2, 1)).eval()


def _linears(model) -> list[nn.Linear]:
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def _restored(model) -> bool:
    return not any("forward" in m.__dict__ for m in model.modules())


def test_packed_forward_equals_the_default_and_every_linear_layer_runs_packed(looped):
    ids = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = looped(input_ids=ids, num_steps=3).logits
        with prepacked_linears(looped, batch_size=4) as packed:  # prefill rows (24) differ from the hint: still exact
            got = looped(input_ids=ids, num_steps=3).logits
    assert len(packed) == len(_linears(looped)) > 0
    assert any(p.module is looped.model.adapter for p in packed)  # a subclass with nn.Linear's forward is packed
    assert all(p.calls > 0 for p in packed)  # every layer went through the packed weight, none fell back
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert _restored(looped)


def test_greedy_generation_with_the_cache_gives_the_same_tokens(looped):
    ids = torch.randint(3, 200, (3, 7), generator=torch.Generator().manual_seed(1))
    kw = dict(max_new_tokens=10, do_sample=False, num_steps=3, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        want = looped.generate(input_ids=ids, **kw)
        with prepacked_linears(looped, batch_size=3) as packed:
            got = looped.generate(input_ids=ids, **kw)
    assert torch.equal(got, want)
    assert sum(p.calls for p in packed) > 0


def test_falls_back_wherever_the_packed_copy_must_not_be_used():
    model = make_tiny_model("llama", num_layers=2, hidden=32)
    lin = model.lm_head
    x = torch.randn(4, 32)
    with prepacked_linears(model, batch_size=4) as packed:
        (head,) = [p for p in packed if p.module is lin]
        # Gradients enabled: the layer's own forward, exactly, and the graph reaches the weight.
        y = lin(x)
        assert head.calls == 0 and y.requires_grad and torch.equal(y, nn.functional.linear(x, lin.weight))
        with torch.no_grad():
            lin(x)
            assert head.calls == 1
            # Under CPU autocast, and for a bf16 input: the layer's own forward.
            with torch.autocast("cpu", dtype=torch.bfloat16):
                assert lin(x).dtype == torch.bfloat16
            lin(x.bfloat16().float())
            assert head.calls == 2
            with pytest.raises(RuntimeError):  # the default forward's error for a bf16 input on an fp32 weight
                lin(x.bfloat16())
            assert head.calls == 2
            # The weight written in place (the tied embedding too): the packed copy is stale, so it is not used.
            lin.weight.mul_(2.0)
            assert torch.equal(lin(x), nn.functional.linear(x, lin.weight)) and head.calls == 2
        # The weight replaced by another tensor: not used either.
        other = make_tiny_model("llama", num_layers=2, hidden=32, seed=1)
        layer = model.model.layers[0].mlp.down_proj
        (down,) = [p for p in packed if p.module is layer]
        layer.weight = other.model.layers[0].mlp.down_proj.weight
        with torch.no_grad():
            z = torch.randn(4, 64)
            assert torch.equal(layer(z), nn.functional.linear(z, layer.weight)) and down.calls == 0
    assert _restored(model)


def test_restored_after_an_exception_nested_blocks_pack_once_and_bf16_is_left_alone(looped):
    with pytest.raises(RuntimeError, match="boom"), prepacked_linears(looped, 2):
        raise RuntimeError("boom")
    assert _restored(looped)
    with prepacked_linears(looped, 2) as outer, prepacked_linears(looped, 2) as inner:
        assert len(outer) > 0 and inner == []
    assert _restored(looped)
    with prepacked_linears(make_tiny_model("llama", num_layers=2).bfloat16(), 2) as packed:
        assert packed == []

    class OwnForward(nn.Linear):  # e.g. a quantized layer: its weight is not what its forward multiplies by
        def forward(self, x):
            return super().forward(x) * 2

    class Shard(torch.Tensor):  # stands for FSDP's DTensor: a tensor subclass, not the weight the forward uses
        pass

    sharded = nn.Linear(4, 4)
    sharded.weight = nn.Parameter(torch.randn(4, 4).as_subclass(Shard))
    plain = nn.Linear(4, 4)
    with prepacked_linears(nn.Sequential(OwnForward(4, 4), sharded, plain), 2) as packed:
        assert [p.module for p in packed] == [plain]
    with pytest.raises(ValueError, match="batch_size"), prepacked_linears(looped, 0):
        pass


def test_generate_command_with_prepack_prints_the_same_text(tmp_path, looped, capsys):
    from conftest import make_tiny_tokenizer

    from loopfit.cli import main

    looped.save_pretrained(tmp_path / "m")
    make_tiny_tokenizer().save_pretrained(tmp_path / "m")
    base = ["generate", str(tmp_path / "m"), "--prompt", "12*7", "--prompt", "the fox", "--max_new_tokens", "6",
            "--num_steps", "3"]  # fmt: skip
    for extra in ([], ["--exit_criterion", "argmax", "--exit_threshold", "2"]):  # fixed depth and adaptive exit
        main([*base, *extra])
        want = capsys.readouterr().out
        main([*base, *extra, "--prepack=true"])
        out, err = capsys.readouterr()
        assert out == want and "12*7" in out and "warning" not in err
    with pytest.raises(SystemExit) as e:
        main([*base, "--prepack=true", "--compile=true"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == (
        "loopfit: error: --prepack and --compile: choose one (the compiled layers would not see the packed weights)"
    )


def test_generate_command_says_when_prepack_packs_nothing(tmp_path, looped, capsys, monkeypatch):
    from conftest import make_tiny_tokenizer

    from loopfit.cli import main
    from loopfit.models import prepacked

    looped.save_pretrained(tmp_path / "m")
    make_tiny_tokenizer().save_pretrained(tmp_path / "m")
    monkeypatch.setattr(prepacked, "prepack_available", lambda: False)  # a PyTorch build without oneDNN
    main(["generate", str(tmp_path / "m"), "--prompt", "hi", "--max_new_tokens", "2", "--prepack=true"])
    out, err = capsys.readouterr()
    assert "'hi' -> " in out and "loopfit: warning: --prepack: nothing to pack" in err


def _groups(packed) -> list:
    return list({id(p.group): p.group for p in packed if p.group is not None}.values())


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2", "olmo2", "qwen2_moe", "phi3"])
def test_sibling_projections_in_one_matmul_compute_the_default(arch):
    model = to_looped(make_tiny_model(arch, num_layers=6, hidden=32), layout_from_sizes(6, 1, 2, 1)).eval()
    ids = torch.randint(3, 200, (3, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = model(input_ids=ids, num_steps=3).logits
        with prepacked_linears(model, batch_size=3) as packed:
            groups = _groups(packed)
            assert all(len(g.members) in (2, 3) for g in groups)
            got = model(input_ids=ids, num_steps=3).logits
            kv = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, num_steps=3, pad_token_id=0)
            assert _groups(packed) == groups  # none dissolved: each group's layers read one input
        assert torch.equal(kv, model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, num_steps=3,
                                              pad_token_id=0))  # fmt: skip
    # Nothing heavy outlives the block, even before the cyclic GC runs (groups and layers refer to each other).
    assert all(p.packed is None and p.weight is None and p.group is None for p in packed)
    assert all(g.packed is None and g.input is None and not g.pending for g in groups)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    if arch == "phi3":  # its query/key/value and gate/up projections are already one layer each
        assert groups == []
    else:  # a q/k/v group and a gate/up group per distinct decoder layer (prelude, block, coda)
        assert len(groups) >= 6 and all(p.calls > 0 for p in packed)


def test_siblings_that_do_not_share_their_input_dissolve_and_stay_exact():
    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj, self.k_proj, self.v_proj = nn.Linear(8, 8), nn.Linear(8, 4), nn.Linear(8, 4)

        def forward(self, x, y):
            return self.q_proj(x), self.k_proj(y), self.v_proj(x)

    m = Attention()
    x, y = torch.randn(2, 8), torch.randn(2, 8)
    with torch.no_grad(), prepacked_linears(m, 2) as packed:
        assert len(_groups(packed)) == 1
        for _ in range(2):
            got = m(x, y)
            want = [nn.functional.linear(t, lin.weight, lin.bias) for t, lin in zip((x, y, x), m.children())]
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
        assert _groups(packed) == [] and all(p.calls == 2 for p in packed)  # dissolved: each layer on its own
        # Sharing its input, a group stays; a sibling's weight written in place dissolves it, and stays exact.
        m2 = Attention()
        with prepacked_linears(m2, 2) as packed2:
            m2(x, x)
            assert len(_groups(packed2)) == 1
            m2.v_proj.weight.mul_(3.0)
            for _ in range(2):  # the stale output of v is never used; left unclaimed, it dissolves the group
                q, k, v = m2(x, x)
                torch.testing.assert_close(v, nn.functional.linear(x, m2.v_proj.weight, m2.v_proj.bias))
                torch.testing.assert_close(k, nn.functional.linear(x, m2.k_proj.weight, m2.k_proj.bias))
            assert _groups(packed2) == []


def test_siblings_with_hooks_are_not_grouped_but_a_relaxed_loops_are():
    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj, self.k_proj, self.v_proj = nn.Linear(8, 8), nn.Linear(8, 4), nn.Linear(8, 4)

        def forward(self, x):
            return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    m = Attention()
    # A hook that writes the shared input in place: under inference mode a group could only check its identity.
    m.q_proj.register_forward_hook(lambda mod, args, out: args[0].clamp_(max=0.0))
    x0 = torch.randn(2, 8, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        want = m(x0.clone())
        with prepacked_linears(m, 2) as packed:
            assert _groups(packed) == []
            got = m(x0.clone())
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    # The relaxed loop's own hooks (per-iteration deltas on the block's linears) only read their input.
    relaxed = to_looped(make_tiny_model("llama", num_layers=6, hidden=32), layout_from_sizes(6, 1, 2, 1),
                        relaxation_rank=4).eval()  # fmt: skip
    with torch.no_grad():
        for p in relaxed.model.relaxation.parameters():
            p.normal_(std=0.05, generator=torch.Generator().manual_seed(4))
        ids = torch.randint(3, 200, (2, 7), generator=torch.Generator().manual_seed(5))
        want = relaxed(input_ids=ids, num_steps=3).logits
        with prepacked_linears(relaxed, 2) as packed:
            block = {id(m) for m in relaxed.model.block.modules()}
            assert any(id(g.members[0].module) in block for g in _groups(packed))
            got = relaxed(input_ids=ids, num_steps=3).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
