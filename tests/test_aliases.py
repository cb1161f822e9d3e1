"""Old flag and config names (the seeds' `--distillation.alpha`, `generate --min_steps`) read as today's names."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
import yaml
from conftest import write_teacher_and_looped_student

from loopfit.cli import main
from loopfit.errors import LoopfitError
from loopfit.io import MARKER
from loopfit.train.aliases import normalise_argv, normalise_config, normalise_train_args
from loopfit.train.config import DistillationConfig, LoRAConfig, TrainConfig
from loopfit.train.recipe import fit, setup, train
from loopfit.train.resume import config_dict

pytestmark = pytest.mark.usefixtures("one_thread")


def _printed_config(capsys, *flags) -> tuple[dict, str]:
    """(the config `loopfit train FLAGS --print_config` prints, its stderr)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["train", *flags, "--print_config"])
    assert e.value.code == 0
    out = capsys.readouterr()
    return yaml.safe_load(out.out), out.err


def _fail(capsys, argv) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("loopfit: error: ") and "\n" not in err
    return err


def test_new_names_and_the_alpha_alias_give_identical_configs(capsys):
    new, err = _printed_config(capsys, "--distillation.ce_scale=0.3", "--distillation.kd_scale=0.7")
    assert (new["distillation"]["ce_scale"], new["distillation"]["kd_scale"]) == (0.3, 0.7)
    assert "alpha" not in new["distillation"] and "deprecated" not in err
    for flags in (["--distillation.alpha=0.3"], ["--distillation.alpha", "0.3"],
                  ["--distillation.alpha=0.3", "--distillation.kd_scale=0.7"]):  # fmt: skip
        old, err = _printed_config(capsys, *flags)
        assert old == new, flags
        assert err.count("\n") == 1 and "--distillation.alpha is deprecated" in err
    # The defaults are the old default alpha = 0.5.
    default, _ = _printed_config(capsys)
    alias, _ = _printed_config(capsys, "--distillation.alpha=0.5")
    assert default == alias and default["distillation"]["ce_scale"] == default["distillation"]["kd_scale"] == 0.5


def test_conflicting_or_bad_alpha_is_one_line(capsys):
    err = _fail(capsys, ["train", "--distillation.alpha=0.3", "--distillation.ce_scale=0.5", "--print_config"])
    assert "--distillation.ce_scale=0.5 is also given" in err
    err = _fail(capsys, ["train", "--distillation.kd_scale", "1", "--distillation.alpha", "0.3", "--print_config"])
    assert "--distillation.kd_scale=0.7, but --distillation.kd_scale=1 is also given" in err
    assert "must be a number in [0, 1]" in _fail(capsys, ["train", "--distillation.alpha=1.5", "--print_config"])
    assert "must be a number in [0, 1]" in _fail(capsys, ["sweep", "--distillation.alpha=x", "--grid", "lora.r=2"])
    err = _fail(capsys, ["generate", "m", "--min_steps=2", "--min_num_steps=3"])
    assert "give --min_num_steps only" in err


def test_generate_min_steps_alias():
    assert normalise_argv(["generate", "m", "--min_steps=2", "--num_steps", "4"]) == [
        "generate", "m", "--min_num_steps=2", "--num_steps", "4"]  # fmt: skip
    assert normalise_argv(["generate", "m", "--min_steps", "2"]) == ["generate", "m", "--min_num_steps", "2"]
    assert normalise_argv(["eval", "--min_steps=2"]) == ["eval", "--min_steps=2"]  # only generate had it
    assert normalise_train_args(["--lora.r=4"]) == ["--lora.r=4"]


