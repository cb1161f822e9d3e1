"""Data parallelism on CPU with gloo through torchrun: 2 ranks x batch b == 1 rank x batch 2b; portable checkpoints."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import make_tiny_model, make_tiny_tokenizer
from safetensors.torch import load_file

from loopfit.convert import layout_from_sizes, to_looped

TEXT = "\n\n".join(f"Line {i}: the quick brown fox {i % 7} jumps over the lazy dog {i % 5}." for i in range(60))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    src = make_tiny_model("llama", num_layers=6, hidden=32)
    tok = make_tiny_tokenizer()
    src.save_pretrained(root / "teacher")
    tok.save_pretrained(root / "teacher")
    looped = to_looped(src, layout_from_sizes(6, 1, 2, 1), state_init="zeros")
    looped.save_pretrained(root / "looped")
    tok.save_pretrained(root / "looped")
    (root / "data.txt").write_text(TEXT)
    return root


def _config(models, out, **kw) -> dict:
    cfg = dict(model_name=str(models / "looped"), out=str(out), data=str(models / "data.txt"), seq_len=32,
               batch_size=4, max_steps=4, fixed_num_steps=2, progress_bar=False, tensorboard=False,
               lora={"enabled": True, "r": 4, "modules_to_save": ["adapter"]},
               distillation={"enabled": True, "teacher_model_name": str(models / "teacher")},
               optim_config={"lr": 1e-3}, save_every=2, keep_last=5)  # fmt: skip
    cfg.update(kw)
    return cfg


def _launch(cfg: dict, path, nproc: int, *extra: str) -> None:
    path.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    if nproc == 1:
        cmd = [sys.executable, "-m", "loopfit", "train", "--config", str(path), *extra]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "loopfit", "train", "--config", str(path), *extra]  # fmt: skip
    # Two torchrun ranks on a 2-core runner are slow under load, not hung: the limit only catches a real hang.
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]


def _losses(run) -> list[tuple[int, float]]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [(x["step"], x["loss"], x["ce_loss"], x["kd_loss"], x["num_items"]) for x in lines if "loss" in x]


def _weights(run, step) -> dict:
    return load_file(str(run / "checkpoints" / f"step-{step:08d}" / "trainable.safetensors"))


def test_ddp_two_ranks_equal_one_rank_double_batch_and_resume_on_one(models, tmp_path):
    one = tmp_path / "one"
    _launch(_config(models, one, batch_size=4), tmp_path / "one.yaml", 1)
    two = tmp_path / "two"
    _launch(_config(models, two, batch_size=2, parallel="ddp"), tmp_path / "two.yaml", 2)
    a, b = _losses(one), _losses(two)
    assert len(a) == len(b) == 4
    for x, y in zip(a, b):
        assert x[0] == y[0] and x[4] == y[4]  # same steps, same global token count
        assert x[1:4] == pytest.approx(y[1:4], abs=1e-5)
    wa, wb = _weights(one, 4), _weights(two, 4)
    assert set(wa) == set(wb)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=0, msg=k)

    # FSDP2 (fully_shard, gloo on CPU): the same losses and final weights as the single process.
    fs = tmp_path / "fsdp"
    _launch(_config(models, fs, batch_size=2, parallel="fsdp"), tmp_path / "fsdp.yaml", 2)
    f = _losses(fs)
    for x, y in zip(a, f):
        assert x[0] == y[0] and x[1:4] == pytest.approx(y[1:4], abs=1e-5)
    wf = _weights(fs, 4)
    for k in wa:
        torch.testing.assert_close(wa[k], wf[k], atol=1e-5, rtol=0, msg=k)
    assert (fs / "final" / "adapter_model.safetensors").is_file()

    # The 2-rank checkpoint at step 2 resumes on 1 rank (batch 4) and continues like the uninterrupted runs.
    cont = tmp_path / "cont"
    shutil.copytree(two, cont)
    for p in ("done.json", "final", "checkpoints/step-00000004"):
        shutil.rmtree(cont / p) if (cont / p).is_dir() else (cont / p).unlink()
    _launch(_config(models, cont, batch_size=4, resume=True), tmp_path / "cont.yaml", 1)
    c = _losses(cont)
    assert [x[0] for x in c] == [1, 2, 3, 4]
    for x, y in zip(a[2:], c[2:]):
        assert x[1:4] == pytest.approx(y[1:4], abs=1e-5)
    wc = _weights(cont, 4)
    for k in wa:
        torch.testing.assert_close(wa[k], wc[k], atol=1e-5, rtol=0, msg=k)


def test_parallel_without_torchrun_is_a_clear_error(models, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(_config(models, tmp_path / "r", parallel="ddp")))
    r = subprocess.run([sys.executable, "-m", "loopfit", "train", "--config", str(tmp_path / "c.yaml")], env=env,
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 2 and "torchrun" in r.stderr and "Traceback" not in r.stderr
