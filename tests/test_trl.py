"""TRL's SFTTrainer trains a looped model, given the model object or its folder (TRL from the test dependencies)."""

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
