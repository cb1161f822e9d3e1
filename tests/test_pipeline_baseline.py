"""`loopfit demo --baseline static`: the static pruned model healed at equal training FLOPs (or minutes) as the
looped heal, scored on the same held-out sets, and named in the report."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import yaml

from loopfit.cli import main
from loopfit.convert import parse_layout, to_static
from loopfit.errors import LoopfitError
from loopfit.flops import flop_params, train_flops_per_token
from loopfit.loading import load_model
from loopfit.pipeline import DemoConfig, demo

SEQ, BATCH = 64, 2


def _args(out, model, *extra):
    return ["demo", "--out", str(out), "--model", str(model), "--layers", "0:2-3:5", "--budget_minutes", "0.2",
            "--seq_len", str(SEQ), "--batch_size", str(BATCH), "--max_documents", "60", "--max_mean_rec", "2",
            "--depths", "[1,2]", "--analysis_samples", "2", "--eval_rows", "2", "--teacher_texts", "4",
            "--teacher_text_tokens", "16", *extra]  # fmt: skip


def _steps(run):
    """The training lines of a run's metrics.jsonl, one per optimizer step."""
    return [m for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "tokens_per_s" in m]


def test_demo_static_baseline_at_equal_flops_then_minutes(tiny_source_dir, tmp_path, capsys):
    out = tmp_path / "demo"
    main(_args(out, tiny_source_dir, "--baseline", "static", "--baseline_budget", "flops"))
    capsys.readouterr()

    # The static model is the layout's layers once: 0, 2, 3, 5 of the source's 6.
    teacher = load_model(tiny_source_dir)
    static = load_model(out / "static")
    assert static.config.num_hidden_layers == 4 and static.config.model_type == teacher.config.model_type
    expected = to_static(teacher, parse_layout("0:2-3:5", teacher.config.num_hidden_layers))
    for (name, a), b in zip(static.state_dict().items(), expected.state_dict().values()):
        assert a.shape == b.shape and bool((a == b).all()), name

    # Its number of steps is the looped heal's achieved training FLOPs over the static model's FLOPs per step,
    # recomputed here from the looped run's logged depths and the one FLOP function.
    tokens = SEQ * BATCH
    lp, sp = flop_params(load_model(out / "converted")), flop_params(static)
    looped = _steps(out / "heal")
    looped_flops = sum(tokens * train_flops_per_token(lp, m["num_steps_no_grad"], m["num_steps_grad"], SEQ)
                       for m in looped)  # fmt: skip
    assert any(m["num_steps"] > 1 for m in looped)  # the loop ran deeper than once: a ratio other than the depth-1 one
    static_step = tokens * train_flops_per_token(sp, 0, 0, SEQ)
    want = math.floor(looped_flops / static_step)
    assert want > len(looped)  # a static step is cheaper than the looped heal's average step
    summary = json.loads((out / "baseline.json").read_text())
    assert summary["kind"] == "flops" and summary["basis"] == "achieved"
    assert summary["looped"]["flops"] == pytest.approx(looped_flops, rel=1e-9)
    assert summary["static"]["steps"] == want == len(_steps(out / "static-heal"))
    assert summary["static"]["flops"] == pytest.approx(want * static_step, rel=1e-9)
    assert summary["static"]["flops"] <= looped_flops < summary["static"]["flops"] + static_step
    # Same recipe: LoRA of the same rank, KD from the same cache, same data, seed and learning rate.
    lc, sc = (yaml.safe_load((out / r / "config.yaml").read_text()) for r in ("heal", "static-heal"))
    for key in ("data", "seed", "seq_len", "batch_size", "max_documents", "val_fraction"):
        assert lc[key] == sc[key], key
    assert lc["distillation"] == sc["distillation"] and lc["optim_config"] == sc["optim_config"]
    assert sc["lora"]["r"] == lc["lora"]["r"] and not sc["mean_recurrence_schedule"]["turn_on"]
    assert (out / "static-healed" / "config.json").exists() and sc["max_minutes"] is None  # no guard: exact FLOPs

    # Scored on the same held-out sets, one value at every depth; the report has the row and names the budget kind.
    sets = json.loads((out / "depths.json").read_text())["sets"]
    for s in sets.values():
        assert len(s["static"]) == 2 and s["static"][0] == s["static"][1] and math.isfinite(s["static"][0])
    report = (out / "report.md").read_text()
    rows = [line for line in report.splitlines() if line.startswith("| | static, healed (no loop) |")]
    assert len(rows) == len(sets) == 2
    assert f"{sets['teacher_text']['static'][0]:.3f}" in rows[0]
    assert "at **equal training FLOPs** (`--baseline_budget flops`" in report
    assert f"{want} steps, {want * static_step:.3g} training FLOPs" in report
    assert f"looped heal {len(looped)} steps, {looped_flops:.3g} training FLOPs" in report

    # A rerun skips every stage; changing the budget kind of a planned folder is refused before anything is written.
    main(_args(out, tiny_source_dir, "--baseline", "static"))
    assert "=== baseline" not in capsys.readouterr().out
    main(_args(out, tiny_source_dir))  # the same folder without --baseline: the report shows no static model
    plain = (out / "report.md").read_text()
    assert "static, healed" not in plain and "Static baseline" not in plain and "=== " in capsys.readouterr().out
    with pytest.raises(LoopfitError, match="planned its static baseline with --baseline_budget flops"):
        demo(DemoConfig(out=str(out), model=str(tiny_source_dir), baseline="static", baseline_budget="minutes"))

    # At equal minutes, on the same looped heal: only the static stages and its scores run again.
    for name in ("baseline-plan.json", "baseline.json", "static-heal", "static-healed"):
        p = out / name
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    before = json.loads((out / "depths.json").read_text())["sets"]
    for s in before.values():
        del s["static"]
    (out / "depths.json").write_text(json.dumps({"depths": [1, 2], "sets": before}))
    main(_args(out, tiny_source_dir, "--baseline", "static", "--baseline_budget", "minutes"))
    log = capsys.readouterr().out
    assert "=== baseline 2/3" in log and "=== 7/9" not in log and "=== 8/9 loss at depths [1, 2] of static on" in log
    summary = json.loads((out / "baseline.json").read_text())
    seconds = sum(tokens / m["tokens_per_s"] for m in looped)
    assert summary["kind"] == "minutes" and summary["looped"]["seconds"] == pytest.approx(seconds, rel=1e-9)
    plan = json.loads((out / "baseline-plan.json").read_text())
    assert plan["steps"] == max(1, math.floor(seconds / plan["seconds_per_step"]))
    # Its time guard (1.5 x the looped step time) may stop it early on a loaded machine; the summary says what ran.
    assert 1 <= summary["static"]["steps"] == len(_steps(out / "static-heal")) <= plan["steps"]
    static_cfg = yaml.safe_load((out / "static-heal" / "config.yaml").read_text())
    assert static_cfg["max_steps"] == plan["steps"]
    assert static_cfg["max_minutes"] == pytest.approx(max(0.2 * 1.2, 1.5 * seconds / 60))
    after = json.loads((out / "depths.json").read_text())["sets"]
    assert after["teacher_text"]["healed"] == before["teacher_text"]["healed"]  # not scored again
    assert "at **equal training minutes** (`--baseline_budget minutes`" in (out / "report.md").read_text()
