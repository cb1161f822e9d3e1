"""`loopfit demo` end to end on a tiny model: every stage's output and the report."""

from __future__ import annotations

import json

from loopfit.cli import main


def test_demo_end_to_end_tiny(tiny_source_dir, tmp_path, capsys):
    out = tmp_path / "demo"
    args = [
        "demo",
        "--out",
        str(out),
        "--model",
        str(tiny_source_dir),
        "--layers",
        "0-1:2-3:4-5",
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
    ]
    main(args)
    capsys.readouterr()
    for name in (
        "analysis/layers.json",
        "analysis/layers.png",
        "converted/config.json",
        "teacher-cache/manifest.json",
        "heal/metrics.jsonl",
        "healed/config.json",
        "depths.json",
        "samples.json",
        "training.png",
        "loss-vs-depth.png",
        "report.md",
    ):
        assert (out / name).exists(), name
    depths = json.loads((out / "depths.json").read_text())
    assert depths["depths"] == [1, 2, 4]
    # The identity adapter makes the converted model depth-independent before healing.
    assert max(depths["before"]) - min(depths["before"]) < 1e-5
    assert depths["after"][1] < depths["before"][1]  # healing helped at the training depth
    report = (out / "report.md").read_text()
    assert "healing took the loss from" in report and "Sample generations" in report
    # A rerun finds every stage done and only rewrites the report.
    main(args)
    rerun = capsys.readouterr().out
    assert "=== " in rerun and "=== 5/7" not in rerun and "=== 2/7" not in rerun
