"""TRL's trainers train looped models (TRL from the test dependencies).

`SFTTrainer` given the model object or its folder; `GKDTrainer` and `DistillationTrainer` with a looped student and
its source model as teacher, sampling on-policy with the student in training mode (one drawn depth per `generate`).
"""

from __future__ import annotations

import pytest
import torch
from conftest import TEXT, make_tiny_model, make_tiny_tokenizer

from loopfit.convert import layout_from_sizes, to_looped

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def looped_dir(tmp_path):
    src = make_tiny_model("qwen2")
    looped = to_looped(src, layout_from_sizes(6, 1, 2, 1), adapter_init="identity", mean_recurrence=2)
    looped.save_pretrained(tmp_path / "looped")
    make_tiny_tokenizer().save_pretrained(tmp_path / "looped")
    return tmp_path / "looped"


def _dataset():
    lines = [x for x in TEXT.split("\n\n") if x][:16]
    return datasets.Dataset.from_dict({"text": lines})


def _args(tmp_path, **kw):
    return trl.SFTConfig(
        output_dir=str(tmp_path / "sft"),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        max_length=48,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        **kw,
    )


@pytest.mark.parametrize("given", ["object", "folder"])
def test_sft_trainer_trains_a_looped_model(looped_dir, tmp_path, given):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(looped_dir) if given == "object" else str(looped_dir)
    trainer = trl.SFTTrainer(
        model=model, args=_args(tmp_path), train_dataset=_dataset(), processing_class=make_tiny_tokenizer()
    )
    assert trainer.model.config.model_type == "looped"
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    losses = [x["loss"] for x in trainer.state.log_history if "loss" in x]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    unchanged = [n for n, p in trainer.model.named_parameters() if p.requires_grad and torch.equal(p, before[n])]
    assert unchanged == []


def test_sft_trainer_with_peft_lora(looped_dir, tmp_path):
    from peft import LoraConfig

    trainer = trl.SFTTrainer(
        model=str(looped_dir),
        args=_args(tmp_path),
        train_dataset=_dataset(),
        processing_class=make_tiny_tokenizer(),
        peft_config=LoraConfig(r=4, target_modules="all-linear", modules_to_save=["adapter"]),
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert any("lora_" in n for n in before) and any("adapter" in n for n in before)
    trainer.train()
    unchanged = [n for n, p in trainer.model.named_parameters() if p.requires_grad and torch.equal(p, before[n])]
    assert unchanged == []


# --- distillation: a looped student, the source model as teacher ---------------------------------------------------


def _teacher_and_student(arch="qwen2", sizes=(1, 2, 1)):
    teacher = make_tiny_model(arch)
    student = to_looped(teacher, layout_from_sizes(6, *sizes), adapter_init="identity", mean_recurrence=2)
    return teacher, student


def _student(student, tmp_path, given):
    """The student object, or the folder it was saved to (with a tokenizer), as the trainers accept either."""
    if given == "object":
        return student
    student.save_pretrained(tmp_path / "student")
    make_tiny_tokenizer().save_pretrained(tmp_path / "student")
    return str(tmp_path / "student")


def _chat_dataset(n=8):
    rows = [
        [{"role": "user", "content": f"fox {i}?"}, {"role": "assistant", "content": f"dog {i % 5}."}] for i in range(n)
    ]
    return datasets.Dataset.from_dict({"messages": rows})


def _prompt_dataset(n=8):
    return datasets.Dataset.from_dict({"prompt": [[{"role": "user", "content": f"fox {i}?"}] for i in range(n)]})


def _trainable(trainer):
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


def _assert_trained(trainer, before, steps=2):
    losses = [x["loss"] for x in trainer.state.log_history if "loss" in x]
    assert len(losses) == steps and all(torch.isfinite(torch.tensor(losses))), losses
    unchanged = [n for n, p in trainer.model.named_parameters() if p.requires_grad and torch.equal(p, before[n])]
    assert unchanged == []


def _distillation_args(tmp_path, **kw):
    return trl.DistillationConfig(
        output_dir=str(tmp_path / "distill"),
        per_device_train_batch_size=2,
        max_completion_length=6,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,
        dataloader_num_workers=0,
        **{"max_steps": 2, "learning_rate": 1e-2} | kw,
    )


@pytest.mark.parametrize(
    "given, lmbda, checkpointing",
    [("object", 1.0, True), ("folder", 1.0, False), ("object", 0.0, True)],
    ids=["on-policy", "on-policy-folder-kv-cache", "off-policy"],
)
def test_gkd_trainer_distills_into_a_looped_student(tmp_path, given, lmbda, checkpointing):
    """lmbda = 1: every batch is sampled by the student in training mode (TRL's default gradient checkpointing
    turns the KV cache off while sampling; without it the cache is on); lmbda = 0: the dataset's completions."""
    gkd = pytest.importorskip("trl.experimental.gkd")
    teacher, student = _teacher_and_student()
    args = gkd.GKDConfig(
        output_dir=str(tmp_path / "gkd"),
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        max_length=48,
        max_new_tokens=6,
        lmbda=lmbda,
        seq_kd=False,
        gradient_checkpointing=checkpointing,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
    )
    trainer = gkd.GKDTrainer(
        model=_student(student, tmp_path, given),
        teacher_model=teacher,
        args=args,
        train_dataset=_chat_dataset(),
        processing_class=make_tiny_tokenizer(),
    )
    assert trainer.model.config.model_type == "looped"
    before = _trainable(trainer)
    trainer.train()
    _assert_trained(trainer, before)


@pytest.mark.parametrize("given", ["object", "folder"])
def test_distillation_trainer_distills_into_a_looped_student(tmp_path, given):
    """On-policy: the student samples every completion (training mode, KV cache on), the teacher scores it."""
    from transformers import AutoModelForCausalLM

    teacher, student = _teacher_and_student()
    trainer = trl.DistillationTrainer(
        model=_student(student, tmp_path, given),
        teacher_model=teacher,
        args=_distillation_args(tmp_path),
        train_dataset=_prompt_dataset(),
        processing_class=make_tiny_tokenizer(),
    )
    assert trainer.model.config.model_type == "looped"
    before = _trainable(trainer)
    trainer.train()
    _assert_trained(trainer, before)
    trainer.save_model(str(tmp_path / "out"))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert reloaded.config.model_type == "looped"
    state = trainer.model.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in reloaded.state_dict().items())


