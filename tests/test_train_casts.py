"""`--precision bf16` casts each linear input once (loopfit.train.casts): the same loss and gradients as autocast
casting it at every layer, fewer casts, and the training run uses it."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import bf16_kd_config, kd_loss_and_grads, make_tiny_model, write_teacher_and_looped_student
from peft.tuners.lora import LoraLayer

from loopfit.models.layers import COMPILED_MARK
from loopfit.train.casts import share_input_casts
from loopfit.train.frozen import store_frozen_linears
from loopfit.train.recipe import depth_at, setup


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return write_teacher_and_looped_student(tmp_path_factory.mktemp("casts"))


def _count_casts(fn) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key == "aten::_to_copy")


@pytest.mark.parametrize(
    "lora,frozen,checkpointing", [(True, True, False), (True, False, False), (False, True, False), (True, True, True)]
)
def test_shared_casts_compute_what_autocast_computed(models, tmp_path, lora, frozen, checkpointing):
    """Loss and every trainable gradient of one KD micro-batch under bf16 autocast are bit-equal with and without
    the shared casts (LoRA or full fine-tune, frozen weights in float32 or bf16, activation checkpointing), with
    fewer casts."""
    run = setup(bf16_kd_config(models, tmp_path / "run", lora=lora, gradient_checkpointing=checkpointing))
    if frozen:
        store_frozen_linears(run.model, run.teacher)
    batch = run.stream.next()
    depth = depth_at(run, 0)[2]
    loss0, grads0 = kd_loss_and_grads(run, batch, depth)
    n0 = _count_casts(lambda: kd_loss_and_grads(run, batch, depth))
    assert share_input_casts(run.model, run.teacher) > 0
    assert share_input_casts(run.model, run.teacher) == 0  # installed once
    loss1, grads1 = kd_loss_and_grads(run, batch, depth)
    n1 = _count_casts(lambda: kd_loss_and_grads(run, batch, depth))
    run.logger.close()
    assert torch.equal(loss0, loss1)
    assert grads0.keys() == grads1.keys() and len(grads0) > 0
    for n in grads0:
        assert torch.equal(grads0[n], grads1[n]), n
    assert n1 < n0, (n0, n1)


def test_bf16_fit_installs_them_fp32_does_not(models, tmp_path):
    """A bf16 run hooks every linear layer of student and teacher and turns off PEFT's input casts at its first
    step; an fp32 run leaves the models as they are."""
    from loopfit.train.recipe import fit

    for precision in ("bf16", "fp32"):
        run = setup(bf16_kd_config(models, tmp_path / precision, precision=precision))
        fit(run, until=1)
        run.logger.close()
        linears = [m for model in (run.model, run.teacher) for m in model.modules() if isinstance(m, torch.nn.Linear)]
        loras = [m for m in run.model.modules() if isinstance(m, LoraLayer)]
        assert linears and loras
        assert all(getattr(m, "_loopfit_shared_cast", False) == (precision == "bf16") for m in linears)
        assert all(m.cast_input_dtype_enabled == (precision == "fp32") for m in loras)


def test_compiled_layers_and_linears_with_their_own_forward_are_left_alone():
    """Linear layers inside a decoder layer that `--compile` compiled get no hook (the compiler fuses the casts),
    nor does a subclass with a forward of its own (a quantized layer); a subclass without one does."""

    class Own(torch.nn.Linear):
        def forward(self, x):
            return super().forward(x.float())

    class Plain(torch.nn.Linear):
        pass

    layer = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    model = torch.nn.Sequential(layer, torch.nn.Linear(4, 4), Own(4, 4), Plain(4, 4))
    setattr(model[0], COMPILED_MARK, True)
    assert share_input_casts(model) == 2
    assert not model[0][0]._forward_pre_hooks and not model[2]._forward_pre_hooks
    assert model[1]._forward_pre_hooks and model[3]._forward_pre_hooks


def test_one_copy_per_input_recast_after_an_in_place_change():
    """Two layers reading one float32 input get the same bfloat16 copy; after an in-place change of the input the
    next layer gets a fresh copy; outside autocast the hooks do nothing; the outputs are autocast's own."""
    torch.manual_seed(0)
    a, b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
    ref = [copy.deepcopy(a), copy.deepcopy(b)]
    seen = []
    share_input_casts(torch.nn.ModuleList([a, b]))
    for m in (a, b):
        m.register_forward_pre_hook(lambda _, args: seen.append(args[0]))  # after the shared cast's hook
    x = torch.randn(3, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ya, yb = a(x), b(x)
        assert (
            seen[0].dtype == torch.bfloat16
            and seen[0].untyped_storage().data_ptr() == seen[1].untyped_storage().data_ptr()
        )
        x.mul_(2)
        yb2 = b(x)
        assert seen[2].untyped_storage().data_ptr() != seen[0].untyped_storage().data_ptr()
        assert torch.equal(ya, ref[0](x / 2)) and torch.equal(yb, ref[1](x / 2)) and torch.equal(yb2, ref[1](x))
    assert a(x).dtype == torch.float32 and seen[-1] is x


def test_bf16_compiled_run_hooks_only_what_runs_eager(models, tmp_path):
    """With `--compile` the loop's decoder layers are compiled: their linear layers get no hook, the rest (the
    adapter, the head, the teacher) do, and the run trains."""
    from loopfit.train.recipe import fit

    run = setup(bf16_kd_config(models, tmp_path / "run", compile=True))
    fit(run, until=2)
    run.logger.close()
    hooked = {n for n, m in run.model.named_modules() if getattr(m, "_loopfit_shared_cast", False)}
    layers = {n for n, m in run.model.named_modules() if getattr(m, COMPILED_MARK, False)}
    assert layers and hooked and all(".adapter" in n or n.endswith("lm_head") for n in hooked), hooked
    assert all(not any(n.startswith(f"{layer}.") for layer in layers) for n in hooked)
    assert all(
        getattr(m, "_loopfit_shared_cast", False) for m in run.teacher.modules() if isinstance(m, torch.nn.Linear)
    )
    assert run.step == 2 and all(p.isfinite().all() for _, p in run.trainable)


def test_relaxed_loop_keeps_bit_equal_gradients():
    """A relaxed loop's block linears carry forward hooks that read their input (the per-iteration deltas): they
    keep autocast's own casts, so loss and every gradient stay bit-equal; the other linears share theirs."""
    from loopfit.convert import layout_from_sizes, to_looped

    src = make_tiny_model("llama", num_layers=8, hidden=32)
    looped = to_looped(src, layout_from_sizes(8, 1, 2, 1), relaxation_rank=4, adapter_init="state",
                       state_init="embed").train()  # fmt: skip
    with torch.no_grad():
        for p in looped.model.relaxation.parameters():
            p.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
    ids = torch.randint(4, 200, (2, 16), generator=torch.Generator().manual_seed(1))

    def run():
        looped.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = looped(ids, labels=ids, num_steps=3)
        out.loss.backward()
        return out.loss.detach(), {n: p.grad.clone() for n, p in looped.named_parameters() if p.grad is not None}

    loss0, grads0 = run()
    hooked = share_input_casts(looped)
    linears = [m for m in looped.modules() if isinstance(m, torch.nn.Linear)]
    assert 0 < hooked < len(linears)
    assert all(not getattr(m, "_loopfit_shared_cast", False) for m in looped.model.block.modules() if m._forward_hooks)
    loss1, grads1 = run()
    assert torch.equal(loss0, loss1) and grads0.keys() == grads1.keys()
    for n in grads0:
        assert torch.equal(grads0[n], grads1[n]), n
