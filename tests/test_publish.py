"""Folders others can load: model cards, `num_steps` in generation_config.json, and remote code without loopfit."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import make_tiny_model, make_tiny_tokenizer, write_teacher_and_looped_student
from transformers import AutoModelForCausalLM

from loopfit.cli import main
from loopfit.convert import layout_from_sizes, to_looped
from loopfit.train import LoRAConfig, TrainConfig
from loopfit.train.commands import export_command
from loopfit.train.recipe import train

pytestmark = pytest.mark.usefixtures("one_thread")


def _card(folder):
    text = (folder / "README.md").read_text()
    assert text.startswith("---\n")
    meta = yaml.safe_load(text.split("---\n")[1])
    return meta, text


def test_convert_writes_card_depth_and_remote_code(tiny_source_dir, tmp_path):
    (tiny_source_dir / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny\n")
    out = tmp_path / "looped"
    main(["convert", str(tiny_source_dir), "--out", str(out), "--layers", "0-1:3-4:5", "--mean_recurrence", "3",
          "--remote_code=true"])  # fmt: skip
    meta, text = _card(out)
    assert meta["base_model"] == str(tiny_source_dir) and meta["license"] == "apache-2.0"
    assert "| recurrent block | 3, 4 |" in text and "| dropped | 2 |" in text and "trust_remote_code=True" in text
    assert json.loads((out / "generation_config.json").read_text())["num_steps"] == 3
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_looped.LoopedForCausalLM"
    for name in ("families.py", "configuration_looped.py", "modeling_looped.py"):
        assert "from loopfit" not in (out / name).read_text()


def test_default_is_no_remote_code(tiny_source_dir, tmp_path):
    out = tmp_path / "looped"
    main(["convert", str(tiny_source_dir), "--out", str(out), "--layers", "0-1:3-4:5"])
    assert "auto_map" not in json.loads((out / "config.json").read_text())
    assert not (out / "modeling_looped.py").exists()
    meta, text = _card(out)
    assert meta["license"] == "other" and "import loopfit" in text and "Not healed" in text


def test_generate_honours_num_steps_of_the_generation_config(tmp_path):
    src = make_tiny_model("llama")
    model = to_looped(src, layout_from_sizes(6, 2, 2, 2), adapter_init="random", mean_recurrence=1).eval()
    model.generation_config.num_steps = 4
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.generation_config.num_steps == 4
    x = torch.randint(3, 260, (1, 6), generator=torch.Generator().manual_seed(0))
    kw = dict(max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True)
    default, at4, at1 = (
        loaded.generate(x, **kw),
        loaded.generate(x, num_steps=4, **kw),
        loaded.generate(x, num_steps=1, **kw),
    )
    torch.testing.assert_close(default.logits[0], at4.logits[0])
    assert not torch.allclose(default.logits[0], at1.logits[0])


_WITHOUT_LOOPFIT = """
import sys, torch
sys.modules["loopfit"] = None  # any import of loopfit fails: this process has transformers alone
from transformers import AutoModelForCausalLM
folder, expected = sys.argv[1], torch.load(sys.argv[2], weights_only=True)
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
logits = model(expected["ids"], num_steps=3).logits
torch.testing.assert_close(logits, expected["logits"], rtol=1e-5, atol=1e-5)
ids = model.generate(expected["ids"][:1], max_new_tokens=4, do_sample=False)
assert torch.equal(ids, expected["generated"]), (ids, expected["generated"])
print("ok")
"""


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_exported_run_loads_with_transformers_alone(tmp_path, family):
    """A healed run exported with --remote_code=true loads and generates in a process where loopfit cannot be
    imported, equal to loopfit's own model; its card names the recipe and the losses by depth."""
    root = write_teacher_and_looped_student(tmp_path / "m")
    if family != "llama":  # the same run on another family, whose loop needs family code (embedding scale, soft-cap)
        looped = to_looped(make_tiny_model(family), layout_from_sizes(6, 1, 2, 1), state_init="zeros")
        looped.save_pretrained(root / "looped")
        make_tiny_tokenizer().save_pretrained(root / "looped")
    cfg = TrainConfig(model_name=str(root / "looped"), out=str(tmp_path / "run"), data=str(root / "data.txt"),
                      seq_len=32, batch_size=2, max_steps=2, progress_bar=False, tensorboard=False, fixed_num_steps=2,
                      lora=LoRAConfig(enabled=True, r=4, modules_to_save=["adapter"]), val_fraction=0.2,
                      eval_num_steps=[1, 3])  # fmt: skip
    train(cfg)
    out = tmp_path / "exported"
    export_command(str(tmp_path / "run"), str(out), remote_code=True)
    meta, text = _card(out)
    assert "## Healing" in text and "| R | 1 | 2 | 3 |" in text and "lora: r = 4" in text
    model = AutoModelForCausalLM.from_pretrained(out).eval()  # loopfit's own class (registered), no remote code
    assert type(model).__module__.startswith("loopfit")
    ids = torch.randint(3, 260, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = {"ids": ids, "logits": model(ids, num_steps=3).logits,
                    "generated": model.generate(ids[:1], max_new_tokens=4, do_sample=False)}  # fmt: skip
    torch.save(expected, tmp_path / "expected.pt")
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-c", _WITHOUT_LOOPFIT, str(out), str(tmp_path / "expected.pt")],
                         capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().endswith("ok")
