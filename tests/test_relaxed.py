"""Relaxed recursion (RRT, arXiv:2410.20672): "start from the teacher" with per-iteration SVD deltas.

Full rank at R = L equals the source with exactly the uncovered layers removed (several families, tied and untied,
both cache modes, cached greedy decoding == uncached); rank 0 is today's model; the truncated SVD init has
Eckart-Young's error; beyond L the last group's deltas repeat; the deltas train (LoRA on top, gradient
checkpointing) and round-trip through safetensors, PEFT adapters and remote code.
"""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from conftest import TEXT, make_tiny_model, make_tiny_tokenizer
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from loopfit.cli import main
from loopfit.convert import Layout, to_looped, to_static
from loopfit.errors import LoopfitError
from loopfit.models.layers import enable_activation_checkpointing
from loopfit.models.relaxed import relaxation_groups, svd_factors
from loopfit.train.commands import export_command
from loopfit.train.config import DistillationConfig, LoRAConfig, OptimConfig, TrainConfig
from loopfit.train.recipe import train
from loopfit.train.student import Student, apply_lora, lora_merged, micro_batch_loss

pytestmark = pytest.mark.usefixtures("one_thread")

# 10 source layers: prelude 0, block 5-6, coda 9; middle 1-8 -> groups 1-2, 3-4, 5-6, 7-8 (L = 4), nothing uncovered.
LAYOUT = Layout([0], [5, 6], [9])
# 9 source layers: prelude 0, block 4-5, coda 8; middle 1-7 -> groups 2-3, 4-5, 6-7 (L = 3), layer 1 uncovered.
LAYOUT9 = Layout([0], [4, 5], [8])


