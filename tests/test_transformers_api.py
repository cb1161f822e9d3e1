"""loopfit speaks the installed transformers' current API: no FutureWarning or DeprecationWarning from its own calls.

Every `warnings.warn` of those categories during convert, train, eval and generate is traced to the call that
triggered it: the frame the warning names (its `stacklevel`), past the call machinery of torch modules and
transformers' decorators. If that frame is loopfit's source, loopfit used a deprecated API and the test fails.
Deprecations that a dependency triggers by itself (e.g. peft reading a renamed transformers property) are not
loopfit's calls and are left to that dependency.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_model, write_teacher_and_looped_student

import loopfit
from loopfit.adaptive import ExitConfig, generate_adaptive
from loopfit.convert import layout_from_sizes, to_looped
from loopfit.evaluate import depth_sweep
from loopfit.train import DistillationConfig, LoRAConfig, TrainConfig
from loopfit.train.recipe import train

LOOPFIT_SRC = str(Path(loopfit.__file__).parent)
# Frames that only pass a call through (module __call__, decorators); the caller is further out.
_PASS_THROUGH = (
    "torch/nn/modules/module.py",
    "torch/utils/_contextlib.py",
    "transformers/modeling_layers.py",
    "transformers/utils/deprecation.py",
    "transformers/utils/generic.py",
    "transformers/utils/output_capturing.py",
    "functools.py",
    "contextlib.py",
)


@pytest.fixture
def loopfit_deprecations(monkeypatch):
    """Collects `(category, message, file:line)` of every deprecation warning triggered by loopfit's own code."""
    found = []
    original = warnings.warn

    def warn(message, category=None, stacklevel=1, *args, **kwargs):
        cat = category or (type(message) if isinstance(message, Warning) else UserWarning)
        if issubclass(cat, (FutureWarning, DeprecationWarning)):
            frame = sys._getframe(stacklevel)  # the frame the warning is attributed to
            while frame is not None and frame.f_code.co_filename.replace("\\", "/").endswith(_PASS_THROUGH):
                frame = frame.f_back
            if frame is not None and frame.f_code.co_filename.startswith(LOOPFIT_SRC):
                found.append((cat.__name__, str(message), f"{frame.f_code.co_filename}:{frame.f_lineno}"))
        return original(message, category, stacklevel + 1, *args, **kwargs)

    monkeypatch.setattr(warnings, "warn", warn)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        yield found


def test_the_detector_catches_a_deprecated_call(loopfit_deprecations):
    """The detector itself: a deprecated keyword passed by loopfit code is caught (here: a layer call)."""
    from transformers.utils.deprecation import deprecate_kwarg

    @deprecate_kwarg("old", "99.0.0", new_name="new")
    def api(new=None):
        return new

    # Compiled with loopfit's file name, so the call looks like one from loopfit's source.
    code = compile("api(old=1)", str(Path(LOOPFIT_SRC) / "fake_caller.py"), "exec")
    exec(code, {"api": api})
    assert loopfit_deprecations and loopfit_deprecations[0][0] == "FutureWarning"


def test_convert_eval_generate_raise_no_deprecation(loopfit_deprecations, tmp_path):
    src = make_tiny_model("qwen2")
    looped = to_looped(src, layout_from_sizes(6, 2, 2, 2), adapter_init="random").eval()
    looped.save_pretrained(tmp_path / "m")
    from transformers import AutoModelForCausalLM

    looped = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    x = torch.randint(3, 260, (2, 16), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": x, "labels": x, "attention_mask": torch.ones_like(x)}
    depth_sweep(looped, [batch], [1, 2, 4])
    depth_sweep(src, [batch], [1])
    looped.generate(x[:1], num_steps=3, max_new_tokens=4, do_sample=False)
    looped.generate(x[:1], num_steps=3, max_new_tokens=4, do_sample=False, use_cache=False)
    generate_adaptive(looped, x[:1], ExitConfig("kl", max_num_steps=4), max_new_tokens=4)
    looped.train()
    looped.generate(x, attention_mask=batch["attention_mask"], max_new_tokens=3, do_sample=True)
    assert loopfit_deprecations == []


def test_training_raises_no_deprecation(loopfit_deprecations, tmp_path, one_thread):
    root = write_teacher_and_looped_student(tmp_path)
    cfg = TrainConfig(
        model_name=str(root / "looped"),
        out=str(tmp_path / "run"),
        data=str(root / "data.txt"),
        seq_len=32,
        batch_size=2,
        max_steps=2,
        progress_bar=False,
        tensorboard=False,
        fixed_num_steps=2,
        lora=LoRAConfig(enabled=True, r=4, modules_to_save=["adapter"]),
        distillation=DistillationConfig(enabled=True, teacher_model_name=str(root / "teacher"), hidden_scale=1.0),
        fixed_point_scale=1.0,
    )
    train(cfg)
    assert (tmp_path / "run" / "final").is_dir()
    assert loopfit_deprecations == []
