"""Every supported family on a tiny random model built from its own config.

Per family: the identity-adapter loop equals the source at R = 1 and 4 (fp32, padded batch); cached greedy decoding
equals uncached; one LoRA + KD step changes every trainable parameter; tied and untied embeddings round-trip.
"""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHS, make_tiny_model
from transformers import AutoModelForCausalLM

from loopfit.convert import layout_from_sizes, to_looped
from loopfit.models.families import FAMILIES, family_of
from loopfit.train.config import DistillationConfig, LoRAConfig
from loopfit.train.student import Student, apply_lora, family_logits, micro_batch_loss

pytestmark = pytest.mark.usefixtures("one_thread")


def _ids(batch=2, seq=12, seed=1):
    return torch.randint(3, 260, (batch, seq), generator=torch.Generator().manual_seed(seed))


def test_every_family_has_a_test_model():
    assert set(FAMILIES) == set(ARCHS)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_identity_loop_equals_source_padded(family):
    src = make_tiny_model(family)
    assert family_of(src.config).decoder_layer is type(family_of(src.config).layers(src)[0])
    x = _ids()
    mask = torch.ones_like(x)
    mask[1, :4] = 0
    ref = src(x, attention_mask=mask).logits
    looped = to_looped(src, layout_from_sizes(6, 2, 2, 2), adapter_init="identity").eval()
    for depth in (1, 4):
        got = looped(x, attention_mask=mask, num_steps=depth).logits
        torch.testing.assert_close(got[mask.bool()], ref[mask.bool()], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_cached_greedy_equals_uncached(family):
    looped = to_looped(make_tiny_model(family), layout_from_sizes(6, 2, 2, 2), adapter_init="random").eval()
    x = _ids(1, 8)
    kw = dict(num_steps=3, max_new_tokens=10, do_sample=False)
    assert torch.equal(looped.generate(x, use_cache=True, **kw), looped.generate(x, use_cache=False, **kw))


def test_apply_lora_does_not_pass_on_peft_deprecation_warning():
    # peft reads `is_gradient_checkpointing`, deprecated in transformers 5.x: not the user's to act on. Other warnings
    # still pass (the filter names that one message).
    import warnings

    looped = to_looped(make_tiny_model("llama"), layout_from_sizes(6, 2, 2, 2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        apply_lora(looped, LoRAConfig(enabled=True, r=4))
        warnings.warn("is_gradient_checkpointing elsewhere", FutureWarning, stacklevel=1)
    messages = [str(w.message) for w in caught if "is_gradient_checkpointing" in str(w.message)]
    assert messages == ["is_gradient_checkpointing elsewhere"]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_one_lora_kd_step_changes_every_trainable_parameter(family):
    teacher = make_tiny_model(family)
    looped = to_looped(teacher, layout_from_sizes(6, 1, 2, 1), adapter_init="random", state_init="zeros")
    model = apply_lora(looped, LoRAConfig(enabled=True, r=4, modules_to_save=["adapter"]))
    # PEFT starts LoRA B at zero, so A gets no gradient in the first step; make B non-zero to test every factor.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    x = _ids(2, 16)
    batch = {"input_ids": x, "labels": x}
    dcfg = DistillationConfig(enabled=True)
    parts = micro_batch_loss(Student(model), teacher, batch, 2, dcfg, (x[:, 1:] != -100).sum().float())
    parts.total.backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    assert torch.isfinite(parts.kd) and parts.kd > 0
    unchanged = [n for n, p in model.named_parameters() if p.requires_grad and torch.equal(p, before[n])]
    assert unchanged == []


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("tie", [True, False])
def test_tied_and_untied_round_trip(family, tie, tmp_path):
    src = make_tiny_model(family, tie=tie)
    looped = to_looped(src, layout_from_sizes(6, 2, 2, 2), adapter_init="random").eval()
    assert (looped.lm_head.weight.data_ptr() == looped.model.embed_tokens.weight.data_ptr()) == tie
    looped.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert (loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()) == tie
    x = _ids()
    # MoE: weights equal bit for bit after the round trip and the same experts implementation (`grouped_mm`), yet
    # the logits differed by 4.8e-7 on an avx512 EPYC (not on earlier CI machines); the cause inside the experts'
    # kernel was not traced, so MoE gets float-noise tolerance and every other family stays exact.
    atol = 1e-6 if "moe" in family else 0.0
    torch.testing.assert_close(loaded(x, num_steps=3).logits, looped(x, num_steps=3).logits, rtol=0, atol=atol)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_training_losses_see_the_family_logits(family):
    """The training path (hidden state + head weight, fused or not) scores the model's own logits: CE equals the
    cross-entropy of `forward(...).logits`, and KD against the source is 0 where the loop equals the source."""
    teacher = make_tiny_model(family)
    student = to_looped(teacher, layout_from_sizes(6, 2, 2, 2), adapter_init="identity").eval()
    x = _ids(2, 16)
    n = (x[:, 1:] != -100).sum().float()
    ref = torch.nn.functional.cross_entropy(
        student(x, num_steps=1).logits[:, :-1].reshape(-1, 260), x[:, 1:].reshape(-1)
    )
    hidden, _, head, *_ = Student(student)(x, num_steps=1)
    torch.testing.assert_close(family_logits(hidden, head, student.config), student(x, num_steps=1).logits)
    for fused in (True, False):
        dcfg = DistillationConfig(enabled=True, fused=fused)
        parts = micro_batch_loss(Student(student), teacher, {"input_ids": x, "labels": x}, 1, dcfg, n)
        torch.testing.assert_close(parts.ce, ref, rtol=1e-5, atol=1e-5)
        assert abs(parts.kd.item()) < 1e-5


@pytest.mark.parametrize("family", [f for f in FAMILIES if FAMILIES[f].router_class])
def test_moe_aux_loss_counts_every_iteration(family):
    """Router logits of every layer application (prelude, each iteration's block, coda) enter the source's
    load-balancing loss; the loss adds `router_aux_loss_coef * aux_loss`, and training gets the same term."""
    src = make_tiny_model(family)
    looped = to_looped(src, layout_from_sizes(6, 2, 2, 2), adapter_init="identity").eval()
    x = _ids()
    ref = src(x, output_router_logits=True)
    one = looped(x, num_steps=1, output_router_logits=True, labels=x)
    assert len(one.router_logits) == 6
    torch.testing.assert_close(one.aux_loss, ref.aux_loss)  # R = 1 with nothing dropped: the source's own routing
    three = looped(x, num_steps=3, output_router_logits=True, labels=x)
    assert len(three.router_logits) == 2 + 3 * 2 + 2
    expected = FAMILIES[family].load_balancing_loss(three.router_logits, src.config)
    torch.testing.assert_close(three.aux_loss, expected)
    ce = looped(x, num_steps=3, labels=x, output_router_logits=False).loss
    torch.testing.assert_close(three.loss, ce + src.config.router_aux_loss_coef * expected)
    n = (x[:, 1:] != -100).sum().float()
    parts = micro_batch_loss(Student(looped), None, {"input_ids": x, "labels": x}, 3, DistillationConfig(), n)
    assert parts.router_aux is None  # off unless the config asks for router logits, as in the source
    looped.config.base_config.output_router_logits = True
    parts = micro_batch_loss(Student(looped), None, {"input_ids": x, "labels": x}, 3, DistillationConfig(), n)
    torch.testing.assert_close(parts.router_aux, expected)
    torch.testing.assert_close(parts.total, parts.ce + src.config.router_aux_loss_coef * expected)


@pytest.mark.parametrize("family", [f for f in FAMILIES if FAMILIES[f].router_class])
def test_moe_runs_its_sources_experts_kernel(family, tmp_path):
    """The block's expert layers dispatch through transformers' experts interface: the looped model resolves the
    same implementation as its source (`grouped_mm`), also after a save and load, not eager with a warning."""
    src = make_tiny_model(family)
    looped = to_looped(src, layout_from_sizes(6, 2, 2, 2))
    impl = src.config._experts_implementation
    assert impl == "grouped_mm" and looped.config.base_config._experts_implementation == impl
    looped.save_pretrained(tmp_path / "m")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert back.config.base_config._experts_implementation == impl
    x = _ids()
    torch.testing.assert_close(back(x, num_steps=2).logits, looped(x, num_steps=2).logits)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_layer_analysis_suggests_a_layout_that_converts(family):
    """`loopfit analyze` / `--layers auto` on every family: the suggested layout parses and converts."""
    from conftest import make_tiny_tokenizer

    from loopfit.analysis import suggest_layout
    from loopfit.convert import parse_layout

    src = make_tiny_model(family, num_layers=8)
    spec = suggest_layout(src, make_tiny_tokenizer(), num_samples=4, seq_len=32)
    layout = parse_layout(spec, 8)
    looped = to_looped(src, layout).eval()
    assert torch.isfinite(looped(_ids(), num_steps=2).logits).all()


def test_llama3_rope_scaling_past_the_original_context():
    """Llama 3.x rope scaling (`rope_type: llama3`) is the source's own rotary: parity past the original length."""
    rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}  # fmt: skip
    src = make_tiny_model("llama", rope_parameters=rope)
    assert src.model.rotary_emb.rope_type == "llama3"
    x = _ids(2, 48)  # 3 x the original context
    looped = to_looped(src, layout_from_sizes(6, 2, 2, 2), adapter_init="identity").eval()
    for depth in (1, 4):
        torch.testing.assert_close(looped(x, num_steps=depth).logits, src(x).logits, rtol=1e-5, atol=1e-5)
    assert looped.model.rotary_emb.rope_type == "llama3"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_count_and_depth_sweep(family):
    """`loopfit count`'s parameter split covers every parameter of source and loop, and the depth sweep (one pass
    at the deepest R, the coda per depth) gives the loss of the model's own forward at each R."""
    import torch.nn.functional as F

    from loopfit.evaluate import depth_sweep
    from loopfit.flops import count_parameters, flop_params

    src = make_tiny_model(family, tie=False)
    looped = to_looped(src, layout_from_sizes(6, 2, 2, 2), adapter_init="random").eval()
    counts = count_parameters(looped)
    assert counts["total"] == sum(p.numel() for p in looped.parameters())
    assert count_parameters(src)["total"] == sum(p.numel() for p in src.parameters())
    assert flop_params(looped)["block"] == counts["block"]
    x = _ids(2, 12)
    sweep = depth_sweep(looped, [{"input_ids": x, "labels": x}], [1, 3])
    for r, loss in zip(sweep["depths"], sweep["loss"]):
        ref = F.cross_entropy(looped(x, num_steps=r).logits[:, :-1].reshape(-1, 260), x[:, 1:].reshape(-1))
        assert abs(loss - ref.item()) < 1e-4
