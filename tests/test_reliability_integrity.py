"""Damaged checkpoints, caches and outputs are caught when first read: every fault is one LoopfitError line naming
the file (or, for a damaged newest checkpoint with an intact older one, a fallback note on stderr), and nothing that
existed is changed. Also: files and folders are fsynced before the rename that publishes them."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from conftest import write_teacher_and_looped_student

from loopfit.cache import CacheSettings, TeacherCache, write_cache
from loopfit.errors import LoopfitError
from loopfit.io import MARKER, atomic_dir, inside, sha256_file
from loopfit.train import DistillationConfig, LoRAConfig, TrainConfig
from loopfit.train import checkpoint as ckpt
from loopfit.train.recipe import fit, setup, train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return write_teacher_and_looped_student(tmp_path_factory.mktemp("integrity"))


def _cfg(models, out, **kw) -> TrainConfig:
    base = dict(model_name=str(models / "looped"), out=str(out), data=str(models / "data.txt"), seq_len=32,
                batch_size=4, max_steps=6, save_every=2, progress_bar=False, tensorboard=False, fixed_num_steps=2,
                lora=LoRAConfig(enabled=True, r=4))  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


def snapshot(folder) -> dict:
    files = {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
    return {"files": files, "siblings": sorted(p.name for p in folder.parent.iterdir())}


def one_line(e: pytest.ExceptionInfo, names: str) -> str:
    msg = str(e.value)
    assert isinstance(e.value, LoopfitError) and "\n" not in msg, msg
    assert names in msg, (names, msg)
    return msg


# ------------------------------------------------------------------------------------------- mutations
def flip(path, at=-1):
    raw = bytearray(path.read_bytes())
    raw[at] ^= 0x01
    path.write_bytes(bytes(raw))


def truncate(path):
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


def edit_json(path, fn):
    obj = json.loads(path.read_text())
    fn(obj)
    path.write_text(json.dumps(obj))


def replace_consistently(folder, name, data: bytes):
    """A file replaced, its checksum updated too: only the content checks can tell."""
    (folder / name).write_bytes(data)
    rec = {"sha256": sha256_file(folder / name), "bytes": len(data)}
    edit_json(folder / MARKER, lambda m: m["files"].update({name: rec}))


def _torch_bytes(obj) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


W, S = "trainable.safetensors", "state.pt"
CHECKPOINT_DAMAGE = {
    "flipped byte in trainable.safetensors": (lambda d: flip(d / W), W),
    "flipped byte in state.pt": (lambda d: flip(d / S, 200), S),
    "truncated trainable.safetensors": (lambda d: truncate(d / W), W),
    "truncated state.pt": (lambda d: truncate(d / S), S),
    "missing trainable.safetensors": (lambda d: (d / W).unlink(), W),
    "missing state.pt": (lambda d: (d / S).unlink(), S),
    "empty state.pt": (lambda d: (d / S).write_bytes(b""), S),
    "missing checksum file": (lambda d: (d / MARKER).unlink(), MARKER),
    "checksum file not JSON": (lambda d: (d / MARKER).write_text("{not json"), MARKER),
    "checksum file not loopfit's": (lambda d: (d / MARKER).write_text('{"written_by": "x"}'), MARKER),
    "checksum file names ../x": (lambda d: edit_json(d / MARKER, lambda m: m["files"].update({"../x": {}})), "../x"),
    "checksum file names an absolute path": (
        lambda d: edit_json(d / MARKER, lambda m: m["files"].update({"/x": {}})),
        "/x",
    ),
    "checksum file lacks state.pt": (lambda d: edit_json(d / MARKER, lambda m: m["files"].pop(S)), S),
    "checksum file has a wrong size": (lambda d: edit_json(d / MARKER, lambda m: m["files"][W].update(bytes=1)), W),
    "state.pt holds something else": (lambda d: replace_consistently(d, S, _torch_bytes([1, 2])), S),
    "trainable.safetensors is garbage": (lambda d: replace_consistently(d, W, os.urandom(64)), W),
}


@pytest.fixture(scope="module")
def stopped(models, tmp_path_factory):
    """A 6-step run stopped after its checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("stopped") / "run"
    r = setup(_cfg(models, out))
    fit(r, until=4)
    r.logger.close()
    return out