def _ids(batch=2, seq=12, seed=1):
    return torch.randint(3, 260, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _static_of(src, groups, layout):
    return to_static(src, Layout(layout.prelude, sum(groups, []), layout.coda)).eval()


def test_groups_cover_the_middle_and_name_what_is_left():
    # SmolLM2's 4-6-4 (30 layers, block 20-25): middle 4-25, three groups of 6, layers 4-7 left over.
    groups, left = relaxation_groups(list(range(4)), list(range(20, 26)), list(range(26, 30)), 30)
    assert groups == [list(range(8, 14)), list(range(14, 20)), list(range(20, 26))] and left == [4, 5, 6, 7]
    groups, left = relaxation_groups(list(range(4)), list(range(20, 26)), list(range(26, 30)), 30, align="start")
    assert groups == [list(range(4, 10)), list(range(10, 16)), list(range(16, 22))] and left == [22, 23, 24, 25]
    assert relaxation_groups([], [1], [], 3) == ([[0], [1], [2]], [])
    with pytest.raises(ValueError, match="inside the middle"):
        relaxation_groups([0, 3], [1, 2], [5], 6)
    with pytest.raises(ValueError, match="align"):
        relaxation_groups([0], [1], [2], 3, align="middle")


@pytest.mark.parametrize(
    "family, tie, block_init",
    [("llama", True, "layers"), ("llama", False, "average"), ("qwen3", True, 1), ("gemma2", True, "layers"),
     ("gpt_neox", False, "average"), ("phi3", True, "layers"), ("granite", True, 0)],
)  # fmt: skip
def test_full_rank_at_L_equals_the_source_without_uncovered_layers(family, tie, block_init):
    src = make_tiny_model(family, num_layers=9, tie=tie)
    looped = to_looped(src, LAYOUT9, relaxation_rank="full", block_init=block_init).eval()
    groups = looped.config.relaxation_groups
    assert groups == [[2, 3], [4, 5], [6, 7]] and looped.config.mean_recurrence == 3  # layer 1 is uncovered
    assert looped.config.adapter_init == "state" and looped.config.state_init == "embed"
    static = _static_of(src, groups, LAYOUT9)
    x = _ids()
    mask = torch.ones_like(x)
    mask[1, :3] = 0
    ref = static(x, attention_mask=mask).logits
    for mode in ("full", "compress"):
        looped.config.cache_mode = mode
        for use_cache in (False, True):  # the cached prefill too, in both modes
            got = looped(x, attention_mask=mask, num_steps=3, use_cache=use_cache).logits
            torch.testing.assert_close(got[mask.bool()], ref[mask.bool()], rtol=1e-4, atol=1e-4)
    # At R < L the loop is the source cut after group R - 1 (here R = 1: prelude, group 0, coda).
    short = to_static(src, Layout(LAYOUT9.prelude, groups[0], LAYOUT9.coda)).eval()
    torch.testing.assert_close(looped(x, num_steps=1).logits, short(x).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_cached_greedy_decoding_equals_uncached_and_the_source(family):
    src = make_tiny_model(family, num_layers=10)
    looped = to_looped(src, LAYOUT, relaxation_rank="full").eval()
    static = _static_of(src, looped.config.relaxation_groups, LAYOUT)
    x = _ids(1, 8)
    kw = dict(num_steps=4, max_new_tokens=10, do_sample=False)
    cached = looped.generate(x, use_cache=True, **kw)
    assert torch.equal(cached, looped.generate(x, use_cache=False, **kw))
    assert torch.equal(cached, static.generate(x, max_new_tokens=10, do_sample=False))
    looped.config.cache_mode = "compress"  # constant-memory cache: runs, gives a sequence of the same length
    assert looped.generate(x, use_cache=True, **kw).shape == cached.shape


def test_beyond_L_the_last_groups_deltas_repeat():
    src = make_tiny_model("llama", num_layers=10)
    looped = to_looped(src, LAYOUT, relaxation_rank="full").eval()
    groups = looped.config.relaxation_groups
    # The source with the last group run twice more: prelude, groups 0..3, group 3, group 3, coda.
    ref = copy.deepcopy(src)
    layers = ref.model.layers
    kept = [layers[i] for i in LAYOUT.prelude + sum(groups, [])]
    kept += [copy.deepcopy(layers[i]) for _ in range(2) for i in groups[-1]] + [layers[i] for i in LAYOUT.coda]
    ref.model.layers = torch.nn.ModuleList(kept)
    for j, layer in enumerate(kept):
        layer.self_attn.layer_idx = j
    ref.config.num_hidden_layers = len(kept)
    x = _ids()
    torch.testing.assert_close(looped(x, num_steps=6).logits, ref(x).logits, rtol=1e-4, atol=1e-4)


def test_rank_0_is_todays_model():
    src = make_tiny_model("llama", num_layers=10)
    relaxed = to_looped(src, LAYOUT, relaxation_rank=0).eval()
    today = to_looped(src, LAYOUT, adapter_init="state", state_init="embed", mean_recurrence=4).eval()
    assert relaxed.model.relaxation is None
    assert relaxed.state_dict().keys() == today.state_dict().keys()
    x = _ids()
    for r in (1, 4, 6):
        torch.testing.assert_close(relaxed(x, num_steps=r).logits, today(x, num_steps=r).logits, rtol=0, atol=0)
    # A relaxed model whose deltas are zero and whose vectors are the block's is that same model.
    zeroed = to_looped(src, LAYOUT, relaxation_rank=4).eval()
    with torch.no_grad():
        for d in zeroed.model.relaxation.deltas.values():
            d.up.zero_()
        for key, t in zeroed.model.relaxation.vectors.items():
            mod = zeroed.model.block.get_submodule(key.replace("__", "."))
            for n, p in t.table.items():
                p.copy_(getattr(mod, n).expand_as(p))
    torch.testing.assert_close(zeroed(x, num_steps=4).logits, today(x, num_steps=4).logits, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("rank", [1, 4, 16])
def test_truncated_svd_init_has_the_eckart_young_error(rank):
    src = make_tiny_model("llama", num_layers=10, hidden=32)
    looped = to_looped(src, LAYOUT, relaxation_rank=rank, block_init="average").eval()
    d = looped.model.relaxation.deltas["1__mlp__down_proj"]  # (32 x 64): full rank 32
    for i, group in enumerate(looped.config.relaxation_groups):
        delta = src.model.layers[group[1]].mlp.down_proj.weight - looped.model.block[1].mlp.down_proj.weight
        s = torch.linalg.svd(delta.double()).S
        err = torch.linalg.matrix_norm(delta.double() - d.up[i].double() @ d.down[i].double())
        assert d.up.shape[-1] == rank
        torch.testing.assert_close(err, s[rank:].pow(2).sum().sqrt(), rtol=1e-4, atol=1e-5)
    up, down = svd_factors(torch.eye(3), 5)  # a rank above full is capped at full
    assert up.shape == (3, 3) and torch.allclose(up @ down, torch.eye(3, dtype=torch.float64))


def test_group_init_makes_that_groups_delta_zero_and_average_does_not():
    src = make_tiny_model("llama", num_layers=10)
    own = to_looped(src, LAYOUT, relaxation_rank=8)  # the block is group 2 (layers 5-6)
    d = own.model.relaxation.deltas["0__self_attn__q_proj"]
    assert d.up[2].abs().max() == 0 and d.up[0].abs().max() > 0
    avg = to_looped(src, LAYOUT, relaxation_rank=8, block_init="average")
    mean = torch.stack([src.model.layers[g[0]].self_attn.q_proj.weight for g in avg.config.relaxation_groups]).mean(0)
    torch.testing.assert_close(avg.model.block[0].self_attn.q_proj.weight, mean)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_lora_step_trains_the_deltas_and_checkpointing_gives_the_same_gradients(checkpointing):
    teacher = make_tiny_model("llama", num_layers=10)
    looped = to_looped(teacher, LAYOUT, relaxation_rank=4)
    ref = copy.deepcopy(looped)
    if checkpointing:
        enable_activation_checkpointing(looped)
    model = apply_lora(looped, LoRAConfig(enabled=True, r=4))
    model.train()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    relaxed = [n for n in trainable if ".relaxation." in n]
    assert relaxed and any("lora_A" in n for n in trainable)  # PEFT LoRA on top, the deltas trained whole
    x = _ids(2, 16)
    batch = {"input_ids": x, "labels": x}
    dcfg = DistillationConfig(enabled=True, ce_scale=0.5, kd_scale=0.5)
    parts = micro_batch_loss(Student(model), teacher, batch, 4, dcfg, (x[:, 1:] != -100).sum().float())
    parts.total.backward()
    # The same loss on the plain model (no PEFT, no checkpointing): the deltas' gradients agree.
    ref.train()
    ref_parts = micro_batch_loss(Student(ref), teacher, batch, 4, dcfg, (x[:, 1:] != -100).sum().float())
    ref_parts.total.backward()
    ref_grads = dict(ref.named_parameters())
    for n in relaxed:
        g_ref = ref_grads["model.relaxation." + n.split(".modules_to_save.default.")[-1]].grad
        torch.testing.assert_close(trainable[n].grad, g_ref, rtol=1e-4, atol=1e-6)
    before = {n: p.detach().clone() for n, p in trainable.items()}
    torch.optim.SGD(list(trainable.values()), lr=0.1).step()
    assert all(not torch.equal(trainable[n], before[n]) for n in relaxed if trainable[n].grad.abs().max() > 0)
    # Every iteration's delta got a gradient (R = 4 = L): the index reached each one, and the zero delta of the
    # group the block came from (group 2) is no saddle (its `down` factor is orthonormal, not zero).
    up = next(p for n, p in trainable.items() if n.endswith("0__self_attn__q_proj.up"))
    assert all(up.grad[i].abs().max() > 0 for i in range(4))
    down = next(p for n, p in trainable.items() if n.endswith("0__self_attn__q_proj.down"))
    torch.testing.assert_close(down[2] @ down[2].T, torch.eye(4), rtol=0, atol=1e-2)


def test_save_load_and_peft_round_trip(tmp_path):
    src = make_tiny_model("qwen3", num_layers=10)
    looped = to_looped(src, LAYOUT, relaxation_rank=4).eval()
    looped.save_pretrained(tmp_path / "m")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert loaded.config.relaxation_rank == 4 and loaded.config.relaxation_groups == looped.config.relaxation_groups
    x = _ids()
    torch.testing.assert_close(loaded(x, num_steps=5).logits, looped(x, num_steps=5).logits, rtol=0, atol=0)
    # PEFT: a trained adapter (deltas changed) saved and re-applied to the converted folder; merged = same model.
    model = apply_lora(copy.deepcopy(loaded), LoRAConfig(enabled=True, r=4))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    model.eval()
    expected = model(x, num_steps=5).logits
    model.save_pretrained(tmp_path / "adapter")
    back = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "m"), tmp_path / "adapter")
    torch.testing.assert_close(back.eval()(x, num_steps=5).logits, expected, rtol=1e-5, atol=1e-5)
    merged = back.merge_and_unload()
    assert merged.model.relaxation is not None  # the per-iteration deltas stay modules
    merged.save_pretrained(tmp_path / "merged")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(again(x, num_steps=5).logits, expected, rtol=1e-4, atol=1e-4)


def test_cli_convert_relaxed_with_remote_code(tmp_path, capsys):
    src = make_tiny_model("llama", num_layers=10)
    src.save_pretrained(tmp_path / "src")
    make_tiny_tokenizer().save_pretrained(tmp_path / "src")
    out = tmp_path / "relaxed"
    main(["convert", str(tmp_path / "src"), "--out", str(out), "--layers", "0:5-6:9", "--relaxation_rank", "full",
          "--block_init", "average", "--remote_code", "true"])  # fmt: skip
    printed = capsys.readouterr().out
    assert "iterations 0-3 stand for 1-2; 3-4; 5-6; 7-8" in printed and "source without no layer" in printed
    assert "Relaxed recursion" in (out / "README.md").read_text()
    x = _ids(1, 8)
    static = _static_of(src, [[1, 2], [3, 4], [5, 6], [7, 8]], LAYOUT)
    torch.save({"ids": x, "logits": static(x).logits}, tmp_path / "ref.pt")
    code = (
        "import sys, torch\nsys.modules['loopfit'] = None\nfrom transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True).eval()\n"
        f"ref = torch.load({str(tmp_path / 'ref.pt')!r})\n"
        "torch.testing.assert_close(m(ref['ids']).logits, ref['logits'], rtol=1e-4, atol=1e-4)\nprint('ok')\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.stdout.strip() == "ok", run.stderr[-2000:]


def test_refusals():
    src = make_tiny_model("qwen2_moe", num_layers=10)
    with pytest.raises(LoopfitError, match="neither"):
        to_looped(src, LAYOUT, relaxation_rank=4)
    with pytest.raises(LoopfitError, match="neither"):
        to_looped(src, LAYOUT, relaxation_rank=4, relaxation_init="zeros", relaxation_iterations=3)
    mixed = make_tiny_model("qwen2_moe", num_layers=10, mlp_only_layers=[5])  # block layer 5 dense, 6 experts
    with pytest.raises(LoopfitError, match=r"\(layer 6\)"):
        to_looped(mixed, LAYOUT, relaxation_rank=4, relaxation_init="zeros", relaxation_iterations=3)
    dense_block = make_tiny_model("qwen2_moe", num_layers=10, mlp_only_layers=[5, 6])
    to_looped(dense_block, LAYOUT, relaxation_rank=4, relaxation_init="zeros", relaxation_iterations=3)
    smol = make_tiny_model("smollm3", num_layers=10)  # no_rope_layers: every 4th layer has no rotary
    with pytest.raises(LoopfitError, match="no_rope_layers"):
        to_looped(smol, LAYOUT, relaxation_rank=4)
    with pytest.raises(LoopfitError, match="adapter_init state"):
        to_looped(make_tiny_model("llama", num_layers=10), LAYOUT, relaxation_rank=4, adapter_init="random")


def test_auto_layout_refuses_an_all_experts_model_before_the_analysis(tmp_path, monkeypatch, capsys):
    """With `--layers auto` the block is not known before the analysis; a model none of whose layers could take
    the deltas is refused before it (nothing loaded, nothing written), one with a dense layer goes on to it."""
    make_tiny_model("qwen2_moe", num_layers=10).save_pretrained(tmp_path / "moe")
    make_tiny_model("qwen2_moe", num_layers=10, mlp_only_layers=[3]).save_pretrained(tmp_path / "some_dense")
    for name in ("moe", "some_dense"):
        make_tiny_tokenizer().save_pretrained(tmp_path / name)
    monkeypatch.setattr("loopfit.convert.suggest_layout", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("ran")))
    args = ["--layers", "auto", "--relaxation_rank", "4", "--relaxation_init", "zeros", "--relaxation_iterations", "2"]
    with pytest.raises(SystemExit) as e:
        main(["convert", str(tmp_path / "moe"), "--out", str(tmp_path / "c"), *args])
    assert e.value.code != 0 and not (tmp_path / "c").exists()
    assert "no layer of this model can take per-iteration deltas" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # past the check: the (stubbed) analysis ran
        main(["convert", str(tmp_path / "some_dense"), "--out", str(tmp_path / "c"), *args])
    assert "RuntimeError: ran" in capsys.readouterr().err


def test_loopfit_train_trains_the_deltas_and_export_keeps_them(tmp_path):
    """`loopfit train` (LoRA on) changes the relaxed deltas; `loopfit export` merges the LoRA and keeps the deltas as
    modules, equal to the trained ones."""
    src = make_tiny_model("llama", num_layers=10)
    looped = to_looped(src, LAYOUT, relaxation_rank=4)
    looped.save_pretrained(tmp_path / "looped")
    make_tiny_tokenizer().save_pretrained(tmp_path / "looped")
    (tmp_path / "data.txt").write_text(TEXT)
    cfg = TrainConfig(model_name=str(tmp_path / "looped"), out=str(tmp_path / "run"), data=str(tmp_path / "data.txt"),
                      seq_len=32, batch_size=2, max_steps=2, progress_bar=False, tensorboard=False, fixed_num_steps=5,
                      lora=LoRAConfig(enabled=True, r=4), val_fraction=0.2, eval_num_steps=[4])  # fmt: skip
    train(cfg)
    adapter = load_file(str(tmp_path / "run" / "final" / "adapter_model.safetensors"))
    key = "base_model.model.model.relaxation.deltas.0__self_attn__q_proj.up"
    assert key in adapter and not torch.allclose(
        adapter[key], looped.model.relaxation.deltas["0__self_attn__q_proj"].up
    )
    export_command(str(tmp_path / "run"), str(tmp_path / "exported"))
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "exported")
    torch.testing.assert_close(exported.model.relaxation.deltas["0__self_attn__q_proj"].up, adapter[key])
    assert not any("lora" in k for k in exported.state_dict())


