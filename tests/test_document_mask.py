"""Packed documents kept apart (`loopfit train --position_ids=true`): a packed row with per-document position ids
scores, for teacher and student alike, as the same documents in padded rows of their own; a run trains with it,
validates with it, and reads a teacher cache only when the cache was built the same way."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_model, write_teacher_and_looped_student

from loopfit.cache.reader import TeacherCache
from loopfit.convert import Layout, layout_from_sizes, to_looped, to_static
from loopfit.data import build_dataset
from loopfit.errors import LoopfitError
from loopfit.models import packed_attention
from loopfit.models.layers import enable_activation_checkpointing
from loopfit.models.packed_attention import segments, use_packed_attention
from loopfit.train import DistillationConfig, LoRAConfig, TrainConfig
from loopfit.train.recipe import setup, train, validate
from loopfit.train.student import Student, build_objective, objective_loss

pytestmark = pytest.mark.usefixtures("one_thread")

LENGTHS = (7, 12, 5)


def _documents(seed=0):
    g = torch.Generator().manual_seed(seed)
    docs = [torch.randint(4, 260, (n,), generator=g) for n in LENGTHS]
    labels = [d.clone() for d in docs]
    labels[0][:3] = -100  # a prompt, as in chat data
    return docs, labels


def _padded(docs, labels):
    """One right-padded row per document, as a padding collator gives (loopfit trains without an attention mask:
    right padding is never seen by a real token under the causal mask, and its labels are -100)."""
    width = max(len(d) for d in docs)
    ids = torch.zeros(len(docs), width, dtype=torch.long)
    y = torch.full((len(docs), width), -100, dtype=torch.long)
    for i, (d, t) in enumerate(zip(docs, labels)):
        ids[i, : len(d)], y[i, : len(t)] = d, t
    return {"input_ids": ids, "labels": y}


def _packed(docs, labels, position_ids=True):
    """The documents in one row; position ids restart at each document, whose first token is no target (as
    `PackedDataset` gives it: in a padded row of its own nothing predicts it either)."""
    labels = [torch.cat([torch.tensor([-100]), t[1:]]) for t in labels]
    batch = {"input_ids": torch.cat(docs)[None], "labels": torch.cat(labels)[None]}
    if position_ids:
        batch["position_ids"] = torch.cat([torch.arange(len(d)) for d in docs])[None]
    return batch


def _score(student, teacher, batch, num_steps, every_depth=1, gradient_checkpointing=False):
    from loopfit.train.config import EveryDepthConfig

    dcfg = DistillationConfig(enabled=True, teacher_model_name="t", ce_scale=0.4, kd_scale=0.6, kind="jsd")
    objective = build_objective(dcfg, student, teacher, every_depth=EveryDepthConfig(k=every_depth))
    n = (batch["labels"][:, 1:] != -100).sum().float()
    student.zero_grad()
    if gradient_checkpointing:
        enable_activation_checkpointing(student)
    parts = objective_loss(objective, Student(student), teacher, batch, num_steps, n)
    parts.total.backward()
    grads = {k: p.grad.clone() for k, p in student.named_parameters() if p.grad is not None}
    return parts, grads


@pytest.mark.parametrize("attention", ["sdpa", "loopfit_sdpa", "eager"])
@pytest.mark.parametrize("kind", ["looped", "looped_every_depth", "static", "static_checkpointed"])
def test_packed_row_with_position_ids_scores_as_padded_rows(kind, attention):
    """Loss terms (CE, live-teacher JSD, the loss at every depth) and every gradient: packed with position ids ==
    padded rows, under HF's packed-sequence masks (sdpa, eager) and under loopfit's per-document SDPA (also when
    checkpointed layers are recomputed); packed without position ids differs (documents see each other)."""
    teacher = make_tiny_model("llama", num_layers=6, hidden=32)
    if kind.startswith("static"):
        student, num_steps = to_static(teacher, Layout([0], [1, 2], [5])).train(), None
    else:
        student = to_looped(teacher, layout_from_sizes(6, 1, 2, 1), adapter_init="random", state_init="zeros")
        student, num_steps = student.train(), 3
    every_depth = 2 if kind == "looped_every_depth" else 1
    docs, labels = _documents()
    want, want_grads = _score(student, teacher, _padded(docs, labels), num_steps, every_depth)
    for m in (teacher, student):
        if attention == "loopfit_sdpa":
            assert use_packed_attention(m)
        elif attention == "eager":
            m.set_attn_implementation("eager")
    got, got_grads = _score(student, teacher, _packed(docs, labels), num_steps, every_depth,
                            gradient_checkpointing=kind == "static_checkpointed")  # fmt: skip
    assert want.kd > 0 and want.ce > 0
    assert got.named().keys() == want.named().keys()
    if every_depth > 1:
        assert "ce_R-1" in want.named()
    for name, value in want.named().items():
        torch.testing.assert_close(got.named()[name], value, rtol=1e-5, atol=1e-6)
    assert got_grads.keys() == want_grads.keys() and want_grads
    for k, g in want_grads.items():
        torch.testing.assert_close(got_grads[k], g, rtol=1e-4, atol=1e-6)
    mixed, _ = _score(student, teacher, _packed(docs, labels, position_ids=False), num_steps, every_depth)
    assert abs(float(mixed.total.detach()) - float(want.total.detach())) > 1e-3


@pytest.mark.parametrize("arch", ["gemma3_text", "mistral", "qwen3"])
@pytest.mark.parametrize("kind", ["looped", "static"])
def test_packed_rows_of_other_families_score_as_padded_rows(arch, kind):
    """Families with sliding-window layers (Gemma 3: window 8, shorter than a document here; Mistral: one window on
    every layer) and QK norms (Qwen3): packed == padded under `loopfit_sdpa`, which runs per document where that is
    exact and leaves a window shorter than a document to HF's mask."""
    teacher = make_tiny_model(arch, num_layers=6, hidden=32, **({"sliding_window": 6} if arch == "mistral" else {}))
    if teacher.config._attn_implementation != "sdpa":
        teacher.set_attn_implementation("sdpa")
    if kind == "static":
        student, num_steps = to_static(teacher, Layout([0], [1, 2], [5])).train(), None
    else:
        student = to_looped(teacher, layout_from_sizes(6, 1, 2, 1), adapter_init="random", state_init="zeros")
        student, num_steps = student.train(), 2
    docs, labels = _documents()
    want, want_grads = _score(student, teacher, _padded(docs, labels), num_steps)
    assert use_packed_attention(teacher) and use_packed_attention(student)
    got, got_grads = _score(student, teacher, _packed(docs, labels), num_steps)
    for name, value in want.named().items():
        torch.testing.assert_close(got.named()[name], value, rtol=1e-5, atol=1e-6)
    for k, g in want_grads.items():
        torch.testing.assert_close(got_grads[k], g, rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return write_teacher_and_looped_student(tmp_path_factory.mktemp("docmask"))


def _cfg(models, out, **kw) -> TrainConfig:
    base = dict(model_name=str(models / "looped"), out=str(out), data=str(models / "data.txt"), seq_len=128,
                batch_size=2, max_steps=3, progress_bar=False, tensorboard=False, fixed_num_steps=2,
                lora=LoRAConfig(enabled=True, r=4), val_fraction=0.2, eval_batches=1,
                distillation=DistillationConfig(enabled=True, teacher_model_name=str(models / "teacher")))  # fmt: skip
    return TrainConfig(**{**base, **kw})


def test_run_reads_per_document_positions_and_refuses_a_changed_setting_on_resume(models, tmp_path):
    """The batches of a `--position_ids` run carry the packed rows' per-document positions; the run trains every
    LoRA parameter; its validation reads them too; resuming with the setting flipped is refused (other data)."""
    cfg = _cfg(models, tmp_path / "run", position_ids=True)
    run = setup(_cfg(models, tmp_path / "probe", position_ids=True))
    batch = run.stream.next()
    pos = batch["position_ids"]
    assert pos.shape == batch["input_ids"].shape and (pos[:, 0] == 0).all()
    real = batch["input_ids"] != 0  # the tiny tokenizer's pad id
    assert int(((pos[:, 1:] == 0) & real[:, 1:]).sum()) > 0  # several documents in a row: positions restart
    assert (batch["labels"][pos == 0] == -100).all()
    rows = run.stream.dataset  # target counts leave out each document's first token, as the items do
    assert rows.stats()["target_tokens"] == sum(int((rows[i]["labels"] != -100).sum()) for i in range(len(rows)))
    assert rows.stats()["target_tokens"] < int((rows.rows.labels != -100).sum())
    kept_apart = validate(run, [2])[2]
    run.cfg.position_ids = False  # the same rows read as one causal sequence each: another loss
    assert abs(validate(run, [2])[2] - kept_apart) > 1e-4
    run.logger.close()
    train(cfg)
    from safetensors.torch import load_file

    lora = load_file(tmp_path / "run" / "final" / "adapter_model.safetensors")
    assert all(float(t.abs().sum()) > 0 for k, t in lora.items() if "lora_B" in k)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(x["loss"] == x["loss"] for x in lines if "loss" in x) and any("val_loss_r2" in x for x in lines)
    with pytest.raises(LoopfitError, match=r"position_ids \(true -> false\)"):
        setup(_cfg(models, tmp_path / "run", position_ids=False, max_steps=5, resume=True))


def test_teacher_cache_keeps_documents_apart_and_one_built_otherwise_is_refused(models, tmp_path):
    """A cache built with per-document positions holds the teacher with the documents kept apart (not attending
    across them); one built without them does not serve a `--position_ids` run (different data hash), one built
    with them does."""
    from loopfit.cache.writer import CacheSettings, write_cache
    from loopfit.data import tokenizer_hash
    from loopfit.loading import load_model, load_tokenizer

    tok = load_tokenizer(models / "teacher")
    teacher = load_model(models / "teacher").eval()
    vocab = teacher.get_output_embeddings().weight.shape[0]
    for flag in (False, True):
        packed = build_dataset(str(models / "data.txt"), tok, 128, seed=0, position_ids=flag)
        info = {"teacher": "t", "tokenizer_hash": tokenizer_hash(tok), "data_hash": packed.data_hash,
                "vocab_size": vocab}  # fmt: skip
        settings = CacheSettings(estimator="topk", top_k=vocab if flag else 16)  # whole distribution: compared below
        write_cache(teacher, packed.train, tmp_path / f"cache-{flag}", settings, info, progress=False)
    # What the cache holds is the teacher with the documents kept apart (no attention across them).
    cache = TeacherCache(tmp_path / "cache-True")
    ds = build_dataset(str(models / "data.txt"), tok, 128, seed=0, position_ids=True).train
    row = ds[0]
    assert int((row["position_ids"][1:] == 0).sum()) > 0  # several documents in the row
    with torch.no_grad():
        kw = packed_attention.packed_kwargs(teacher, row["position_ids"][None])
        apart = torch.softmax(teacher(row["input_ids"][None], **kw).logits[0].float(), -1)
        mixed = torch.softmax(teacher(row["input_ids"][None]).logits[0].float(), -1)
    has = cache.dense(0).sum(-1) > 0
    assert int(has.sum()) > 0
    off_apart = float((cache.dense(0)[has] - apart[has]).abs().max())
    off_mixed = float((cache.dense(0)[has] - mixed[has]).abs().max())
    assert off_apart < 1e-4 and off_mixed > 20 * off_apart, (off_apart, off_mixed)
    dist = dict(enabled=True, temperature=1.0)
    with pytest.raises(LoopfitError, match="does not match"):
        setup(_cfg(models, tmp_path / "a", position_ids=True, val_fraction=0.0, distillation=DistillationConfig(
            teacher_cache=str(tmp_path / "cache-False"), **dist)))  # fmt: skip
    run = setup(_cfg(models, tmp_path / "b", position_ids=True, val_fraction=0.0, distillation=DistillationConfig(
        teacher_cache=str(tmp_path / "cache-True"), **dist)))  # fmt: skip
    assert "position_ids" in run.stream.next()
    run.logger.close()


def test_segments_and_per_document_attention_calls(monkeypatch):
    """Segments are read from the position ids (a row's start always opens one); `loopfit_sdpa` runs one causal
    SDPA call per document and row, and is plain `sdpa` (masks included) without segments."""
    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [3, 4, 0, 1, 2, 3]])
    assert segments(pos) == [[0, 3, 5, 6], [0, 2, 6]]
    # HF's rule: a document starts wherever a position is not its predecessor + 1, not only at 0.
    assert segments(torch.tensor([[0, 1, 2, 3, 7, 8, 9, 10]])) == [[0, 4, 8]]
    calls = []
    real = packed_attention.sdpa_attention_forward

    def spy(module, q, k, v, mask, **kw):
        calls.append((q.shape[2], mask is None, kw.get("is_causal")))
        return real(module, q, k, v, mask, **kw)

    monkeypatch.setattr(packed_attention, "sdpa_attention_forward", spy)
    teacher = make_tiny_model("llama", num_layers=2, hidden=32)
    ids = torch.randint(4, 260, (2, 6))
    with torch.no_grad():
        want = [teacher.model(ids[b : b + 1, s:e]).last_hidden_state for b, row in enumerate(segments(pos))
                for s, e in zip(row[:-1], row[1:])]  # fmt: skip
        assert use_packed_attention(teacher) and teacher.config._attn_implementation == "loopfit_sdpa"
        calls.clear()
        got = teacher.model(ids, **packed_attention.packed_kwargs(teacher, pos)).last_hidden_state
    assert calls == [(3, True, True), (2, True, True), (1, True, True), (2, True, True), (4, True, True)] * 2
    pieces = [got[b : b + 1, s:e] for b, row in enumerate(segments(pos)) for s, e in zip(row[:-1], row[1:])]
    for a, b in zip(pieces, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    calls.clear()
    with torch.no_grad():
        teacher.model(ids, attention_mask=torch.ones_like(ids))  # no segments: sdpa's own call, mask and all
    assert len(calls) == 2 and all(n == 6 for n, _, _ in calls)


@pytest.mark.parametrize("short", [0, 3, 256])
def test_per_document_attention_under_bf16_autocast_is_the_slice_by_slice_computation(monkeypatch, short):
    """Under bf16 autocast `loopfit_sdpa` casts q, k, v once and splits them (one `cat` in the backward pass): the
    output and the gradients of q, k, v are bit-equal to SDPA called on each document's slice, GQA included. A
    document of at most `FLOAT32_MAX_TOKENS_X_HEAD_DIM / head_dim` tokens that needs gradients runs in float32, its
    output cast to bf16; the others, and every document without gradients, in bf16 (autocast casting the slice).
    `short` = 3 mixes both in one row."""
    monkeypatch.setattr(packed_attention, "FLOAT32_MAX_TOKENS_X_HEAD_DIM", short * 8)  # head_dim 8
    teacher = make_tiny_model("llama", num_layers=1, hidden=32)
    module = teacher.model.layers[0].self_attn
    bounds = [[0, 3, 5, 9], [0, 9]]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 9, 8, generator=g, requires_grad=True) for h in (4, 2, 2))
    w = torch.randn(2, 9, 4, 8, generator=g)

    def run(fn, grad=True):
        for t in (q, k, v):
            t.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.set_grad_enabled(grad):
            out = fn()
        if grad:
            (out.float() * w).sum().backward()
        return out, [t.grad.clone() for t in (q, k, v)] if grad else None

    def by_slices(upcast):
        rows = []
        for b, row in enumerate(bounds):
            parts = []
            for s, e in zip(row[:-1], row[1:]):
                qkv = [t[b : b + 1, :, s:e] for t in (q, k, v)]
                if upcast and e - s <= short:
                    with torch.autocast("cpu", enabled=False):
                        out = packed_attention.sdpa_attention_forward(
                            module, *qkv, None, is_causal=True, scaling=module.scaling
                        )[0].to(torch.bfloat16)
                else:
                    out = packed_attention.sdpa_attention_forward(module, *qkv, None, is_causal=True,
                                                                  scaling=module.scaling)[0]  # fmt: skip
                parts.append(out)
            rows.append(torch.cat(parts, dim=1))
        return torch.cat(rows)

    def packed():
        return packed_attention.packed_sdpa_forward(module, q, k, v, None, bounds, scaling=module.scaling)[0]

    want, want_grads = run(lambda: by_slices(True))
    got, got_grads = run(packed)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)
    for a, b in zip(got_grads, want_grads):
        assert a.dtype == torch.float32 and torch.equal(a, b)
    # The float32 documents really differ from the bf16 computation (the switch is on), and nothing without
    # gradients is upcast.
    bf16, _ = run(lambda: by_slices(False))
    assert torch.equal(got, bf16) == (short == 0)
    assert torch.equal(run(packed, grad=False)[0], bf16)
