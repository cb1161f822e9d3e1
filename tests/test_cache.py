"""Teacher cache: contents, training from the cache vs the online teacher, resumption, verification, errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import make_tiny_model, make_tiny_tokenizer

from loopfit.cache import CacheSettings, TeacherCache, TeacherTargetsDataset, build_teacher_cache, write_cache
from loopfit.data import build_dataset, tokenizer_hash
from loopfit.errors import LoopfitError
from loopfit.losses import fused_kd_loss, kd_divergence

VOCAB = 260
TEXT = "\n\n".join(
    f"Paragraph {i}: the quick brown fox number {i * 7} jumps over {i % 5} lazy dogs and counts to {i * 3}."
    for i in range(24)
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    (root / "text.txt").write_text(TEXT)
    tok = make_tiny_tokenizer()
    data = build_dataset(str(root / "text.txt"), tok, seq_len=32)
    teacher = make_tiny_model(num_layers=2, hidden=32, vocab=VOCAB, seed=1)
    info = {"teacher": "tiny", "tokenizer_hash": tokenizer_hash(tok), "data_hash": data.data_hash, "vocab_size": VOCAB}
    return root, tok, data, teacher, info


def build(setup, name, **kw):
    root, _, data, teacher, info = setup
    settings = CacheSettings(**{"shard_rows": 5, "batch_size": 2, **kw})
    out = root / name
    if out.exists():
        shutil.rmtree(out)
    return TeacherCache(write_cache(teacher, data.train, out, settings, info, progress=False))


def teacher_logits(setup, rows):
    _, _, data, teacher, _ = setup
    ids = torch.stack([data.train[i]["input_ids"] for i in rows])
    with torch.no_grad():
        return teacher(input_ids=ids).logits.float()


def test_topk_contents_dtypes_and_alignment(setup):
    cache = build(setup, "topk", estimator="topk", top_k=5)
    _, _, data, _, _ = setup
    assert len(cache) == len(data.train) > 5  # several shards
    assert cache.manifest["dtypes"] == {"counts": "uint8", "ids": "uint16", "values": "float16"}
    item = cache[3]
    assert item["ids"].shape == (32, 5) and "tail" not in item
    logp = torch.log_softmax(teacher_logits(setup, [3])[0], -1)
    labels = data.train[3]["labels"]
    for j in range(31):
        if labels[j + 1] == -100:
            assert (item["ids"][j] == 0).all()
            continue
        want_vals, want_ids = logp[j].topk(5)
        assert set(item["ids"][j].tolist()) == set(want_ids.tolist())
        torch.testing.assert_close(item["values"][j], want_vals.half().float(), rtol=0, atol=0)
    assert (item["ids"][31] == 0).all()  # the last position has no next token
    assert cache.verify()["rows"] == len(data.train)


def test_training_from_topk_tail_cache_at_full_vocab_equals_online_teacher(setup):
    cache = build(setup, "full", estimator="topk_tail", top_k=VOCAB)
    _, _, data, _, _ = setup
    rows = list(range(4))
    t_logits = teacher_logits(setup, rows)
    batch = torch.utils.data.default_collate([TeacherTargetsDataset(data.train, cache)[i] for i in rows])

    def run(use_cache: bool) -> list[float]:
        student = make_tiny_model(num_layers=2, hidden=32, vocab=VOCAB, seed=7).train()
        opt = torch.optim.SGD(student.parameters(), lr=0.5)
        losses = []
        for _ in range(3):
            out = student(input_ids=batch["input_ids"], output_hidden_states=True)
            hidden = student.model.norm(out.hidden_states[-1])[:, :-1]
            labels = batch["labels"][:, 1:]
            if use_cache:
                kw = dict(teacher_ids=batch["teacher_ids"][:, :-1], teacher_values=batch["teacher_values"][:, :-1],
                          teacher_tail=batch["teacher_tail"][:, :-1], estimator="topk_tail")  # fmt: skip
                loss = fused_kd_loss(hidden, student.lm_head.weight, labels, temperature=2.0, **kw).total
            else:
                logits = student.lm_head(hidden)
                ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100)
                loss = ce + kd_divergence(logits, t_logits[:, :-1], labels, temperature=2.0)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses

    online, cached = run(False), run(True)
    assert online[0] != online[-1]
    np.testing.assert_allclose(cached, online, rtol=1e-4, atol=1e-4)


def test_sampled_draws_converge_to_the_teacher(setup):
    _, _, data, _, _ = setup
    few = build(setup, "sampled8", estimator="sampled", samples=8, temperature=1.5)
    many = build(setup, "sampled", estimator="sampled", samples=2000, temperature=1.5)
    assert few.manifest["dtypes"]["values"] == "uint8" and many.manifest["dtypes"]["values"] == "uint16"
    p = torch.softmax(teacher_logits(setup, [2])[0] / 1.5, -1)
    has = few.dense(2).sum(-1) > 0
    err_many = (many.dense(2) - p)[has].abs().max()
    err_few = (few.dense(2) - p)[has].abs().max()
    assert err_many < 0.03 < err_few
    # The counts sum to the number of draws at every position with a target.
    item = few[2]
    torch.testing.assert_close(item["values"].sum(-1)[has], torch.full((int(has.sum()),), 8.0))
    # Training must use the draw temperature.
    with pytest.raises(LoopfitError, match="temperature"):
        few.check_compatible(few.manifest["tokenizer_hash"], few.manifest["data_hash"], temperature=2.0)
    few.check_compatible(few.manifest["tokenizer_hash"], few.manifest["data_hash"], temperature=1.5)


def test_interrupted_run_resumes_to_identical_contents(setup):
    root, _, data, teacher, info = setup
    reference = build(setup, "uninterrupted", estimator="sampled", samples=16)
    out = root / "resumed"
    settings = CacheSettings(estimator="sampled", samples=16, shard_rows=5, batch_size=2)

    def kill_after_second_shard(index):
        if index == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_cache(teacher, data.train, out, settings, info, progress=False, on_shard=kill_after_second_shard)
    partial = root / ".partial-resumed"
    assert not out.exists() and len(json.loads((partial / "progress.json").read_text())["shards"]) == 2
    (partial / ".tmp-shard-00002.ids.npy-x").write_bytes(b"half-written")  # a crash mid-file leaves this
    calls = []
    write_cache(teacher, data.train, out, settings, info, progress=False, on_shard=calls.append)
    assert calls[0] == 2  # resumed after the two finished shards
    resumed = TeacherCache(out)
    resumed.verify()
    assert resumed.manifest == reference.manifest
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference.folder.iterdir())
    # Different settings cannot resume someone else's partial run.
    with pytest.raises(KeyboardInterrupt):
        write_cache(teacher, data.train, root / "other", settings, info, progress=False,
                    on_shard=kill_after_second_shard)  # fmt: skip
    changed = CacheSettings(estimator="sampled", samples=8, shard_rows=5, batch_size=2)
    with pytest.raises(LoopfitError, match="other settings"):
        write_cache(teacher, data.train, root / "other", changed, info, progress=False)


def test_corrupted_wrong_and_foreign_caches_are_refused(setup, capsys):
    from loopfit.cli import main

    src = build(setup, "good", estimator="topk_tail", top_k=4)
    root = src.folder.parent
    moved = root / "moved"
    shutil.copytree(src.folder, moved)  # relative paths: a copied cache still works
    main(["verify-cache", str(moved)])
    assert "ok:" in capsys.readouterr().out

    ids_file = moved / "shard-00001.ids.npy"
    raw = bytearray(ids_file.read_bytes())
    raw[-1] ^= 0xFF
    ids_file.write_bytes(bytes(raw))
    with pytest.raises(LoopfitError, match="shard-00001.ids.npy is damaged"):
        TeacherCache(moved).verify()
    with pytest.raises(SystemExit) as e:
        main(["verify-cache", str(moved)])
    assert e.value.code == 2 and "damaged" in capsys.readouterr().err

    manifest = json.loads((src.folder / "manifest.json").read_text())
    bad = root / "bad"
    shutil.copytree(src.folder, bad)
    del manifest["shards"][-1]
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(LoopfitError, match="cover"):
        TeacherCache(bad).verify()
    (bad / "manifest.json").write_text("{}")
    with pytest.raises(LoopfitError, match="not a valid teacher-cache manifest"):
        TeacherCache(bad)
    with pytest.raises(LoopfitError, match="not a teacher cache"):
        TeacherCache(root)

    _, tok, data, _, _ = setup
    with pytest.raises(LoopfitError, match="tokenizer"):
        src.check_compatible("0123456789abcdef", data.data_hash)
    with pytest.raises(LoopfitError, match="data"):
        src.check_compatible(tokenizer_hash(tok), "0123456789abcdef")
    src.check_compatible(tokenizer_hash(tok), data.data_hash)
    with pytest.raises(LoopfitError, match="rows"):
        TeacherTargetsDataset(torch.utils.data.Subset(data.train, [0, 1]), src)


def test_bad_settings_fail_before_work(setup):
    root, _, data, teacher, info = setup
    for kw, msg in [(dict(estimator="top"), "estimator"), (dict(top_k=0), "top_k"), (dict(top_k=VOCAB + 1), "top_k"),
                    (dict(estimator="topk", temperature=2.0), "temperature")]:  # fmt: skip
        with pytest.raises(LoopfitError, match=msg):
            write_cache(teacher, data.train, root / "never", CacheSettings(**kw), info, progress=False)
    # Format flags that need a chat template are refused before the (here missing) teacher is looked up.
    for kw in (dict(assistant_only=True), dict(system_prompt="Be brief.")):
        with pytest.raises(LoopfitError, match="need --chat=true"):
            build_teacher_cache(str(root / "no-teacher"), "x.txt", root / "never", CacheSettings(), **kw)
    assert not (root / "never").exists() and not (root / ".partial-never").exists()


def test_cli_end_to_end(tmp_path, capsys):
    from loopfit.cli import main

    (tmp_path / "text.txt").write_text(TEXT)
    model_dir = tmp_path / "teacher"
    make_tiny_model(num_layers=2, hidden=32, vocab=VOCAB, seed=1).save_pretrained(model_dir)
    make_tiny_tokenizer().save_pretrained(model_dir)
    out = tmp_path / "c"
    main(["cache-teacher", "--teacher", str(model_dir), "--data", str(tmp_path / "text.txt"), "--seq_len", "32",
          "--estimator", "sampled", "--samples", "32", "--out", str(out)])  # fmt: skip
    main(["verify-cache", str(out)])
    assert "ok:" in capsys.readouterr().out
    cache = TeacherCache(out)
    assert cache.estimator == "sampled" and cache.manifest["data"]["seq_len"] == 32
    with pytest.raises(SystemExit) as e:
        main(["cache-teacher", "--teacher", str(model_dir), "--data", str(tmp_path / "text.txt"), "--out", str(out)])
    assert e.value.code == 2 and "already exists" in capsys.readouterr().err


def test_sigkill_mid_run_then_resume(setup):
    """A real SIGKILL (no cleanup runs) after the second shard; the rerun completes and equals a clean run."""
    import subprocess
    import sys
    import textwrap
    from pathlib import Path

    root = setup[0]
    reference = build(setup, "clean-topk", estimator="topk_tail", top_k=8)
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import torch
        from conftest import make_tiny_model, make_tiny_tokenizer
        from loopfit.cache import CacheSettings, write_cache
        from loopfit.data import build_dataset, tokenizer_hash
        tok = make_tiny_tokenizer()
        data = build_dataset({str(root / "text.txt")!r}, tok, seq_len=32)
        teacher = make_tiny_model(num_layers=2, hidden=32, vocab={VOCAB}, seed=1)
        info = {{"teacher": "tiny", "tokenizer_hash": tokenizer_hash(tok), "data_hash": data.data_hash,
                "vocab_size": {VOCAB}}}
        def on_shard(i):
            if i == 1:
                os.kill(os.getpid(), signal.SIGKILL)
        settings = CacheSettings(estimator="topk_tail", top_k=8, shard_rows=5, batch_size=2)
        write_cache(teacher, data.train, {str(root / "killed")!r}, settings, info, progress=False, on_shard=on_shard)
    """)
    first = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert first.returncode == -9, first.stderr[-1000:]
    assert not (root / "killed").exists() and (root / ".partial-killed" / "progress.json").exists()
    _, _, data, teacher, info = setup
    settings = CacheSettings(estimator="topk_tail", top_k=8, shard_rows=5, batch_size=2)
    calls = []
    write_cache(teacher, data.train, root / "killed", settings, info, progress=False, on_shard=calls.append)
    assert calls[0] == 2
    resumed = TeacherCache(root / "killed")
    resumed.verify()
    assert resumed.manifest == reference.manifest
    for sh in resumed.shards:
        for rec in sh["files"].values():
            assert (root / "killed" / rec["file"]).read_bytes() == (reference.folder / rec["file"]).read_bytes()
