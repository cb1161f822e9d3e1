"""`DistillationTrainer`: HF `Trainer` with loopfit's objective (fused CE + KD from a frozen teacher or a teacher cache,
hidden-state alignment and the fixed-point term for looped students).

For users who live in the HF Trainer. It changes only `compute_loss` and the count of the step's target tokens
that scales it (and adds each term to the logs); everything else (optimizer, schedule, accumulation, checkpoints,
callbacks) stays the Trainer's own. The loss is the one `loopfit train` uses: an `Objective` built once here, from
the same `DistillationConfig`, by the same `build_objective`.

    trainer = DistillationTrainer(model=student, args=TrainingArguments(...), train_dataset=ds,
                                  teacher_model=teacher, distillation=DistillationConfig(enabled=True))

Every `DistillationConfig` field is served, or refused at construction with one `LoopfitError`:

- `enabled`, `temperature`, `ce_scale`, `kd_scale`, `kind`, `kind_params`, `fused`, `chunk_size`: as in
  `loopfit train`, checked by `DistillationConfig.validate`.
- `teacher_model_name`: loaded when no `teacher_model` object is given (giving both is refused).
- `teacher_cache`: the cache's targets are added to the training rows (`TeacherTargetsDataset`: row i of the data
  must be row i the cache was made from); batches without them (e.g. evaluation data) are refused when scored.
- `hidden_scale`, `hidden_kind`, `hidden_map`: a looped student and a live teacher of the same width (the HF
  optimizer trains the model's parameters only, so no projection between widths could learn).
- `share_weights`: applied to a PEFT (LoRA) student, as in `loopfit train`.
- `on_policy`: refused when on (`lmbda` > 0): TRL's `GKDTrainer` / `DistillationTrainer` sample on-policy with a
  looped student.
"""

from __future__ import annotations

import torch
from transformers import Trainer

from loopfit.cache.reader import TeacherCache, TeacherTargetsDataset
from loopfit.errors import LoopfitError
from loopfit.loading import load_model
from loopfit.train.config import DistillationConfig
from loopfit.train.student import Student, base_model, build_objective, is_looped, objective_loss, share_teacher_weights
from loopfit.train.validate import check_same_vocabulary

TEACHER_COLUMNS = ["teacher_ids", "teacher_values", "teacher_tail"]