def test_merged_lora_keeps_the_per_iteration_deltas():
    """`lora_merged` (on-policy sampling) swaps the block linears' weights: the relaxation's hooks still add each
    iteration's delta, so the merged model computes what the unmerged one does, at every depth."""
    looped = to_looped(make_tiny_model("llama", num_layers=10), LAYOUT, relaxation_rank=4)
    model = apply_lora(looped, LoRAConfig(enabled=True, r=4)).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        x = _ids()
        for r in (1, 4, 6):
            want = model(input_ids=x, num_steps=r).logits
            with model.disable_adapter():
                no_lora = model(input_ids=x, num_steps=r).logits
            with lora_merged(model) as n:
                got = model(input_ids=x, num_steps=r).logits
            assert n > 0 and (no_lora - want).abs().max() > 1e-3  # adapters off: another function (the check has teeth)
            torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


# --- depth-wise LoRA from zero (`relaxation_init="zeros"`): the relaxation's deltas without the teacher start


def _zeros(src, rank=4, iterations=3, **kw):
    kw.setdefault("state_init", "zeros")
    return to_looped(src, LAYOUT, relaxation_rank=rank, relaxation_init="zeros", relaxation_iterations=iterations, **kw)


@pytest.mark.parametrize("adapter_init", ["identity", "random"])
def test_depthwise_lora_from_zero_starts_as_the_plain_loop(adapter_init):
    src = make_tiny_model("llama", num_layers=10)
    torch.manual_seed(0)
    plain = to_looped(src, LAYOUT, adapter_init=adapter_init, state_init="zeros").eval()
    torch.manual_seed(0)  # the same random adapter
    model = _zeros(src, adapter_init=adapter_init).eval()
    assert model.config.num_relaxed == 3 and model.config.relaxation_groups == []
    x = _ids()
    with torch.no_grad():
        for r in (1, 3, 5):
            torch.testing.assert_close(model(x, num_steps=r).logits, plain(x, num_steps=r).logits, rtol=0, atol=1e-6)
    d = model.model.relaxation.deltas["0__self_attn__q_proj"]
    assert d.up.abs().max() == 0 and d.down.shape == (3, 4, model.config.hidden_size)
    for i in range(3):  # orthonormal rows, a different draw for every iteration: no saddle, no shared subspace
        torch.testing.assert_close(d.down[i] @ d.down[i].T, torch.eye(4), rtol=0, atol=1e-5)
    assert (d.down[0] - d.down[1]).abs().max() > 0.1
    norms = model.model.relaxation.vectors["0__input_layernorm"].table["weight"]
    assert torch.equal(norms, model.model.block[0].input_layernorm.weight.expand(3, -1))


