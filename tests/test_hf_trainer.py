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
    dcfg = DistillationConfig(enabled=True, temperature=2.0)
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
    dcfg = DistillationConfig(enabled=True)
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


def _args(tmp_path, **kw):
    return TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=2, learning_rate=1e-3,
                             logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, **kw)  # fmt: skip


def test_hidden_scale_adds_the_hidden_term(tmp_path):
    """`hidden_scale` on a looped student: the loss grows by exactly `hidden_scale` x the alignment of each loop
    state with the teacher layer it stands for (computed here by hand), and the term is trained and logged."""
    from loopfit.losses import HiddenStateLoss, loop_layer_map

    teacher = make_tiny_model("llama", num_layers=4, hidden=32)
    student = to_looped(teacher, layout_from_sizes(4, 1, 1, 1), adapter_init="random", state_init="zeros").train()
    inputs = {k: v[None] for k, v in _Rows()[1].items()}
    inputs["labels"][0, :3] = -100
    losses = {}
    for scale in (0.0, 0.5):
        dcfg = DistillationConfig(enabled=True, hidden_scale=scale)
        trainer = DistillationTrainer(model=student, args=_args(tmp_path), train_dataset=_Rows(),
                                      teacher_model=teacher, distillation=dcfg, num_steps=2)  # fmt: skip
        losses[scale] = trainer.compute_loss(student, inputs).item()
    assert trainer.objective.hidden_loss is not None
    ids, labels = inputs["input_ids"], inputs["labels"]
    mask = torch.nn.functional.pad(labels[:, 1:] != -100, (0, 1), value=False)
    with torch.no_grad():
        states = student.model(ids, num_steps=2, output_states=True).states
        t_states = teacher.model(ids, output_hidden_states=True).hidden_states
    layers = loop_layer_map(2, (1, 2))  # layout 0 : 2 : 3: the block (source layer 2) and the dropped layer 1
    hidden = HiddenStateLoss(32, 32)(list(states), [t_states[i + 1] for i in layers], mask).item()
    assert hidden > 0.01
    assert math.isclose(losses[0.5] - losses[0.0], 0.5 * hidden, rel_tol=1e-4)

    trainer._terms = {}
    trainer.train()
    logs = [x for x in trainer.state.log_history if "hidden_loss" in x]
    assert len(logs) == 2 and all(x["hidden_loss"] > 0 and x["kd_loss"] > 0 for x in logs)


def test_every_distillation_option_is_served_or_refused(tmp_path):
    """Options the trainer cannot serve are refused at construction with one message, never silently ignored."""
    from loopfit.errors import LoopfitError

    teacher = make_tiny_model("llama", num_layers=4, hidden=32)
    looped = to_looped(teacher, layout_from_sizes(4, 1, 1, 1))
    plain = make_tiny_model("llama", num_layers=2, hidden=32, seed=1)
    wide = make_tiny_model("llama", num_layers=4, hidden=48, seed=2)

    def build(student, teacher_model=teacher, **kw):
        extra = {k: kw.pop(k) for k in ("fixed_point_scale",) if k in kw}
        dcfg = DistillationConfig(**kw)
        return DistillationTrainer(model=student, args=_args(tmp_path), train_dataset=_Rows(),
                                   teacher_model=teacher_model, distillation=dcfg, **extra)  # fmt: skip

    cases = [
        (dict(student=plain, enabled=True, hidden_scale=1.0), "needs a looped student"),
        (dict(student=looped, teacher_model=wide, enabled=True, hidden_scale=1.0), "width 32 and a teacher of width"),
        (dict(student=looped, enabled=True, hidden_map="last"), "does nothing without"),
        (dict(student=looped, enabled=True, kind="jsd", kind_params={"beta": 1.5}), "beta of the 'jsd' divergence"),
        (dict(student=looped, enabled=True, kind_params={"lam": 0.5}), "'lam' is not a parameter of the 'fkl'"),
        (dict(student=looped, enabled=True, teacher_cache="somewhere"), "not both"),
        (dict(student=looped, enabled=False), "enabled is false"),
        (dict(student=looped, teacher_model=None, enabled=True), "no teacher_model"),
        (dict(student=looped, teacher_model=None, enabled=True, teacher_cache=str(tmp_path), hidden_scale=1.0),
         "hidden_scale needs a live teacher"),
        (dict(student=looped, enabled=True, chunk_size=0), "chunk_size must be >= 1"),
        (dict(student=plain, enabled=True, fixed_point_scale=1.0), "fixed_point_scale needs a looped student"),
    ]  # fmt: skip
    for kw, message in cases:
        with pytest.raises(LoopfitError, match=message):
            build(**kw)
    # Served: the fixed-point term and the logged terms of the objective.
    trainer = build(looped, enabled=True, fixed_point_scale=1.0, kind="skew", kind_params={"alpha": 0.2})
    assert trainer.objective.weights.fixed_point_scale == 1.0 and trainer.objective.divergence.name == "skew"


