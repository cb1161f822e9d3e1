"""`loopfit.hf.DistillationTrainer`: the HF Trainer with loopfit's losses on a tiny looped student."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_tiny_model
from transformers import TrainingArguments

from loopfit.convert import layout_from_sizes, to_looped
from loopfit.hf import DistillationTrainer
from loopfit.train.config import DistillationConfig


class _Rows(torch.utils.data.Dataset):
    def __init__(self, n=8, seq=16, vocab=260):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(4, vocab, (n, seq), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i].clone()}


pytestmark = pytest.mark.usefixtures("one_thread")


def test_distillation_trainer_uses_loopfit_losses(tmp_path):
    teacher = make_tiny_model("llama", num_layers=4, hidden=32)
    student = to_looped(teacher, layout_from_sizes(4, 1, 1, 1), state_init="zeros").train()
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=6, learning_rate=3e-3,
                             logging_steps=3, report_to=[], save_strategy="no", use_cpu=True,
                             gradient_accumulation_steps=2)  # fmt: skip
    dcfg = DistillationConfig(enabled=True, alpha=0.5, temperature=2.0)
    trainer = DistillationTrainer(model=student, args=args, train_dataset=_Rows(), teacher_model=teacher,
                                  distillation=dcfg, num_steps=2)  # fmt: skip

    # The loss of one batch equals the recipe's: 0.5 * CE + 0.5 * KD(T=2) computed densely here.
    batch = _Rows()[0]
    inputs = {k: v[None] for k, v in batch.items()}
    loss = trainer.compute_loss(student, inputs)
    with torch.no_grad():
        s = student(inputs["input_ids"], num_steps=2).logits[0, :-1]
        t = teacher(inputs["input_ids"]).logits[0, :-1]
    y = inputs["labels"][0, 1:]
    ce = torch.nn.functional.cross_entropy(s, y)
    kd = torch.nn.functional.kl_div((s / 2).log_softmax(-1), (t / 2).log_softmax(-1), log_target=True,
                                    reduction="batchmean") * 4  # fmt: skip
    assert math.isclose(loss.item(), 0.5 * ce.item() + 0.5 * kd.item(), rel_tol=1e-4)
    assert trainer.teacher is teacher and not any(p.requires_grad for p in teacher.parameters())

    trainer._terms = {}
    before = [p.detach().clone() for p in student.parameters()]
    trainer.train()
    logs = [x for x in trainer.state.log_history if "ce_loss" in x]
    assert len(logs) == 2 and all(x["kd_loss"] > 0 for x in logs)
    assert logs[-1]["loss"] < logs[0]["loss"]
    assert all(not torch.equal(a, b) for a, b in zip(before, student.parameters()) if b.requires_grad)


class _MaskedRows(_Rows):
    """Rows with different numbers of target tokens: a masked prompt of 0, 3, 7, 11 tokens (and padding on one)."""

    def __getitem__(self, i):
        labels = self.ids[i].clone()
        labels[: (0, 3, 7, 11)[i % 4]] = -100
        if i % 4 == 1:
            labels[-4:] = -100
        return {"input_ids": self.ids[i], "labels": labels}


def _one_step(student, teacher, tmp_path, batch, accumulation, accepts):
    """Parameters of `student` after one SGD step of the DistillationTrainer over the 4 rows of `_MaskedRows`."""
    student.accepts_loss_kwargs = accepts  # what HF's Trainer reads to decide how the loss is scaled
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=batch, max_steps=1,
                             gradient_accumulation_steps=accumulation, learning_rate=0.5, optim="sgd",
                             lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0,
                             train_sampling_strategy="sequential", report_to=[], save_strategy="no", use_cpu=True,
                             seed=0)  # fmt: skip
    dcfg = DistillationConfig(enabled=True, alpha=0.5)
    trainer = DistillationTrainer(model=student, args=args, train_dataset=_MaskedRows(n=4), teacher_model=teacher,
                                  distillation=dcfg, num_steps=2)  # fmt: skip
    trainer.train()
    return {n: p.detach().clone() for n, p in student.named_parameters()}


@pytest.mark.parametrize("accepts", [True, False])
@pytest.mark.parametrize("looped", [True, False])
def test_accumulation_gives_the_large_batch_update(tmp_path, looped, accepts):
    """One step over 4 rows at once == 2 x 2 rows accumulated, whatever the model says about loss kwargs: the update
    is the per-token mean over the whole batch (rows hold different numbers of targets). SGD: the update is linear
    in the gradient, so any mis-scaling shows (Adam's first step would hide it)."""
    import copy

    teacher = make_tiny_model("llama", num_layers=4, hidden=32)
    if looped:
        student = to_looped(teacher, layout_from_sizes(4, 1, 1, 1), state_init="zeros")
    else:
        student = make_tiny_model("llama", num_layers=2, hidden=32, seed=1)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    big = _one_step(copy.deepcopy(student).train(), teacher, tmp_path / "a", 4, 1, accepts)
    small = _one_step(copy.deepcopy(student).train(), teacher, tmp_path / "b", 2, 2, accepts)
    assert any(not torch.equal(big[n], before[n]) for n in big)
    for n in big:
        say = lambda m, n=n: f"{n}: {m}"  # noqa: E731
        torch.testing.assert_close(small[n], big[n], rtol=1e-6, atol=1e-7, msg=say)
        torch.testing.assert_close(small[n] - before[n], big[n] - before[n], rtol=1e-4, atol=1e-7, msg=say)
