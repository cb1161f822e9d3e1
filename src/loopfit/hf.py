"""`DistillationTrainer`: HF `Trainer` with loopfit's losses (fused CE + KD from a frozen teacher, looped students).

For users who live in the HF Trainer. It changes only `compute_loss` and the count of the step's target tokens
that scales it (and adds the CE / KD terms to the logs); everything else (optimizer, schedule, accumulation,
checkpoints, callbacks) stays the Trainer's own.

    trainer = DistillationTrainer(model=student, args=TrainingArguments(...), train_dataset=ds,
                                  teacher_model=teacher, distillation=DistillationConfig(enabled=True, alpha=0.5))
"""

from __future__ import annotations

import torch
from transformers import Trainer

from loopfit.train.config import DistillationConfig
from loopfit.train.student import Student, micro_batch_loss


class DistillationTrainer(Trainer):
    """HF Trainer whose loss is loopfit's `micro_batch_loss`.

    Args:
        teacher_model: frozen teacher (put in eval mode, no grad, moved to the training device); None = CE only.
        distillation: divergence, temperature, alpha or ce/kd scales, fused path (a `DistillationConfig`).
        num_steps: loop depth R (int) or `(n_no_grad, k_grad)` for a looped student; None = the model's default.
        Other arguments are `Trainer`'s.
    """

    def __init__(self, *args, teacher_model=None, distillation: DistillationConfig | None = None, num_steps=None,
                 **kwargs):  # fmt: skip
        super().__init__(*args, **kwargs)
        self.distillation = distillation or DistillationConfig(enabled=teacher_model is not None)
        if self.distillation.enabled and teacher_model is None:
            raise ValueError("distillation is enabled but no teacher_model was given")
        self.teacher = None
        if teacher_model is not None:
            self.teacher = teacher_model.to(self.args.device).eval().requires_grad_(False)
        self.num_steps = num_steps
        # The loss below is already divided by the number of target tokens of the whole accumulated batch (counted
        # in `get_batch_samples`), so HF must not divide it again by the accumulation steps.
        self.loss_is_scaled_for_ga = True
        self._terms: dict[str, list[float]] = {}

    def get_batch_samples(self, epoch_iterator, num_batches: int, device) -> tuple[list, torch.Tensor | None]:
        """The micro-batches of one optimizer step and their number of target tokens, a 0-dim tensor on `device`.

        The count is `labels[:, 1:] != -100` (the positions the losses score) over every micro-batch of the step,
        summed over processes when `average_tokens_across_devices`. HF counts only when the model declares that it
        accepts loss kwargs; otherwise `compute_loss` would get None, make each micro-batch a mean of its own, and
        the update would depend on the accumulation split and on what the student declares.
        """
        batch_samples, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        if not batch_samples:
            return batch_samples, None
        count = sum((b["labels"][:, 1:] != -100).sum() for b in batch_samples).to(device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            count = self.accelerator.gather(count).sum()
        return batch_samples, count

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        student = Student(model)
        labels = inputs["labels"]
        if num_items_in_batch is None:
            num_items_in_batch = (labels[:, 1:] != -100).sum()
        num_items = torch.as_tensor(num_items_in_batch, device=labels.device).float().clamp_min(1.0)
        batch = {"input_ids": inputs["input_ids"], "labels": labels}
        steps = self.num_steps if student.looped else None
        parts = micro_batch_loss(student, self.teacher, batch, steps, self.distillation, num_items)
        loss = parts.total
        if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
            loss = loss * self.accelerator.num_processes  # num_items counts every process's tokens
        for name, value in (("ce_loss", parts.ce), ("kd_loss", parts.kd)):
            if value is not None:
                self._terms.setdefault(name, []).append(float(value))
        return (loss, None) if return_outputs else loss

    def log(self, logs: dict, *args, **kwargs) -> None:
        if "loss" in logs and self._terms:
            # Each logged term is the sum over the micro-batches of an optimizer step (a per-token mean), averaged
            # over the steps since the last log.
            steps = max(1, len(self._terms["ce_loss"]) // max(1, self.args.gradient_accumulation_steps))
            for name, values in self._terms.items():
                logs[name] = sum(values) / steps
            self._terms = {}
        super().log(logs, *args, **kwargs)