def test_depthwise_lora_iteration_i_uses_delta_i_and_later_ones_the_last():
    # adapter `average` ([I/2 | I/2]): every iteration reads the state, so a change at iteration i reaches all R > i.
    model = _zeros(make_tiny_model("llama", num_layers=10), adapter_init="average").eval()
    x = _ids()
    with torch.no_grad():
        base = {r: model(x, num_steps=r).logits for r in (1, 2, 3, 5)}
        model.model.relaxation.deltas["1__mlp__down_proj"].up[2].normal_(0, 0.5)  # iteration 2's delta only
        assert all(torch.equal(model(x, num_steps=r).logits, base[r]) for r in (1, 2))
        assert all((model(x, num_steps=r).logits - base[r]).abs().max() > 1e-3 for r in (3, 5))
        model.model.relaxation.deltas["1__mlp__down_proj"].up[2].zero_()
        model.model.relaxation.vectors["0__post_attention_layernorm"].table["weight"][1].mul_(3)  # iteration 1's
        assert torch.equal(model(x, num_steps=1).logits, base[1])
        assert all((model(x, num_steps=r).logits - base[r]).abs().max() > 1e-3 for r in (2, 3, 5))


def test_depthwise_lora_trains_every_iteration_and_round_trips(tmp_path):
    """A real `loopfit train` run (LoRA on, R fixed at 4 > L = 3) changes every iteration's `up` away from zero, the
    iterations end different, and export keeps the deltas as modules equal to the trained ones."""
    src = make_tiny_model("llama", num_layers=10)
    src.save_pretrained(tmp_path / "src")
    make_tiny_tokenizer().save_pretrained(tmp_path / "src")
    main(["convert", str(tmp_path / "src"), "--out", str(tmp_path / "looped"), "--layers", "0:5-6:9",
          "--state_init", "zeros", "--relaxation_rank", "4", "--relaxation_init", "zeros",
          "--relaxation_iterations", "3"])  # fmt: skip
    assert "Depth-wise LoRA" in (tmp_path / "looped" / "README.md").read_text()
    looped = AutoModelForCausalLM.from_pretrained(tmp_path / "looped")
    assert looped.config.relaxation_iterations == 3 and looped.config.relaxation_block_init == "zeros"
    (tmp_path / "data.txt").write_text(TEXT)
    cfg = TrainConfig(model_name=str(tmp_path / "looped"), out=str(tmp_path / "run"), data=str(tmp_path / "data.txt"),
                      seq_len=32, batch_size=2, max_steps=3, progress_bar=False, tensorboard=False, fixed_num_steps=4,
                      lora=LoRAConfig(enabled=True, r=4), optim_config=OptimConfig(lr=1e-2),
                      backprop_depth=4)  # fmt: skip
    train(cfg)
    adapter = load_file(str(tmp_path / "run" / "final" / "adapter_model.safetensors"))
    ups = [v for k, v in adapter.items() if k.startswith("base_model.model.model.relaxation.deltas.") and
           k.endswith(".up")]  # fmt: skip
    assert len(ups) == 2 * 7 and all(u[i].abs().max() > 0 for u in ups for i in range(3))
    assert all((u[0] - u[1]).abs().max() > 0 for u in ups)
    export_command(str(tmp_path / "run"), str(tmp_path / "exported"))
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "exported")
    key = "base_model.model.model.relaxation.deltas.0__self_attn__q_proj.up"
    torch.testing.assert_close(exported.model.relaxation.deltas["0__self_attn__q_proj"].up, adapter[key])