def test_old_config_file_reads_as_new(tmp_path, capsys):
    old = config_dict(TrainConfig())
    del old["distillation"]["ce_scale"], old["distillation"]["kd_scale"]
    old["distillation"].update(alpha=0.25, ce_scale=None, kd_scale=None)  # what a run saved before the rename holds
    (tmp_path / "old.yaml").write_text(yaml.safe_dump(old))
    got, err = _printed_config(capsys, "--config", str(tmp_path / "old.yaml"))
    assert (got["distillation"]["ce_scale"], got["distillation"]["kd_scale"]) == (0.25, 0.75)
    assert "deprecated" in err and "old.yaml" in err
    want, _ = _printed_config(capsys, "--distillation.ce_scale=0.25", "--distillation.kd_scale=0.75")
    assert got == want
    # In a file written before the rename, a scale that was set won over alpha: it still does.
    d = normalise_config({"distillation": {"alpha": 0.5, "ce_scale": 1.0, "kd_scale": None}})
    assert d == {"distillation": {"ce_scale": 1.0, "kd_scale": 0.5}}
    with pytest.raises(LoopfitError, match=r"in \[0, 1\]"):
        normalise_config({"distillation": {"alpha": 2.0}})
    skew = {"distillation": {"kind": "skew", "kind_params": {"alpha": 0.1}}}  # the divergence's alpha: not renamed
    assert normalise_config(skew) == skew


def test_run_saved_with_alpha_resumes_identically(tmp_path):
    """A run whose config.yaml says `alpha: 0.3` (written before the rename) resumes through `--config` with the
    same losses as an uninterrupted run under the new names."""
    models = write_teacher_and_looped_student(tmp_path / "m")

    def cfg(folder, **kw):
        return TrainConfig(
            model_name=str(models / "looped"), out=str(folder), data=str(models / "data.txt"), seq_len=32,
            batch_size=4, max_steps=6, save_every=3, progress_bar=False, tensorboard=False, fixed_num_steps=2,
            lora=LoRAConfig(enabled=True, r=4),
            distillation=DistillationConfig(enabled=True, teacher_model_name=str(models / "teacher"),
                                            ce_scale=0.3, kd_scale=0.7), **kw)  # fmt: skip

    train(cfg(tmp_path / "a"))
    out = tmp_path / "b"
    run = setup(cfg(out))
    fit(run, until=4)  # checkpoint at 3, then "killed"
    run.logger.close()
    saved = yaml.safe_load((out / "config.yaml").read_text())
    dist = saved["distillation"]
    saved["distillation"] = {k: v for k, v in dist.items() if k not in ("ce_scale", "kd_scale")} | {
        "alpha": 0.3, "ce_scale": None, "kd_scale": None}  # fmt: skip
    text = yaml.safe_dump(saved, sort_keys=False).encode()
    (out / "config.yaml").write_bytes(text)
    marker = json.loads((out / MARKER).read_text())  # as the older loopfit sealed it
    marker["files"]["config.yaml"] = {"sha256": hashlib.sha256(text).hexdigest(), "bytes": len(text)}
    (out / MARKER).write_text(json.dumps(marker))
    main(["train", "--config", str(out / "config.yaml"), "--resume=true"])
    keys = ("step", "loss", "ce_loss", "kd_loss", "grad_norm", "lr")
    a, b = ([json.loads(x) for x in (p / "metrics.jsonl").read_text().splitlines()] for p in (tmp_path / "a", out))
    assert len(a) == 6 and [[x[k] for k in keys] for x in a] == [[x[k] for k in keys] for x in b]
    # The weights really are 0.3 / 0.7: the logged loss is their blend of the logged terms.
    assert a[0]["loss"] == pytest.approx(0.3 * a[0]["ce_loss"] + 0.7 * a[0]["kd_loss"], rel=1e-5)
    # A resume under the new names is accepted too; under other weights it is refused.
    assert train(cfg(out, resume=True)) is None
    with pytest.raises(LoopfitError, match="distillation.ce_scale"):
        bad = cfg(out, resume=True)
        bad.distillation.ce_scale = 0.5
        train(bad)
    assert torch.isfinite(torch.tensor(b[-1]["loss"]))


def test_a_renamed_or_misspelt_setting_cannot_be_assigned_in_python():
    from loopfit.train import DistillationConfig, OnPolicyConfig, TrainConfig

    cfg = TrainConfig(distillation=DistillationConfig(on_policy=OnPolicyConfig()))
    for obj, name in ((cfg.distillation, "alpha"), (cfg, "max_step"), (cfg.distillation.on_policy, "lambda_")):
        with pytest.raises(AttributeError, match=f"has no setting '{name}'"):
            setattr(obj, name, 0.3)
    cfg.distillation.ce_scale, cfg.max_steps = 0.3, 7  # fields assign as before
    assert (cfg.distillation.ce_scale, cfg.max_steps) == (0.3, 7)
