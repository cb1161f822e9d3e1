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
