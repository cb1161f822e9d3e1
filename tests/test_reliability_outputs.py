"""Outputs that never lose work: --overwrite validates everything first and refuses folders loopfit did not write,
--resume compares the flags with the run's config, leftovers of killed runs are cleaned, metrics.jsonl stays exact
after kills at any point (tiny models, a few steps each)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml
from conftest import make_tiny_model, make_tiny_tokenizer, write_teacher_and_looped_student

from loopfit.errors import LoopfitError
from loopfit.io import MARKER, atomic_dir, read_marker
from loopfit.train import DistillationConfig, LoRAConfig, OptimConfig, TrainConfig, recipe
from loopfit.train.recipe import fit, setup, train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = write_teacher_and_looped_student(tmp_path_factory.mktemp("outputs"))
    (root / "other.txt").write_text((root / "data.txt").read_text()[: len((root / "data.txt").read_text()) // 2])
    shutil.copytree(root / "teacher", root / "teacher-copy")  # same weights, another teacher as far as flags go
    wide = make_tiny_model("llama", num_layers=2, hidden=32, vocab=300)  # a vocabulary the student does not share
    wide.save_pretrained(root / "wide-teacher")
    make_tiny_tokenizer().save_pretrained(root / "wide-teacher")
    return root


def _cfg(models, out, **kw) -> TrainConfig:
    base = dict(model_name=str(models / "looped"), out=str(out), data=str(models / "data.txt"), seq_len=32,
                batch_size=4, max_steps=4, progress_bar=False, tensorboard=False, fixed_num_steps=2,
                val_fraction=0.2, eval_batches=1, lora=LoRAConfig(enabled=True, r=4),
                distillation=DistillationConfig(enabled=True, teacher_model_name=str(models / "teacher")),
                optim_config=OptimConfig(lr=1e-3))  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


def snapshot(folder) -> dict:
    """Every file under `folder` (and its siblings' names): path -> bytes."""
    files = {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
    return {"files": files, "siblings": sorted(p.name for p in folder.parent.iterdir())}


def lines(run) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and isinstance(e.value, LoopfitError), msg
    return msg


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.fixture(scope="module")
def finished(models, tmp_path_factory):
    """A finished 2-step run (its folder is copied by the tests that change it)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    train(_cfg(models, out, max_steps=2))
    return out


def copy_run(src, tmp_path, name="run"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


# ---------------------------------------------------------------------------------------------- overwrite
@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(data="/nonexistent/data.txt"), "data"),
        (dict(distillation=DistillationConfig(enabled=True, teacher_model_name="MODELS/wide-teacher")), "vocabulary"),
        (dict(distillation=DistillationConfig(enabled=True, teacher_cache="/nonexistent/cache")), "teacher cache"),
        (dict(lora=LoRAConfig(enabled=True, r=4, target_modules=["no_such_module"])), "LoRA"),
    ],
)
def test_overwrite_with_a_bad_input_leaves_the_old_run_byte_identical(models, finished, tmp_path, bad, match):
    run = copy_run(finished, tmp_path)
    before = snapshot(run)
    if "distillation" in bad and bad["distillation"].teacher_model_name:
        bad["distillation"].teacher_model_name = str(models / "wide-teacher")
    with pytest.raises(LoopfitError, match=match) as e:
        setup(_cfg(models, run, overwrite=True, **bad))
    one_line(e)
    assert snapshot(run) == before


def test_overwrite_sets_the_old_run_aside_until_the_first_checkpoint(models, finished, tmp_path):
    run = copy_run(finished, tmp_path)
    before = snapshot(run)
    r = setup(_cfg(models, run, overwrite=True, max_steps=3, save_every=2, seed=5))
    aside = tmp_path / f".old-run-{os.getpid()}"
    assert r.aside == aside and snapshot(aside)["files"] == before["files"]  # kept, untouched, beside the new run
    assert yaml.safe_load((run / "config.yaml").read_text())["seed"] == 5 and read_marker(run)["kind"] == "train-run"
    fit(r, until=1)
    assert aside.exists()
    fit(r, until=2)  # the first checkpoint: the new run has a complete output, the old one goes
    assert not aside.exists() and (run / "checkpoints" / "step-00000002").is_dir()
    r.logger.close()


def test_overwrite_failing_before_its_first_checkpoint_puts_the_old_run_back(models, finished, tmp_path, monkeypatch):
    run = copy_run(finished, tmp_path)
    before = snapshot(run)

    def broken(*a, **k):
        raise RuntimeError("boom in the first step")

    monkeypatch.setattr(recipe, "train_step", broken)
    with pytest.raises(RuntimeError, match="boom"):
        train(_cfg(models, run, overwrite=True))
    assert snapshot(run) == before


def test_overwrite_refuses_folders_loopfit_did_not_write(models, finished, tmp_path, monkeypatch, capsys):
    from loopfit.cli import main

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    before = snapshot(mine)
    with pytest.raises(LoopfitError, match="loopfit did not write it") as e:
        setup(_cfg(models, mine, overwrite=True))
    assert str(mine) in one_line(e) and snapshot(mine) == before
    # The same refusal from every command that replaces a folder (atomic_dir), before any model is loaded.
    with pytest.raises(SystemExit) as e:
        main(["export", str(finished), "--out", str(mine), "--overwrite=true"])
    assert e.value.code == 2 and "loopfit did not write it" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["cache-teacher", "--teacher", str(models / "teacher"), "--out", str(mine), "--overwrite=true"])
    assert e.value.code == 2 and "loopfit did not write it" in capsys.readouterr().err
    with pytest.raises(LoopfitError, match="loopfit did not write it"):
        with atomic_dir(mine, overwrite=True):
            raise AssertionError("never reached")
    assert snapshot(mine) == before
    # `--out .`, a parent of the current folder, and the home folder are refused even though loopfit wrote them.
    run = copy_run(finished, tmp_path)
    monkeypatch.chdir(run)
    for out in (".", str(run), str(run.parent)):
        with pytest.raises(LoopfitError, match="current folder") as e:
            setup(_cfg(models, out, overwrite=True))
        one_line(e)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(models)
    (tmp_path / MARKER).write_text(json.dumps({"written_by": "loopfit", "kind": "train-run"}))
    with pytest.raises(LoopfitError, match="home folder"):
        setup(_cfg(models, tmp_path, overwrite=True))
    (tmp_path / MARKER).unlink()
    with pytest.raises(LoopfitError, match="already exists"):  # without --overwrite: refused as before
        setup(_cfg(models, run))


def test_every_output_folder_carries_the_marker(models, finished, tmp_path):
    from loopfit.cli import main

    assert read_marker(finished)["kind"] == "train-run"
    assert read_marker(finished / "final")["kind"] == "model"
    assert read_marker(finished / "checkpoints" / "step-00000002")["kind"] == "checkpoint"
    main(["export", str(finished), "--out", str(tmp_path / "merged")])
    main(["convert", str(models / "teacher"), "--out", str(tmp_path / "conv"), "--layers", "0:1-4:5"])
    for folder in ("merged", "conv"):
        marker = read_marker(tmp_path / folder)
        assert marker["written_by"] == "loopfit" and "model.safetensors" in marker["files"]
    # A folder loopfit wrote is replaced.
    main(["convert", str(models / "teacher"), "--out", str(tmp_path / "conv"), "--layers", "0:1-3:4-5",
          "--overwrite=true"])  # fmt: skip
    assert json.loads((tmp_path / "conv" / "config.json").read_text())["block_layers"] == [1, 2, 3]


# ------------------------------------------------------------------------------------------------- resume
@pytest.fixture(scope="module")
def stopped(models, tmp_path_factory):
    """A 4-step run stopped after its checkpoint at step 2 (LoRA r=4, KD from a live teacher)."""
    out = tmp_path_factory.mktemp("stopped") / "run"
    r = setup(_cfg(models, out, save_every=2))
    fit(r, until=2)
    r.logger.close()
    return out


@pytest.mark.parametrize(
    "change, keys",
    [
        (dict(optim_config=OptimConfig(lr=5e-3)), ["optim_config.lr"]),
        (dict(seq_len=16), ["seq_len"]),
        (dict(seed=1), ["seed"]),
        (dict(data="MODELS/other.txt"), ["data"]),
        (
            dict(distillation=DistillationConfig(enabled=True, teacher_model_name="MODELS/teacher-copy")),
            ["distillation.teacher_model_name"],
        ),
        (dict(lora=LoRAConfig(enabled=True, r=8)), ["lora.r"]),
        (dict(optim_config=OptimConfig(lr=1e-3, optimizer="ellis_adam")), ["optim_config.optimizer"]),
        (dict(seed=3, seq_len=16, grad_clip=0.5), ["grad_clip", "seed", "seq_len"]),
        (dict(batch_size=2), ["sequences per step"]),  # a layout change that halves the global batch
        (dict(text_stream=True), ["text_stream"]),
    ],
)
def test_resume_refuses_changes_to_the_computation(models, stopped, tmp_path, change, keys):
    run = copy_run(stopped, tmp_path)
    before = snapshot(run)
    for k, v in change.items():
        if isinstance(v, str):
            change[k] = v.replace("MODELS", str(models))
        if isinstance(v, DistillationConfig):
            v.teacher_model_name = v.teacher_model_name.replace("MODELS", str(models))
    with pytest.raises(LoopfitError, match="would change its computation") as e:
        setup(_cfg(models, run, save_every=2, resume=True, **change))
    msg = one_line(e)
    listed = msg.split("computation: ")[1]
    assert all(k in listed for k in keys), msg
    assert "max_steps" not in listed and "out (" not in listed
    assert snapshot(run) == before  # config.yaml, metrics, checkpoints: nothing written


def test_resume_refuses_data_whose_contents_changed(models, tmp_path):
    data = tmp_path / "data.txt"
    data.write_text((models / "data.txt").read_text())
    run = tmp_path / "run"
    r = setup(_cfg(models, run, data=str(data), save_every=2))
    fit(r, until=2)
    r.logger.close()
    data.write_text((models / "other.txt").read_text())
    before = snapshot(run)
    with pytest.raises(LoopfitError, match="training data changed") as e:
        setup(_cfg(models, run, data=str(data), save_every=2, resume=True))
    one_line(e)
    assert snapshot(run) == before


def test_text_stream_reaches_the_runs_data(models, tmp_path):
    """`--text_stream` builds the run's rows (recorded in its data manifest) as contiguous windows of the file: every
    row full but the last; without it the file's short paragraphs are packed, with padding, and a different hash."""
    data = tmp_path / "paragraphs.txt"
    data.write_text("".join(f"Line {i} of the text.\n\n" for i in range(60)))
    full = {}
    for stream in (True, False):
        r = setup(_cfg(models, tmp_path / f"run-{stream}", data=str(data), text_stream=stream, val_fraction=0.0))
        r.logger.close()
        manifest = json.loads((tmp_path / f"run-{stream}" / "data_manifest.json").read_text())
        assert manifest["text_stream"] is stream
        rows = r.stream.dataset.rows
        full[stream] = (int((rows.num_tokens == 32).sum()), len(rows.num_tokens), manifest["data_hash"])
    assert full[True][0] == full[True][1] - 1 and full[False][0] < full[False][1] - 1
    assert full[True][2] != full[False][2]


def test_resume_allows_and_records_changes_that_extend_or_observe(models, stopped, tmp_path):
    run = copy_run(stopped, tmp_path)
    saved = (run / "config.yaml").read_bytes()
    # The same path spelled relatively is no change; max_steps and logging are allowed and recorded.
    rel_data = os.path.relpath(models / "data.txt")
    val = train(_cfg(models, run, save_every=2, resume=True, max_steps=6, data=rel_data, log_every=1,
                     eval_num_steps=[1]))  # fmt: skip
    assert set(val) == {1, 2}
    assert (run / "config.yaml").read_bytes() == saved  # never rewritten
    (entry,) = json.loads((run / "resumes.json").read_text())["resumes"]
    assert entry["step"] == 2 and entry["checkpoint"] == "step-00000002"
    assert entry["changed"] == {"max_steps": [4, 6], "eval_num_steps": [[], [1]]}
    steps = [x["step"] for x in lines(run) if "loss" in x]
    assert steps == [1, 2, 3, 4, 5, 6] and json.loads((run / "done.json").read_text())["step"] == 6
    # The run's config is now config.yaml + the recorded changes: resuming the finished run with its own
    # config.yaml (max_steps 4) is an allowed change; a changed lr is still refused.
    assert train(_cfg(models, run, save_every=2, resume=True)) is None
    with pytest.raises(LoopfitError, match="optim_config.lr"):
        setup(_cfg(models, run, save_every=2, resume=True, max_steps=6, optim_config=OptimConfig(lr=1)))


def test_resume_without_a_run_is_refused_unless_auto(models, tmp_path, capsys):
    from loopfit.cli import main

    run = tmp_path / "run"
    with pytest.raises(LoopfitError, match="no run to resume") as e:
        setup(_cfg(models, run, resume=True))
    one_line(e)
    assert not run.exists()
    cfg = {"model_name": str(models / "looped"), "out": str(run), "data": str(models / "data.txt"), "seq_len": 32,
           "max_steps": 2, "fixed_num_steps": 2, "progress_bar": False, "tensorboard": False}  # fmt: skip
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(SystemExit) as e:
        main(["train", "--config", str(tmp_path / "c.yaml"), "--resume=true"])
    assert e.value.code == 2 and "no run to resume" in capsys.readouterr().err
    main(["train", "--config", str(tmp_path / "c.yaml"), "--resume=auto"])  # starts it
    assert json.loads((run / "done.json").read_text())["step"] == 2
    main(["train", "--config", str(tmp_path / "c.yaml"), "--resume=auto"])  # finds it finished
    assert "already finished" in capsys.readouterr().out
    with pytest.raises(LoopfitError, match="--resume must be"):
        setup(_cfg(models, run, resume="yes"))


# ---------------------------------------------------------------------------------------------- leftovers
def test_a_rerun_removes_its_killed_predecessors_leftovers_only(models, stopped, tmp_path, capsys):
    run = copy_run(stopped, tmp_path)
    dead, live = dead_pid(), os.getppid()
    own = [tmp_path / f".tmp-run-{dead}-abc123", tmp_path / f".old-run-{dead}", run / f".tmp-metrics.jsonl-{dead}-x1y",
           run / "checkpoints" / f".tmp-step-00000004-{dead}-q9"]  # fmt: skip
    kept = [tmp_path / f".tmp-run-{live}-abc123", tmp_path / f".tmp-run2-{dead}-abc123",
            tmp_path / f".old-run-{dead}-notmine", tmp_path / f".partial-run-{dead}"]  # fmt: skip
    for p in own + kept:
        p.mkdir() if "metrics" not in p.name else p.write_text("half")
    (tmp_path / f".old-run-{dead}" / "x").write_text("old")
    train(_cfg(models, run, save_every=2, resume=True))  # rewrites metrics.jsonl, writes checkpoints/step-00000004
    assert not any(p.exists() for p in own), [p for p in own if p.exists()]
    assert all(p.exists() for p in kept)
    assert f".tmp-run-{dead}-abc123, left by a killed run" in capsys.readouterr().err


def test_an_old_folder_whose_replacement_never_arrived_is_put_back(tmp_path):
    out = tmp_path / "model"
    with atomic_dir(out) as tmp:
        (tmp / "w").write_text("v1")
    dead = dead_pid()
    os.replace(out, tmp_path / f".old-model-{dead}")  # killed between the two renames of a replacement
    with atomic_dir(tmp_path / "elsewhere") as tmp:  # another output: this one is not its business
        pass
    assert not out.exists()
    with pytest.raises(LoopfitError, match="already exists"):  # its own rerun puts it back first
        with atomic_dir(out) as tmp:
            pass
    assert (out / "w").read_text() == "v1" and not (tmp_path / f".old-model-{dead}").exists()


# ---------------------------------------------------------------------------------------- metrics.jsonl
def _kill_after(monkeypatch, what: str):
    """Make the run die at one point of its end: after the final checkpoint (`final`: writing final/ fails) or
    after final/ (`done`: writing done.json fails)."""

    class Killed(BaseException):
        pass

    real_atomic, real_json = recipe.atomic_dir, recipe.write_json

    def atomic(*a, **k):
        if what == "final":
            raise Killed
        return real_atomic(*a, **k)

    def write_json(path, obj):
        if what == "done" and path.name == "done.json":
            raise Killed
        return real_json(path, obj)

    monkeypatch.setattr(recipe, "atomic_dir", atomic)
    monkeypatch.setattr(recipe, "write_json", write_json)
    return Killed


@pytest.mark.parametrize("where", ["final", "done", "mid"])
def test_metrics_hold_one_line_per_step_and_validation_after_kills(models, tmp_path, monkeypatch, where):
    kw = dict(max_steps=6, save_every=2, eval_every=2)
    run = tmp_path / "run"
    if where == "mid":  # killed after step 5 was logged; the last checkpoint is step 4's
        r = setup(_cfg(models, run, **kw))
        fit(r, until=5)
        r.logger.close()
    else:  # killed after the final checkpoint and the final validation line, before final/ or done.json
        killed = _kill_after(monkeypatch, where)
        with pytest.raises(killed):
            train(_cfg(models, run, **kw))
        monkeypatch.undo()
        assert "loss" not in lines(run)[-1] and not (run / "done.json").exists()
    train(_cfg(models, run, resume=True, **kw))
    m = lines(run)
    assert [x["step"] for x in m if "loss" in x] == [1, 2, 3, 4, 5, 6]
    validations = [x["step"] for x in m if any(k.startswith("val_loss") for k in x)]
    assert validations == [2, 4, 6, 6]  # every 2 steps (on the step's line), then the final pass (its own line)
    assert len(m) == 7
    assert train(_cfg(models, run, resume=True, **kw)) is None and lines(run) == m  # finished: nothing changes