@pytest.mark.parametrize("older", [False, True], ids=["only", "with-older"])
@pytest.mark.parametrize("damage", list(CHECKPOINT_DAMAGE))
def test_a_damaged_checkpoint_is_refused_or_passed_over(stopped, tmp_path, capsys, damage, older):
    run = tmp_path / "run"
    shutil.copytree(stopped, run)
    if not older:
        shutil.rmtree(run / "checkpoints" / "step-00000002")
    mutate, name = CHECKPOINT_DAMAGE[damage]
    mutate(run / "checkpoints" / "step-00000004")
    before = snapshot(run)
    if older:
        path, weights, state = ckpt.load_latest(run)
        assert path.name == "step-00000002" and state["step"] == 2 and weights
        err = capsys.readouterr().err
        assert "step-00000004 is damaged" in err and "resuming from the newest intact checkpoint, step-00000002" in err
    else:
        with pytest.raises(LoopfitError) as e:
            ckpt.load_latest(run)
        one_line(e, name)
        assert "no intact checkpoint" in str(e.value)
    assert snapshot(run) == before


def test_resume_passes_over_a_damaged_newest_checkpoint_and_replaces_it(models, stopped, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(stopped, run)
    flip(run / "checkpoints" / "step-00000004" / W)
    r = setup(_cfg(models, run, resume=True))
    assert r.step == 2 and "passing over it" in capsys.readouterr().err
    fit(r, until=4)  # writes step 4 again, intact
    r.logger.close()
    assert ckpt.load_latest(run)[2]["step"] == 4
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def test_resume_from_a_damaged_only_checkpoint_changes_nothing(models, stopped, tmp_path, capsys):
    from loopfit.cli import main

    run = tmp_path / "runs" / "run"
    shutil.copytree(stopped, run)
    shutil.rmtree(run / "checkpoints" / "step-00000002")
    truncate(run / "checkpoints" / "step-00000004" / S)
    before = snapshot(run)
    with pytest.raises(LoopfitError) as e:
        setup(_cfg(models, run, resume=True))
    one_line(e, "step-00000004/state.pt")
    (tmp_path / "c.yaml").write_text((run / "config.yaml").read_text())
    with pytest.raises(SystemExit) as e:
        main(["train", "--config", str(tmp_path / "c.yaml"), "--out", str(run), "--resume=true"])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and last.startswith("loopfit: error: ") and "state.pt is damaged" in last
    assert snapshot(run) == before
    # A run folder whose config.yaml was edited after it started is refused as well.
    (run / "config.yaml").write_text((run / "config.yaml").read_text().replace("seed: 0", "seed: 0 "))
    with pytest.raises(LoopfitError) as e:
        setup(_cfg(models, run, resume=True))
    one_line(e, "config.yaml is damaged")


def test_export_refuses_a_damaged_final_folder(models, tmp_path):
    from loopfit.train.commands import export_command

    run = tmp_path / "run"
    train(_cfg(models, run, max_steps=2))
    flip(run / "final" / "adapter_model.safetensors")
    before = snapshot(run)
    with pytest.raises(LoopfitError) as e:
        export_command(str(run), out=str(tmp_path / "merged"))
    one_line(e, "adapter_model.safetensors is damaged")
    assert snapshot(run) == before and not (tmp_path / "merged").exists()


# ------------------------------------------------------------------------------------------------- caches
@pytest.fixture(scope="module")
def cache(models, tmp_path_factory):
    """A topk_tail cache (all four kinds of shard file) of the training rows of `data.txt`, in 3 shards."""
    from loopfit.data import build_dataset, tokenizer_hash
    from loopfit.loading import load_model, load_tokenizer

    tok = load_tokenizer(models / "teacher")
    packed = build_dataset(str(models / "data.txt"), tok, 32, seed=0)
    teacher = load_model(models / "teacher")
    info = {"teacher": "t", "tokenizer_hash": tokenizer_hash(tok), "data_hash": packed.data_hash, "vocab_size": 260}
    out = tmp_path_factory.mktemp("cache") / "cache"
    settings = CacheSettings(estimator="topk_tail", top_k=8, shard_rows=1 + len(packed.train) // 3)
    write_cache(teacher, packed.train, out, settings, info, progress=False)
    return out


def _manifest(fn):
    return lambda c: edit_json(c / "manifest.json", fn)


def _npy(c, name, array):
    """Replace a shard file by a valid .npy and update its checksum in the manifest."""
    np.save(c / name, array, allow_pickle=False)

    def fix(m):
        for sh in m["shards"]:
            for rec in sh["files"].values():
                if rec["file"] == name:
                    rec["sha256"] = sha256_file(c / name)

    edit_json(c / "manifest.json", fix)


CACHE_DAMAGE = {
    "flipped byte in counts": (lambda c: flip(c / "shard-00001.counts.npy"), "shard-00001.counts.npy"),
    "flipped byte in ids": (lambda c: flip(c / "shard-00001.ids.npy"), "shard-00001.ids.npy"),
    "flipped byte in values": (lambda c: flip(c / "shard-00001.values.npy"), "shard-00001.values.npy"),
    "flipped byte in tail": (lambda c: flip(c / "shard-00001.tail.npy"), "shard-00001.tail.npy"),
    "truncated shard": (lambda c: truncate(c / "shard-00002.ids.npy"), "shard-00002.ids.npy"),
    "missing shard": (lambda c: (c / "shard-00000.values.npy").unlink(), "shard-00000.values.npy"),
    "manifest not JSON": (lambda c: (c / "manifest.json").write_text('{"rows": 3,'), "manifest.json"),
    "manifest empty": (lambda c: (c / "manifest.json").write_text("{}"), "manifest.json"),
    "manifest names ../x": (_manifest(lambda m: m["shards"][0]["files"]["ids"].update(file="../x.npy")), "../x"),
    "manifest names an absolute path": (
        _manifest(lambda m: m["shards"][1]["files"]["tail"].update(file="/etc/passwd")),
        "/etc/passwd",
    ),
    "manifest lacks a shard file": (_manifest(lambda m: m["shards"][2]["files"].pop("tail")), "manifest.json"),
    "manifest checksum not a string": (
        _manifest(lambda m: m["shards"][0]["files"]["counts"].update(sha256=1)),
        "manifest.json",
    ),
    "manifest lost a shard": (_manifest(lambda m: m["shards"].pop()), "manifest.json"),
    "shard of another dtype": (
        lambda c: _npy(c, "shard-00000.ids.npy", np.load(c / "shard-00000.ids.npy").astype(np.int64)),
        "shard-00000.ids.npy",
    ),
    "shard of another shape": (
        lambda c: _npy(c, "shard-00001.counts.npy", np.load(c / "shard-00001.counts.npy")[:-1]),
        "shard-00001.counts.npy",
    ),
}


@pytest.mark.parametrize("damage", list(CACHE_DAMAGE))
def test_a_damaged_cache_is_refused(cache, tmp_path, damage):
    folder = tmp_path / "cache"
    shutil.copytree(cache, folder)
    mutate, name = CACHE_DAMAGE[damage]
    mutate(folder)
    before = snapshot(folder)
    with pytest.raises(LoopfitError) as e:
        TeacherCache(folder).verify()
    one_line(e, name)
    if "shard" in name and "manifest" not in damage:  # the training path: a row is read only from a checked shard
        c = TeacherCache(folder)
        with pytest.raises(LoopfitError) as e:
            c[len(c) - 1 if "00002" in name else (0 if "00000" in name else c.shards[1]["rows"][0])]
        one_line(e, name)
    assert snapshot(folder) == before


@pytest.mark.parametrize("damage", ["flipped byte in values", "truncated shard", "missing shard"])
def test_training_from_a_damaged_cache_is_refused_before_any_run_folder(models, cache, tmp_path, damage):
    folder = tmp_path / "cache"
    shutil.copytree(cache, folder)
    mutate, name = CACHE_DAMAGE[damage]
    mutate(folder)
    dc = DistillationConfig(enabled=True, teacher_cache=str(folder))
    with pytest.raises(LoopfitError) as e:
        setup(_cfg(models, tmp_path / "run", distillation=dc))
    one_line(e, name)
    assert not (tmp_path / "run").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["cache"]


def test_training_from_an_intact_cache_works(models, cache, tmp_path):
    dc = DistillationConfig(enabled=True, teacher_cache=str(cache))
    train(_cfg(models, tmp_path / "run", distillation=dc, max_steps=2))
    assert json.loads((tmp_path / "run" / "done.json").read_text())["teacher_cache"]["estimator"] == "topk_tail"


def test_a_partial_cache_naming_files_outside_is_refused(models, tmp_path):
    from loopfit.data import build_dataset, tokenizer_hash
    from loopfit.loading import load_model, load_tokenizer

    tok = load_tokenizer(models / "teacher")
    packed = build_dataset(str(models / "data.txt"), tok, 32, seed=0)
    teacher = load_model(models / "teacher")
    info = {"teacher": "t", "tokenizer_hash": tokenizer_hash(tok), "data_hash": packed.data_hash, "vocab_size": 260}
    settings = CacheSettings(estimator="topk", top_k=4, shard_rows=1 + len(packed.train) // 2)

    def kill(index):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_cache(teacher, packed.train, tmp_path / "c", settings, info, progress=False, on_shard=kill)
    progress = tmp_path / ".partial-c" / "progress.json"
    edit_json(progress, lambda p: p["shards"][0]["files"]["ids"].update(file="../../escape.npy"))
    before = snapshot(tmp_path / ".partial-c")
    with pytest.raises(LoopfitError) as e:
        write_cache(teacher, packed.train, tmp_path / "c", settings, info, progress=False)
    one_line(e, "../../escape.npy")
    assert snapshot(tmp_path / ".partial-c") == before and not (tmp_path / "c").exists()


# --------------------------------------------------------------------------------------------- io pieces
def test_manifest_names_are_confined_to_their_folder(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "ok.bin").write_bytes(b"x")
    os.symlink(tmp_path, tmp_path / "d" / "link")
    assert inside(tmp_path / "d", "ok.bin", "m") == tmp_path / "d" / "ok.bin"
    assert inside(tmp_path / "d", "sub/ok.bin", "m") == tmp_path / "d" / "sub" / "ok.bin"
    for bad in ("../x", "/etc/passwd", "a/../../x", "link/x", "", None, 3, "a\\..\\x"):
        with pytest.raises(LoopfitError, match="names a file outside"):
            inside(tmp_path / "d", bad, "m")


def test_atomic_outputs_are_fsynced_before_they_are_published(tmp_path, monkeypatch):
    """Every file written inside, the folder, and (after the rename) the parent reach the disk: the rename that
    publishes an output comes after the fsync of everything it publishes."""
    import loopfit.io as lio

    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(a, b):
        events.append(("rename", str(a), str(b)))
        return real_replace(a, b)

    monkeypatch.setattr(lio.os, "fsync", fsync)
    monkeypatch.setattr(lio.os, "replace", replace)
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "a.bin").write_bytes(b"a")
        (tmp / "sub" / "b.bin").write_bytes(b"b")
    publish = next(i for i, e in enumerate(events) if e[0] == "rename" and e[2] == str(out))
    synced_before = {e[1] for e in events[:publish] if e[0] == "fsync"}
    assert {str(tmp / "a.bin"), str(tmp / "sub" / "b.bin"), str(tmp / MARKER), str(tmp / "sub"), str(tmp)} <= (
        synced_before
    )
    assert ("fsync", str(tmp_path)) in events[publish:]
    marker = json.loads((out / MARKER).read_text())
    assert set(marker["files"]) == {"a.bin", "sub/b.bin"} and marker["files"]["a.bin"]["bytes"] == 1

    events.clear()
    with lio.atomic_file(tmp_path / "f.json") as f:
        f.write("{}")
    publish = next(i for i, e in enumerate(events) if e[0] == "rename")
    assert any(e[0] == "fsync" and ".tmp-f.json-" in e[1] for e in events[:publish])
    assert ("fsync", str(tmp_path)) in events[publish:]
