"""`loopfit demo` end to end on a tiny model: every stage's output, the teacher-referenced report and resuming."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from loopfit.cli import main
from loopfit.data import build_dataset
from loopfit.errors import LoopfitError
from loopfit.loading import load_model, load_tokenizer
from loopfit.models.sampling import sample
from loopfit.pipeline import DemoConfig, Plan, demo
from loopfit.pipeline.config import HELDOUT_PROMPTS, TRAIN_PROMPTS
from loopfit.pipeline.heldout import text_batches
from loopfit.pipeline.progress import left_padded
from loopfit.pipeline.stages import check_resumable
from loopfit.pipeline.teacher_train import BATCH, heal_data, teacher_train_texts

IN_FORMAT = "in-format: held-out arithmetic word problems (student trained on this format; the teacher did not)"


def test_demo_end_to_end_tiny(tiny_source_dir, tmp_path, capsys):
    out = tmp_path / "demo"
    val = tmp_path / "val.txt"
    val.write_text("\n\n".join(f"A note {i}: the river rose {i % 4} feet before the storm passed." for i in range(30)))
    args = [
        "demo",
        "--out",
        str(out),
        "--model",
        str(tiny_source_dir),
        "--layers",
        "0:2-3:5",  # layers 1 and 4 dropped: the converted model is worse than the teacher
        "--budget_minutes",
        "0.3",
        "--seq_len",
        "64",
        "--batch_size",
        "2",
        "--max_documents",
        "60",
        "--max_mean_rec",
        "2",
        "--depths",
        "[1,2,4]",
        "--analysis_samples",
        "4",
        "--eval_rows",
        "4",
        "--teacher_texts",
        "6",
        "--teacher_text_tokens",
        "24",
        "--val_data",
        str(val),
    ]
    main(args)
    first = capsys.readouterr()
    for name in (
        "analysis/layers.json",
        "analysis/layers.png",
        "converted/config.json",
        "teacher-cache/manifest.json",
        "heldout/teacher-texts.json",
        "heal/metrics.jsonl",
        "healed/config.json",
        "depths.json",
        "samples.json",
        "timings.json",
        "training.png",
        "loss-vs-depth.png",
        "report.md",
    ):
        assert (out / name).exists(), name
    # Every long stage shows progress even with stderr captured (not a terminal): the loss sweep and generation bars.
    assert "loss: 100%" in first.err and "teacher samples: " in first.err and "R=2: " in first.err

    # The heal read the task data mixed with text the teacher wrote from the training openings (half the tokens by
    # default), and the teacher cache covers exactly those rows.
    written = [json.loads(line)["text"] for line in (out / "teacher-train.jsonl").read_text().splitlines()]
    assert written and all(any(t.startswith(o) for o in TRAIN_PROMPTS) for t in written)
    assert not any(t.startswith(o) for t in written for o in HELDOUT_PROMPTS)
    mix = ["arithmetic:0.5", f"{out / 'teacher-train.jsonl'}:0.5"]
    assert yaml.safe_load((out / "heal" / "config.yaml").read_text())["data"] == mix
    assert json.loads((out / "teacher-cache" / "manifest.json").read_text())["data"]["sources"] == mix
    plan = json.loads((out / "plan.json").read_text())
    packed = build_dataset(mix, load_tokenizer(tiny_source_dir), 64, chat=True, val_fraction=plan["val_fraction"],
                           max_documents=plan["max_documents"])  # fmt: skip
    used = {r["spec"]: r["train_tokens_used"] for r in packed.manifest["sources"]}
    assert used[str(out / "teacher-train.jsonl")] > 0 and used["arithmetic"] > 0
    assert "teacher writes: " in first.err

    held = json.loads((out / "heldout" / "teacher-texts.json").read_text())
    assert len(held["texts"]) == 6 and held["max_new_tokens"] == 24 and held["temperature"] == 1.0
    assert all(1 <= len(t["ids"]) <= 24 and t["prompt_ids"] for t in held["texts"])

    depths = json.loads((out / "depths.json").read_text())
    assert depths["depths"] == [1, 2, 4]
    sets = depths["sets"]
    assert list(sets) == ["teacher_text", "val_data", "in_format"]
    assert sets["teacher_text"]["tokens"] == sum(len(t["ids"]) for t in held["texts"])
    for s in sets.values():
        assert len(s["converted"]) == len(s["healed"]) == 3 and s["tokens"] > 0
        # The identity adapter makes the converted model depth-independent before healing.
        assert max(s["converted"]) - min(s["converted"]) < 1e-5
    # On its own samples the teacher is the floor (in expectation; here with a fixed seed).
    assert sets["teacher_text"]["teacher"] < sets["teacher_text"]["converted"][0]
    assert sets["in_format"]["healed"][1] < sets["in_format"]["converted"][1]  # healing helped at the training depth

    report = (out / "report.md").read_text()
    table = [line for line in report.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| held-out data | model | R = 1 | R = 2 | R = 4 |")
    models = [line.split(" | ")[1] for line in table[1:]]
    # The teacher-referenced block leads, the user's data follows, the in-format block comes last and says what it is.
    assert models[:4] == ["teacher (the floor)", "converted (the pruned model)", "**healed**", "teacher gap closed"]
    assert table[1].startswith(f"| the teacher's own text, {sets['teacher_text']['tokens']:,} tokens |")
    assert table[5].startswith(f"| your --val_data `{val}`") and models[4:8] == ["teacher", *models[1:4]]
    assert table[9].startswith(f"| {IN_FORMAT}") and "no floor" in models[8] and len(table) == 12
    assert "mixed with text the teacher wrote itself from 24 other openings (`teacher-train.jsonl`, 50%" in report
    assert "healing closed **" in report and "In-format, second and not a healing result" in report
    assert report.index("teacher gap closed") < report.index(IN_FORMAT) and "Sample generations" in report

    # A rerun finds every stage done and only rewrites the report; the teacher's texts are not sampled again.
    before = (out / "heldout" / "teacher-texts.json").read_bytes()
    written_before = (out / "teacher-train.jsonl").read_bytes()
    main(args)
    rerun = capsys.readouterr().out
    assert (out / "teacher-train.jsonl").read_bytes() == written_before and "=== 4/9" not in rerun
    assert "=== " in rerun and "=== 6/9" not in rerun and "=== 7/9" not in rerun and "=== 8/9" not in rerun
    # Without the scores, a resumed demo scores the same saved texts again: same tokens, same losses.
    (out / "depths.json").unlink()
    main(args)
    resumed = capsys.readouterr().out
    assert "=== 8/9" in resumed and "=== 6/9" not in resumed
    assert (out / "heldout" / "teacher-texts.json").read_bytes() == before
    again = json.loads((out / "depths.json").read_text())["sets"]["teacher_text"]
    assert again["tokens"] == sets["teacher_text"]["tokens"]
    assert again["healed"] == pytest.approx(sets["teacher_text"]["healed"], rel=1e-5)


def test_text_batches_label_only_the_sampled_tokens():
    texts = [
        {"prompt_ids": [5, 6, 7], "ids": [8, 9]},
        {"prompt_ids": [5], "ids": [10, 11, 12, 2]},
        {"prompt_ids": [4, 4], "ids": [13]},
    ]
    batches = text_batches(texts, 2)
    assert [b["input_ids"].shape[0] for b in batches] == [2, 1]
    rows = {tuple(b["input_ids"][i][b["attention_mask"][i].bool()].tolist()): (b, i) for b in batches for i in range(2)
            if i < b["input_ids"].shape[0]}  # fmt: skip
    b, i = rows[(5, 6, 7, 8, 9)]
    assert b["labels"][i].tolist()[:5] == [-100, -100, -100, 8, 9]
    assert torch.all(b["labels"][i][5:] == -100)
    b, i = rows[(5, 10, 11, 12, 2)]
    assert b["labels"][i].tolist() == [-100, 10, 11, 12, 2]


def test_demo_missing_val_data_fails_before_any_stage(tiny_source_dir, tmp_path):
    cfg = DemoConfig(out=str(tmp_path / "demo"), model=str(tiny_source_dir), val_data=str(tmp_path / "nope.txt"))
    with pytest.raises(LoopfitError, match="nope.txt"):
        demo(cfg)
    assert not (tmp_path / "demo" / "analysis").exists()


@pytest.mark.parametrize("share", [1.0, -0.1, float("nan")])
def test_demo_bad_teacher_train_share_fails_before_anything_is_written(tiny_source_dir, tmp_path, share):
    cfg = DemoConfig(out=str(tmp_path / "demo"), model=str(tiny_source_dir), teacher_train_share=share)
    with pytest.raises(LoopfitError, match="--teacher_train_share must be in \\[0, 1\\)"):
        demo(cfg)
    assert not (tmp_path / "demo").exists()


def test_heal_data_mixes_the_task_data_with_the_teachers_text_by_share(tmp_path):
    written = f"{tmp_path / 'teacher-train.jsonl'}"
    assert heal_data(DemoConfig(teacher_train_share=0.0), tmp_path) is None  # the task data alone: built-in problems
    assert heal_data(DemoConfig(data="q.jsonl", teacher_train_share=0.0), tmp_path) == "q.jsonl"
    assert heal_data(DemoConfig(teacher_train_share=0.25), tmp_path) == ["arithmetic:0.75", f"{written}:0.25"]
    assert heal_data(DemoConfig(data="q.jsonl"), tmp_path) == ["q.jsonl:0.5", f"{written}:0.5"]


def _write_texts(tiny_source_dir, out, max_documents, capsys, steps=3):
    teacher, tokenizer = load_model(tiny_source_dir).eval(), load_tokenizer(tiny_source_dir)
    cfg = DemoConfig(model=str(tiny_source_dir), teacher_text_tokens=12, seq_len=64, batch_size=2, seed=3)
    plan = Plan(steps=steps, max_documents=max_documents, val_fraction=0.1, seconds_per_step=1.0)
    path = teacher_train_texts(cfg, out, teacher, tokenizer, plan)
    return cfg, teacher, tokenizer, [json.loads(line)["text"] for line in path.read_text().splitlines()], capsys


def test_teacher_train_texts_are_the_openings_continued_by_the_teachers_samples(tiny_source_dir, tmp_path, capsys):
    cfg, teacher, tokenizer, written, _ = _write_texts(tiny_source_dir, tmp_path, 1000, capsys)
    # target_tokens: 0.5 x 3 steps x 2 rows x 64 tokens / 0.9 x 1.05 = 224 tokens, one batch of BATCH rows covers it.
    assert len(written) == BATCH
    # The same draws, made here step by step: each text is its opening and exactly the sampled tokens, none dropped.
    prompts = [TRAIN_PROMPTS[i % len(TRAIN_PROMPTS)] for i in range(BATCH)]
    ids, mask = left_padded([tokenizer(x)["input_ids"] for x in prompts], tokenizer.pad_token_id)
    new = sample(
        teacher, ids, mask, 12, [tokenizer.eos_token_id], tokenizer.pad_token_id, torch.Generator().manual_seed(3)
    )
    expected = []
    for prompt, row in zip(prompts, new.tolist()):
        row = row[: row.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in row else row
        expected.append(prompt + tokenizer.decode(row, skip_special_tokens=True))
    assert written == expected
    assert sum(len(t) > len(p) for t, p in zip(written, prompts)) > BATCH // 2  # most texts continue their opening


def test_teacher_train_texts_stop_at_what_the_heal_reads_of_each_source(tiny_source_dir, tmp_path, capsys):
    *_, written, capsys = _write_texts(tiny_source_dir, tmp_path, 5, capsys, steps=100)  # 7,467 tokens asked
    assert len(written) == 5 and "the heal reads at most 5 documents of each source" in capsys.readouterr().out


def test_demo_refuses_to_resume_a_run_healed_on_another_mix(tiny_source_dir, tmp_path):
    out = tmp_path / "demo"
    (out / "teacher-cache").mkdir(parents=True)
    record = json.dumps({"out": str(out), "model": str(tiny_source_dir)})  # before --teacher_train_share: share 0
    (out / "demo-config.json").write_text(record)
    with pytest.raises(LoopfitError, match="healed with --teacher_train_share 0 .*rerun with --teacher_train_share 0"):
        demo(DemoConfig(out=str(out), model=str(tiny_source_dir)))
    assert (out / "demo-config.json").read_text() == record and sorted(p.name for p in out.iterdir()) == [
        "demo-config.json",
        "teacher-cache",
    ]
    check_resumable(DemoConfig(out=str(out), teacher_train_share=0.0), out)  # the same mix resumes
    check_resumable(DemoConfig(out=str(tmp_path / "new")), tmp_path / "new")  # a new folder has nothing to compare
