"""`--precision bf16` stores frozen linear weights in bf16 (loopfit.train.frozen): which ones, and that the run
computes exactly what it computed with float32 weights cast by autocast at every call."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import bf16_kd_config, kd_loss_and_grads, write_teacher_and_looped_student
from safetensors.torch import load_file

from loopfit.train.frozen import frozen_linear_weights, store_frozen_linears
from loopfit.train.recipe import depth_at, fit, setup, train


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return write_teacher_and_looped_student(tmp_path_factory.mktemp("frozen"))


@pytest.mark.parametrize("share", [True, False])
def test_stored_bf16_weights_compute_what_autocast_computed(models, tmp_path, share):
    """Loss and every trainable gradient of one LoRA + KD micro-batch under bf16 autocast are bit-equal before and
    after the frozen linear weights are stored in bf16 (shared with the teacher or not)."""
    run = setup(bf16_kd_config(models, tmp_path / "run", share=share))
    batch = run.stream.next()
    depth = depth_at(run, 0)[2]
    loss0, grads0 = kd_loss_and_grads(run, batch, depth)
    saved = store_frozen_linears(run.model, run.teacher)
    assert saved > 0
    loss1, grads1 = kd_loss_and_grads(run, batch, depth)
    run.logger.close()
    assert torch.equal(loss0, loss1)
    assert grads0.keys() == grads1.keys() and len(grads0) > 0
    for n in grads0:
        assert torch.equal(grads0[n], grads1[n]), n


def test_which_weights_are_stored(models, tmp_path):
    """Every base layer of the student's LoRA layers and every teacher linear layer; never an adapter, a trainable
    module, a norm or the tied embedding / lm_head; counted once where student and teacher share a weight."""
    run = setup(bf16_kd_config(models, tmp_path / "run"))
    run.logger.close()
    model, teacher = run.model, run.teacher
    bases = {id(m.base_layer.weight) for n, m in model.named_modules() if n.endswith("_proj")}
    assert len(bases) > 0
    chosen = frozen_linear_weights(model, teacher)
    ids = [id(p) for p in chosen]
    assert len(ids) == len(set(ids))
    teacher_linears = {id(m.weight) for m in teacher.modules() if type(m) is torch.nn.Linear}
    tied = id(teacher.get_input_embeddings().weight)
    assert bases <= set(ids) and set(ids) == (bases | teacher_linears) - {tied}
    store_frozen_linears(model, teacher)
    for n, p in list(model.named_parameters()) + [(f"teacher.{n}", p) for n, p in teacher.named_parameters()]:
        expect = torch.bfloat16 if id(p) in set(ids) else torch.float32
        assert p.dtype == expect, n
        if p.requires_grad or "norm" in n or "embed" in n:
            assert p.dtype == torch.float32, n


def test_a_full_finetune_keeps_its_own_weights(models, tmp_path):
    """Without LoRA the student saves all of its weights: none is touched; the teacher's linear layers still are."""
    run = setup(bf16_kd_config(models, tmp_path / "run", lora=False))
    student_ids = {id(p) for p in run.model.parameters()}
    chosen = frozen_linear_weights(run.model, run.teacher)
    assert chosen and not any(id(p) in student_ids for p in chosen)
    fit(run, until=1)
    run.logger.close()
    assert all(p.dtype == torch.float32 for p in run.model.parameters())
    assert all(p.dtype == torch.bfloat16 for p in chosen)


def test_bf16_run_resumes_exactly_and_saves_float32_adapters(models, tmp_path):
    """A bf16 LoRA run stores its frozen weights at its first step (after any fp32 use of the models); killed after
    a checkpoint and resumed, it logs exactly the unbroken run's losses; its adapters stay float32 on disk."""
    train(bf16_kd_config(models, tmp_path / "a"))
    run = setup(bf16_kd_config(models, tmp_path / "b"))
    base = next(m.base_layer.weight for n, m in run.model.named_modules() if n.endswith("q_proj"))
    assert base.dtype == torch.float32  # nothing changes before training starts
    fit(run, until=4)  # checkpoint at 3, then "killed"
    run.logger.close()
    assert base.dtype == torch.bfloat16
    assert store_frozen_linears(run.model, run.teacher) == 0  # a second call (the next `fit`) stores nothing
    train(bf16_kd_config(models, tmp_path / "b", resume=True))
    keys = ("step", "loss", "ce_loss", "kd_loss", "grad_norm")
    a, b = ([json.loads(x) for x in (tmp_path / p / "metrics.jsonl").read_text().splitlines()] for p in "ab")
    assert len(a) == 6 and [[x[k] for k in keys] for x in a] == [[x[k] for k in keys] for x in b]
    adapter = load_file(str(tmp_path / "a" / "final" / "adapter_model.safetensors"))
    assert adapter and all(t.dtype == torch.float32 for t in adapter.values())