def test_teacher_cache_equals_the_live_teacher(tmp_path):
    """`distillation.teacher_cache` (top-k = the whole vocabulary): the cache's targets join the training rows, and
    the loss equals the live teacher's."""
    from loopfit.cache.writer import CacheSettings, write_cache

    teacher = make_tiny_model("llama", num_layers=4, hidden=32)
    student = to_looped(teacher, layout_from_sizes(4, 1, 1, 1), adapter_init="random").train()
    info = {"teacher": "tiny", "tokenizer_hash": "-", "data_hash": "-", "vocab_size": 260}
    write_cache(teacher, _MaskedRows(n=4), tmp_path / "cache", CacheSettings(estimator="topk_tail", top_k=260), info,
                progress=False)  # fmt: skip
    common = dict(enabled=True, ce_scale=0.3, kd_scale=0.7, temperature=2.0, kind="jsd")
    live = DistillationTrainer(model=student, args=_args(tmp_path / "a"), train_dataset=_MaskedRows(n=4),
                               teacher_model=teacher, distillation=DistillationConfig(**common),
                               num_steps=2)  # fmt: skip
    cached = DistillationTrainer(model=student, args=_args(tmp_path / "b"), train_dataset=_MaskedRows(n=4),
                                 distillation=DistillationConfig(teacher_cache=str(tmp_path / "cache"), **common),
                                 num_steps=2)  # fmt: skip
    assert cached.teacher is None and cached.objective.teacher == "cache"
    rows = [cached.train_dataset[i] for i in range(4)]
    assert {"teacher_ids", "teacher_values", "teacher_tail"} <= set(rows[0])
    batch = torch.utils.data.default_collate(rows)
    with torch.no_grad():
        a = live.compute_loss(student, {k: batch[k] for k in ("input_ids", "labels")}).item()
        b = cached.compute_loss(student, batch).item()
    assert math.isclose(a, b, rel_tol=1e-3)
    from loopfit.errors import LoopfitError

    with pytest.raises(LoopfitError, match="no cached targets"):
        cached.compute_loss(student, {k: batch[k] for k in ("input_ids", "labels")})
    cached.train()  # the batches keep the cached targets through HF's column filter
    assert [x for x in cached.state.log_history if "kd_loss" in x]