class DistillationTrainer(Trainer):
    """HF Trainer whose loss is loopfit's `Objective` (`loopfit.train.student.objective_loss`).

    Args:
        teacher_model: frozen teacher (put in eval mode, no grad, moved to the training device); None = CE only,
            or the teacher named by `distillation.teacher_model_name` / read from `distillation.teacher_cache`.
        distillation: divergence, temperature, CE and KD weights, fused path, hidden-state alignment (a
            `DistillationConfig`; see the module docstring for what each field does here).
        num_steps: loop depth R (int) or `(n_no_grad, k_grad)` for a looped student; None = the model's default.
        fixed_point_scale: weight of the fixed-point loss of a looped student (as `loopfit train --fixed_point_scale`).
        Other arguments are `Trainer`'s.

    Raises:
        LoopfitError: a distillation setting that is invalid or that this student and teacher cannot serve.
    """

    def __init__(self, *args, teacher_model=None, distillation: DistillationConfig | None = None, num_steps=None,
                 fixed_point_scale: float = 0.0, **kwargs):  # fmt: skip
        super().__init__(*args, **kwargs)
        dcfg = distillation or DistillationConfig(enabled=teacher_model is not None)
        if teacher_model is not None and not dcfg.enabled:
            raise LoopfitError("a teacher_model was given but distillation.enabled is false")
        if teacher_model is not None and (dcfg.teacher_model_name or dcfg.teacher_cache):
            raise LoopfitError("give teacher_model or distillation.teacher_model_name / teacher_cache, not both")
        if dcfg.enabled and teacher_model is None and not (dcfg.teacher_model_name or dcfg.teacher_cache):
            raise LoopfitError("distillation is enabled but no teacher_model (or distillation.teacher_model_name / "
                               "teacher_cache) was given")  # fmt: skip
        dcfg.validate(teacher_model=teacher_model is not None)
        if dcfg.on_policy.lmbda > 0:
            raise LoopfitError("distillation.on_policy is `loopfit train`'s; under the HF Trainer sample on-policy "
                               "with TRL's GKDTrainer (lmbda) or DistillationTrainer")  # fmt: skip
        if dcfg.enabled and dcfg.teacher_model_name:
            if hasattr(self.processing_class, "get_vocab"):  # a tokenizer: the teacher's must map every token alike
                check_same_vocabulary("the student", self.processing_class, dcfg.teacher_model_name)
            teacher_model = load_model(dcfg.teacher_model_name)
        if not fixed_point_scale >= 0:
            raise LoopfitError(f"fixed_point_scale must be >= 0, got {fixed_point_scale}")
        self.distillation = dcfg
        self.teacher = None
        vocab = base_model(self.model).get_output_embeddings().weight.shape[0]
        if teacher_model is not None:
            tv = teacher_model.get_output_embeddings().weight.shape[0]
            if tv != vocab:
                raise LoopfitError(f"teacher vocabulary ({tv}) differs from the student's ({vocab}); KD needs the "
                                   "same one")  # fmt: skip
            self.teacher = teacher_model.to(self.args.device).eval().requires_grad_(False)
        estimator = self._use_cache(dcfg, vocab) if dcfg.enabled and dcfg.teacher_cache else None
        if dcfg.hidden_scale and self.teacher is not None:
            sw, tw = base_model(self.model).config.hidden_size, self.teacher.config.hidden_size
            if is_looped(base_model(self.model)) and sw != tw:
                raise LoopfitError(f"distillation.hidden_scale with a student of width {sw} and a teacher of width "
                                   f"{tw} needs a trained projection, which the HF optimizer would not train; use "
                                   "`loopfit train`")  # fmt: skip
        if self.teacher is not None and dcfg.share_weights and hasattr(self.model, "get_base_model"):
            share_teacher_weights(self.model, self.teacher)  # LoRA: frozen layers equal to the teacher's, held once
        self.objective = build_objective(dcfg, self.model, self.teacher, cache_estimator=estimator,
                                         fixed_point_scale=fixed_point_scale)  # fmt: skip
        self.num_steps = num_steps
        # The loss below is already divided by the number of target tokens of the whole accumulated batch (counted
        # in `get_batch_samples`), so HF must not divide it again by the accumulation steps.
        self.loss_is_scaled_for_ga = True
        self._terms: dict[str, list[float]] = {}

    def _use_cache(self, dcfg: DistillationConfig, vocab: int) -> str:
        """Check the teacher cache and add its targets to the training rows; returns its estimator."""

        cache = TeacherCache(dcfg.teacher_cache)
        cache.verify()  # every shard's checksum, before any step
        if cache.vocab_size != vocab:
            raise LoopfitError(f"teacher cache vocabulary ({cache.vocab_size}) differs from the student's ({vocab})")
        if cache.definition.tempered and dcfg.temperature != cache.temperature:
            raise LoopfitError(f"teacher cache {cache.folder} was drawn at temperature {cache.temperature}; "
                               f"distillation.temperature is {dcfg.temperature}")  # fmt: skip
        if self.train_dataset is not None:
            self.train_dataset = TeacherTargetsDataset(self.train_dataset, cache)
        return cache.estimator

    def _set_signature_columns_if_needed(self) -> None:
        # The cached targets are no argument of the model's forward; HF would drop them from the batches.
        super()._set_signature_columns_if_needed()
        if isinstance(getattr(self, "_signature_columns", None), list):
            self._signature_columns += [c for c in TEACHER_COLUMNS if c not in self._signature_columns]

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
        student = Student(model, self.objective.hidden_loss)
        labels = inputs["labels"]
        if num_items_in_batch is None:
            num_items_in_batch = (labels[:, 1:] != -100).sum()
        num_items = torch.as_tensor(num_items_in_batch, device=labels.device).float().clamp_min(1.0)
        # position_ids: a padding-free collator (HF's DataCollatorWithFlattening) packs the rows; they keep them apart.
        batch = {k: v for k, v in inputs.items() if k in ("input_ids", "labels", "position_ids", *TEACHER_COLUMNS)}
        steps = self.num_steps if student.looped else None
        parts = objective_loss(self.objective, student, self.teacher, batch, steps, num_items)
        loss = parts.total
        if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
            loss = loss * self.accelerator.num_processes  # num_items counts every process's tokens
        for name, value in parts.named().items():
            self._terms.setdefault(f"{name}_loss", []).append(float(value))
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