def test_distillation_trainer_with_peft_lora_on_a_looped_student(tmp_path):
    """The trainer runs `base_model.model.base_model` (the LoRA-wrapped `LoopedModel`), not `PeftModel.forward`."""
    from peft import LoraConfig

    teacher, student = _teacher_and_student()
    trainer = trl.DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=_distillation_args(tmp_path),
        train_dataset=_prompt_dataset(),
        processing_class=make_tiny_tokenizer(),
        peft_config=LoraConfig(r=4, target_modules="all-linear", modules_to_save=["adapter"]),
    )
    before = _trainable(trainer)
    assert any("lora_" in n for n in before) and any("adapter" in n for n in before)
    trainer.train()
    _assert_trained(trainer, before)


@pytest.mark.parametrize("arch", ["qwen2", "granite", "cohere", "gemma2"])
def test_distillation_trainer_applies_the_looped_students_logit_transform(tmp_path, arch):
    """A looped student that computes its teacher's function (all 6 layers kept, identity adapter) has zero loss.

    DistillationTrainer never calls the student's forward: it runs `model.base_model`, then `lm_head` and the logit
    scale / soft-cap it reads from the config (Granite's `logits_scaling`, Cohere's `logit_scale`, Gemma's
    `final_logit_softcapping`), so the looped config must answer for them as its source's does.
    """
    teacher, student = _teacher_and_student(arch, sizes=(2, 1, 3))
    trainer = trl.DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=_distillation_args(tmp_path, max_steps=1),
        train_dataset=_prompt_dataset(4),
        processing_class=make_tiny_tokenizer(),
    )
    trainer.train()
    losses = [x["loss"] for x in trainer.state.log_history if "loss" in x]
    assert len(losses) == 1 and abs(losses[0]) < 1e-5, losses


def test_on_policy_generation_runs_one_drawn_depth_per_call_without_warnings():
    """As the trainers sample: training mode, their own `GenerationConfig`, sampling, with and without a KV cache.

    Every forward call of one `generate` runs the depth drawn for that call, and transformers does not warn that a
    `generation_config` came with generation arguments (the drawn `num_steps` is a model argument).
    """
    import logging

    from transformers import GenerationConfig
    from transformers.utils import logging as hf_logging

    _, student = _teacher_and_student()
    student.train()
    depths = []
    forward = student.model._forward
    student.model._forward = lambda *a, **k: depths.append(a[6]) or forward(*a, **k)  # a[6]: num_steps
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    hf_logging.get_logger("transformers").addHandler(handler)
    logging.Logger.warning_once.cache_clear()  # a message logged earlier in the session would be swallowed
    try:
        torch.manual_seed(0)
        x = torch.randint(3, 260, (2, 5))
        for use_cache in (True, False, True, False):
            depths.clear()
            config = GenerationConfig(max_new_tokens=4, do_sample=True, top_k=0, use_cache=use_cache, pad_token_id=0)
            out = student.generate(input_ids=x, attention_mask=torch.ones_like(x), generation_config=config)
            assert out.shape == (2, 9)
            assert len(depths) == 4 and len(set(depths)) == 1 and depths[0] is not None, depths
    finally:
        hf_logging.get_logger("transformers").removeHandler(handler)
    assert [r.getMessage() for r in records if "num_steps" in r.getMessage()] == []