def test_teacher_by_name_and_shared_weights(tmp_path):
    """`distillation.teacher_model_name` loads the teacher (same loss as passing it); `share_weights` points a LoRA
    student's frozen layers at the teacher's identical tensors."""
    from loopfit.train.config import LoRAConfig
    from loopfit.train.student import apply_lora

    teacher = make_tiny_model("llama", num_layers=4, hidden=32)
    teacher.save_pretrained(tmp_path / "teacher")
    student = to_looped(teacher, layout_from_sizes(4, 1, 1, 1), state_init="zeros")
    inputs = {k: v[None] for k, v in _Rows()[2].items()}
    by_object = DistillationTrainer(model=student, args=_args(tmp_path / "a"), teacher_model=teacher,
                                    distillation=DistillationConfig(enabled=True), num_steps=2)  # fmt: skip
    named = DistillationConfig(enabled=True, teacher_model_name=str(tmp_path / "teacher"))
    by_name = DistillationTrainer(model=student, args=_args(tmp_path / "b"), distillation=named, num_steps=2)
    assert by_name.teacher is not None and by_name.teacher is not teacher
    with torch.no_grad():
        a, b = by_object.compute_loss(student, inputs).item(), by_name.compute_loss(student, inputs).item()
    assert math.isclose(a, b, rel_tol=1e-6)

    lora = apply_lora(to_looped(teacher, layout_from_sizes(4, 1, 1, 1)), LoRAConfig(enabled=True, r=4))
    held = {p.data_ptr() for p in teacher.parameters()}
    DistillationTrainer(model=lora, args=_args(tmp_path / "c"), teacher_model=teacher,
                        distillation=DistillationConfig(enabled=True))  # fmt: skip
    shared = [n for n, p in lora.named_parameters() if not p.requires_grad and p.data_ptr() in held]
    assert any("embed_tokens" in n for n in shared) and any(".block." in n for n in shared)


class _Documents(torch.utils.data.Dataset):
    """Documents of different lengths, unpadded (a collator pads or packs them); the first 2 tokens of each are a
    prompt."""

    def __init__(self, lengths=(5, 9, 12, 7)):
        g = torch.Generator().manual_seed(1)
        self.docs = [torch.randint(4, 260, (n,), generator=g).tolist() for n in lengths]

    def __len__(self):
        return len(self.docs)

    def __getitem__(self, i):
        return {"input_ids": self.docs[i], "labels": [-100, -100, *self.docs[i][2:]]}


def _pad(rows):
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.tensor([r["input_ids"] + [0] * (width - len(r["input_ids"])) for r in rows])
    labels = torch.tensor([r["labels"] + [-100] * (width - len(r["labels"])) for r in rows])
    return {"input_ids": ids, "labels": labels}


@pytest.mark.parametrize("looped", [True, False])
def test_padding_free_collator_gives_the_padded_update(tmp_path, looped):
    """HF's padding-free `DataCollatorWithFlattening` (one row, position ids restarting at each document) gives the
    update of the same documents right-padded: the trainer passes the position ids, so documents stay apart."""
    import copy

    from transformers import DataCollatorWithFlattening

    teacher = make_tiny_model("llama", num_layers=4, hidden=32)
    if looped:
        student = to_looped(teacher, layout_from_sizes(4, 1, 1, 1), adapter_init="random", state_init="zeros")
    else:
        student = make_tiny_model("llama", num_layers=2, hidden=32, seed=1)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    after = {}
    for name, collator in (("padded", _pad), ("flat", DataCollatorWithFlattening(return_position_ids=True))):
        model = copy.deepcopy(student).train()
        args = TrainingArguments(output_dir=str(tmp_path / name), per_device_train_batch_size=4, max_steps=1,
                                 learning_rate=0.5, optim="sgd", lr_scheduler_type="constant", weight_decay=0.0,
                                 max_grad_norm=0.0, train_sampling_strategy="sequential", report_to=[],
                                 save_strategy="no", use_cpu=True, seed=0, remove_unused_columns=False)  # fmt: skip
        DistillationTrainer(model=model, args=args, train_dataset=_Documents(), teacher_model=teacher,
                            data_collator=collator, distillation=DistillationConfig(enabled=True),
                            num_steps=2).train()  # fmt: skip
        after[name] = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert any(not torch.equal(after["padded"][n], before[n]) for n in before)
    for n in before:  # updates equal to within the rounding of `p - lr * g` (2 ulps of the parameter's size)
        ulp = torch.finfo(torch.float32).eps * before[n].abs().max().item()
        torch.testing.assert_close(after["flat"][n] - before[n], after["padded"][n] - before[n], rtol=1e-4,
                                   atol=max(2 * ulp, 1e-7))  # fmt: skip
