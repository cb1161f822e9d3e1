"""`loopfit sweep` on a tiny looped model: grid, run folders, sweep.json, figures, skip/resume, budget planning."""

from __future__ import annotations

import json
import math

import pytest
import yaml
from conftest import write_teacher_and_looped_student

from loopfit.cli import main
from loopfit.errors import LoopfitError
from loopfit.flops import flop_params, training_flops
from loopfit.loading import load_model
from loopfit.sweep.budget import Probe, flops_per_run, plan_flops_steps, plan_steps
from loopfit.sweep.grid import build_runs, load_config, parse_grid, run_name, split_values
from loopfit.sweep.plots import pareto_front
from loopfit.train.schedules import DepthSchedule
from loopfit.train.student import apply_lora

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A base config YAML: tiny looped student, its source as teacher, LoRA + KD, a held-out split."""
    root = write_teacher_and_looped_student(tmp_path_factory.mktemp("sweep"))
    cfg = {
        "model_name": str(root / "looped"),
        "data": str(root / "data.txt"),
        "seq_len": 32,
        "batch_size": 4,
        "max_steps": 3,
        "val_fraction": 0.2,
        "fixed_num_steps": 2,
        "progress_bar": False,
        "tensorboard": False,
        "lora": {"enabled": True, "r": 4},
        "distillation": {"enabled": True, "teacher_model_name": str(root / "teacher")},
        "optim_config": {"lr": 1e-3},
    }
    (root / "base.yaml").write_text(yaml.safe_dump(cfg))
    return root


def test_grid_parsing(base, tmp_path):
    assert split_values("0.1, 0.3,0.5") == ["0.1", "0.3", "0.5"]
    assert split_values("[q_proj,v_proj],all-linear") == ["[q_proj,v_proj]", "all-linear"]
    assert parse_grid(["distillation.alpha=0.1,0.5", "--lora.r=4"]) == [
        ("distillation.alpha", ["0.1", "0.5"]),
        ("lora.r", ["4"]),
    ]
    for bad, msg in (("lora.r", "KEY=V1"), ("lora.r=4,,8", "empty entry"), ("max_steps=4", "sets it")):
        with pytest.raises(LoopfitError, match=msg):
            parse_grid([bad])
    with pytest.raises(LoopfitError, match="given twice"):
        parse_grid(["lora.r=4", "lora.r=8"])
    # Overrides are typed like `loopfit train` flags, on top of the YAML.
    base_dict = yaml.safe_load((base / "base.yaml").read_text())
    cfg = load_config(base_dict, {"lora.r": "16", "distillation.kd_scale": "2"})
    assert cfg.lora.r == 16 and cfg.lora.enabled and cfg.distillation.kd_scale == 2.0 and cfg.max_steps == 3
    # The old key `distillation.alpha` still works as an axis: it sets both weights.
    cfg = load_config(base_dict, {"distillation.alpha": "0.25"})
    assert (cfg.distillation.ce_scale, cfg.distillation.kd_scale) == (0.25, 0.75)
    for bad in ({"lora.rank": "4"}, {"lora.r": "four"}):
        with pytest.raises(LoopfitError, match="bad --grid override"):
            load_config(base_dict, bad)
    assert run_name({"distillation.alpha": "0.1", "model_name": "runs/smol-4-6-4/"}) == (
        "distillation.alpha-0.1_model_name-runs_smol-4-6-4"
    )
    runs = build_runs(base_dict, ["distillation.alpha=0.1,0.9", "lora.r=2,8"], tmp_path)
    assert [(r.cfg.distillation.ce_scale, r.cfg.lora.r) for r in runs] == [(0.1, 2), (0.1, 8), (0.9, 2), (0.9, 8)]
    assert len({r.cfg.out for r in runs}) == 4
    # Invalid grid points are refused before any training.
    with pytest.raises(LoopfitError, match=r"alpha must be a number in \[0, 1\]"):
        build_runs(base_dict, ["distillation.alpha=0.5,1.5"], tmp_path)


def test_sweep_grid_runs_skips_and_plots(base, tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = ["sweep", "--config", str(base / "base.yaml"), "--grid", "distillation.alpha=0.1,0.9",
            "--grid", "lora.r=2,8", "--out", str(out), "--depth", "3"]  # fmt: skip
    main(argv)
    result = json.loads((out / "sweep.json").read_text())
    assert result["grid"] == {"distillation.alpha": ["0.1", "0.9"], "lora.r": ["2", "8"]}
    entries = result["runs"]
    assert len(entries) == 4 and {e["status"] for e in entries} == {"done"}
    for e in entries:
        folder = out / e["name"]
        assert (folder / "done.json").is_file() and (folder / "final").is_dir()
        done = json.loads((folder / "done.json").read_text())
        assert e["steps"] == 3 and math.isfinite(e["metric"]) and e["metric"] > 0
        # The metric is the trainer's own final validation at the asked depth (besides the training depth 2).
        assert e["metric"] == done["val_loss"]["3"] and set(done["val_loss"]) == {"2", "3"}
        stored = yaml.safe_load((folder / "config.yaml").read_text())
        assert stored["distillation"]["ce_scale"] == float(e["overrides"]["distillation.alpha"])
        assert "alpha" not in stored["distillation"]
        assert stored["lora"]["r"] == int(e["overrides"]["lora.r"])
        assert e["train_seconds"] > 0
    # Different hyper-parameters train differently.
    assert len({round(e["metric"], 6) for e in entries}) == 4
    assert result["best"] == min(entries, key=lambda e: e["metric"])["name"]
    for png in ("val_loss_vs_distillation.alpha.png", "val_loss_vs_lora.r.png", "curves.png", "pareto.png"):
        assert (out / png).stat().st_size > 1000, png
    # Rerunning skips every finished run: nothing in the run folders changes.
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/**/*") if p.is_file()}
    capsys.readouterr()
    main(argv)
    assert "finished before, skipped" in capsys.readouterr().err
    assert stamps == {p: p.stat().st_mtime_ns for p in out.glob("*/**/*") if p.is_file()}
    assert json.loads((out / "sweep.json").read_text())["runs"] == entries
    # A changed base config is not silently mixed with the old runs.
    changed = yaml.safe_load((base / "base.yaml").read_text()) | {"seq_len": 16}
    (tmp_path / "changed.yaml").write_text(yaml.safe_dump(changed))
    with pytest.raises(SystemExit):
        main(["sweep", "--config", str(tmp_path / "changed.yaml")] + argv[3:])
    assert "was trained with seq_len=32" in capsys.readouterr().err


def test_sweep_resumes_an_interrupted_run(base, tmp_path):
    """A run killed after its checkpoint is resumed by the sweep and ends like an uninterrupted one."""
    from loopfit.train.recipe import fit, setup

    out = tmp_path / "sweep"
    argv = ["sweep", "--config", str(base / "base.yaml"), "--grid", "lora.r=2", "--out", str(out), "--max_steps", "4"]
    main(argv)
    # Same run, interrupted after step 3 (the sweep checkpoints every max_steps // 4 = 1 steps).
    cfg = build_runs(yaml.safe_load((base / "base.yaml").read_text()), ["lora.r=2"], tmp_path / "b")[0].cfg
    cfg.max_steps, cfg.save_every, cfg.eval_num_steps = 4, 1, [2]
    run = setup(cfg)
    fit(run, until=3)
    run.logger.close()
    assert not (tmp_path / "b" / "lora.r-2" / "done.json").exists()
    main(argv[:-4] + ["--out", str(tmp_path / "b"), "--max_steps", "4"])
    a, b = (_losses(o / "lora.r-2") for o in (out, tmp_path / "b"))
    assert len(a) == 4 and a == b
    ea, eb = (json.loads((o / "sweep.json").read_text())["runs"][0] for o in (out, tmp_path / "b"))
    assert ea["metric"] == eb["metric"] and ea["steps"] == eb["steps"] == 4


def _losses(run_dir) -> list[float]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [x["loss"] for x in lines if "loss" in x]


def test_budget_planning_numbers():
    from loopfit.flops import train_flops_per_token

    fp = {"prelude": 10, "block": 20, "coda": 30, "head": 5, "teacher": 100, "teacher_head": 5}
    # 6·(P + k·B + C + head) + 2·n·B + 2·(teacher + head): the head's weight gradient counts (6·head, not 4·head)
    assert train_flops_per_token(fp, 2, 3, teacher=True) == 6 * (10 + 60 + 30 + 5) + 2 * 40 + 2 * 105
    assert train_flops_per_token({"prelude": 10, "head": 5}, 0, 0) == 6 * 10 + 6 * 5  # a plain model: layers = prelude
    p = Probe(setup_s=2.0, validate_s=3.0, flops_per_s=100.0, step_flops=50.0)  # 0.5 s per step
    assert plan_steps(60.0, p, overhead_s=5.0, cap=None) == 110
    assert plan_steps(60.0, p, overhead_s=5.0, cap=20) == 20
    assert plan_steps(1.0, p, overhead_s=5.0, cap=None) == 1  # an exhausted budget still trains one step


def test_expected_depths_follow_the_trainer_draws():
    """The expected (n, k) that the budget averages over a curriculum match the mean of the trainer's seeded draws."""
    from loopfit.train import MeanRecurrenceSchedule, TrainConfig

    cfg = TrainConfig(backprop_depth=3, max_steps=2000)
    cfg.mean_recurrence_schedule = MeanRecurrenceSchedule(turn_on=True, warmup=0.5, max_mean_rec=6)
    sched = DepthSchedule.from_config(cfg, model_mean=1)
    draws = [sched.draw(s) for s in range(2000)]
    steps = sched.midpoints(200)
    exp_k = [sched.gradient_depth_at(s) for s in steps]
    exp = [[sched.expected_depth_at(s) - k for s, k in zip(steps, exp_k)], exp_k]
    for i in (0, 1):
        drawn = sum(d[i] for d in draws) / len(draws)
        expected = sum(exp[i]) / len(exp[i])
        assert abs(drawn - expected) < 0.05 * max(drawn, 1.0), (i, drawn, expected)
    fixed = DepthSchedule.from_config(TrainConfig(fixed_num_steps=3), model_mean=1)
    assert (fixed.expected_depth_at(0.5), fixed.gradient_depth_at(0.5)) == (3.0, 3.0)


def test_sweep_with_budget(base, tmp_path):
    """With a budget, each run's steps come from a timing probe (here capped), the probe folder is removed."""
    out = tmp_path / "sweep"
    main(["sweep", "--config", str(base / "base.yaml"), "--grid", "distillation.alpha=0.2,0.8", "--out", str(out),
          "--budget_minutes", "0.5", "--budget_max_steps", "5", "--probe_steps", "2"])  # fmt: skip
    entries = json.loads((out / "sweep.json").read_text())["runs"]
    assert [e["status"] for e in entries] == ["done", "done"]
    assert all(1 <= e["steps"] <= 5 and math.isfinite(e["metric"]) for e in entries)
    assert not list(out.glob(".probe-*"))
    # A budget already spent by the probe still trains (one step per run) instead of failing.
    main(["sweep", "--config", str(base / "base.yaml"), "--grid", "lora.r=2", "--out", str(tmp_path / "spent"),
          "--budget_minutes", "0.0001", "--probe_steps", "1"])  # fmt: skip
    entry = json.loads((tmp_path / "spent" / "sweep.json").read_text())["runs"][0]
    assert entry["status"] == "done" and entry["steps"] == 1


def test_pareto_front():
    pts = [(1.0, 5.0), (2.0, 4.0), (3.0, 4.5), (4.0, 3.0), (2.5, 6.0)]
    assert pareto_front(pts, lower_is_better=True) == [0, 1, 3]
    assert pareto_front(pts, lower_is_better=False) == [0, 4]


def test_sweep_errors(base, tmp_path, capsys):
    cases = [
        (["--config", str(base / "base.yaml")], "--grid is required"),
        (["--config", str(base / "base.yaml"), "--grid", "lora.r=2", "--metric", "bleu"], "--metric must be"),
        (["--config", str(base / "base.yaml"), "--grid", "lora.r=2", "--metric", "gsm8k"], "needs --gsm8k_data"),
        (["--config", str(base / "base.yaml"), "--grid", "val_fraction=0.0"], "needs validation data"),
        (["--config", str(base / "base.yaml"), "--grid", "lora.r=2", "--budget_minutes", "0"], "must be > 0"),
    ]
    for args, msg in cases:
        with pytest.raises(SystemExit) as e:
            main(["sweep", "--out", str(tmp_path / "s")] + args)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err, err
    assert not (tmp_path / "s").exists()


def test_sweep_gsm8k_metric(base, tmp_path):
    """`--metric gsm8k`: zero-shot accuracy of each trained run at the depth, cached in the run folder."""
    problems = tmp_path / "gsm8k.jsonl"
    problems.write_text(
        "\n".join(
            json.dumps({"question": f"What is {i} + 1?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"})
            for i in range(3)
        )  # fmt: skip
    )
    out = tmp_path / "sweep"
    argv = ["sweep", "--config", str(base / "base.yaml"), "--grid", "lora.r=2", "--out", str(out), "--max_steps", "2",
            "--metric", "gsm8k", "--gsm8k_data", str(problems), "--gsm8k_limit", "2", "--gsm8k_max_new_tokens", "3",
            "--depth", "1"]  # fmt: skip
    main(argv)
    entry = json.loads((out / "sweep.json").read_text())["runs"][0]
    cache = json.loads((out / "lora.r-2" / "sweep_gsm8k.json").read_text())
    assert cache["key"]["depth"] == 1 and cache["summary"]["n"] == 2
    assert entry["metric"] == cache["summary"]["flexible"]["accuracy"] and 0.0 <= entry["metric"] <= 1.0
    assert (out / "gsm8k_vs_lora.r.png").is_file()
    stamp = (out / "lora.r-2" / "sweep_gsm8k.json").stat().st_mtime_ns
    main(argv)  # finished and measured: nothing is generated again
    assert (out / "lora.r-2" / "sweep_gsm8k.json").stat().st_mtime_ns == stamp


def _static_vs_looped_base(base, tmp_path):
    """The base config for a looped-vs-static grid: no recurrence option a plain model refuses (sampled depths)."""
    cfg = yaml.safe_load((base / "base.yaml").read_text())
    cfg.pop("fixed_num_steps")
    cfg["mean_recurrence"] = 6
    cfg["distillation"] = {"enabled": False}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(cfg))
    return tmp_path / "base.yaml"


def _step_flops(cfg_path, model_name):
    """Expected training FLOPs of one step, computed here from the one count and the one depth schedule."""
    base = yaml.safe_load(cfg_path.read_text())
    cfg = load_config(base, {"model_name": model_name})
    model = load_model(model_name)
    looped = model.config.model_type == "looped"
    model = apply_lora(model, cfg.lora)  # the adapters' weights count too
    sched = DepthSchedule.from_config(cfg, model.config.mean_recurrence) if looped else None
    tokens = cfg.batch_size * cfg.seq_len
    return training_flops(flop_params(model), tokens, sched, 200, seq_len=cfg.seq_len)["flops"]


def test_sweep_at_equal_training_flops(base, tmp_path, capsys):
    """`--budget_kind flops`: the looped student and its static source train the same expected FLOPs (the one FLOP
    count over the one depth schedule): the cheaper static model takes more steps, and sweep.json says so."""
    base_yaml = _static_vs_looped_base(base, tmp_path)
    looped, static = str(base / "looped"), str(base / "teacher")
    per_step = {looped: _step_flops(base_yaml, looped), static: _step_flops(base_yaml, static)}
    assert per_step[looped] > 1.3 * per_step[static]
    budget = 4.5 * per_step[looped]
    out = tmp_path / "sweep"
    argv = ["sweep", "--config", str(base_yaml), "--grid", f"model_name={looped},{static}", "--out", str(out),
            "--budget_kind", "flops", "--budget_flops", str(budget), "--probe_steps", "1"]  # fmt: skip
    capsys.readouterr()
    main(argv)
    result = json.loads((out / "sweep.json").read_text())
    assert result["budget_kind"] == "flops" and result["budget_flops_per_run"] == pytest.approx(budget)
    steps = {}
    for e in result["runs"]:
        model = e["overrides"]["model_name"]
        steps[model] = e["steps"]
        assert e["steps"] == math.floor(budget / per_step[model])
        assert e["train_flops"] == pytest.approx(e["steps"] * per_step[model], rel=1e-6)
        assert budget - per_step[model] < e["train_flops"] <= budget
    assert steps[looped] == 4 and steps[static] > steps[looped]
    assert "budget: equal training FLOPs" in capsys.readouterr().out
    # Sized from minutes instead: every run still gets the same FLOPs (within one step), fixed in budget.json.
    out2 = tmp_path / "sweep2"
    main(["sweep", "--config", str(base_yaml), "--grid", f"model_name={looped},{static}", "--out", str(out2),
          "--budget_kind", "flops", "--budget_minutes", "0.3", "--budget_max_steps", "6",
          "--probe_steps", "1"])  # fmt: skip
    result = json.loads((out2 / "sweep.json").read_text())
    flops = result["budget_flops_per_run"]
    assert result["budget_kind"] == "flops" and flops > 0
    assert json.loads((out2 / "budget.json").read_text())["flops_per_run"] == flops
    for e in result["runs"]:
        model = e["overrides"]["model_name"]
        assert e["steps"] == min(6, max(1, math.floor(flops / per_step[model])))
    # The default kind records itself and each run's FLOPs too.
    out3 = tmp_path / "sweep3"
    main(["sweep", "--config", str(base_yaml), "--grid", f"model_name={static}", "--out", str(out3),
          "--budget_minutes", "0.05", "--budget_max_steps", "2", "--probe_steps", "1"])  # fmt: skip
    result = json.loads((out3 / "sweep.json").read_text())
    assert result["budget_kind"] == "minutes"
    assert result["runs"][0]["train_flops"] == pytest.approx(result["runs"][0]["steps"] * per_step[static], rel=1e-6)
    # A folder planned with one kind is not resumed with the other.
    with pytest.raises(SystemExit):
        main(argv[:-6] + ["--budget_kind", "minutes", "--budget_minutes", "1"])
    assert "planned with --budget_kind flops" in capsys.readouterr().err


def test_budget_kind_errors(base, tmp_path, capsys):
    cases = [
        (["--budget_kind", "joules"], "--budget_kind must be one of minutes, flops"),
        (["--budget_flops", "1e9"], "--budget_flops needs --budget_kind flops"),
        (["--budget_kind", "flops"], "needs exactly one of --budget_flops"),
        (["--budget_kind", "flops", "--budget_flops", "1e9", "--budget_minutes", "1"], "needs exactly one of"),
        (["--budget_kind", "flops", "--budget_flops", "-1"], "--budget_flops must be a finite number > 0"),
    ]
    for args, msg in cases:
        with pytest.raises(SystemExit) as e:
            main(["sweep", "--config", str(base / "base.yaml"), "--grid", "lora.r=2", "--out", str(tmp_path / "s")]
                 + args)  # fmt: skip
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err, err
    assert not (tmp_path / "s").exists()


def test_flops_per_run_fits_the_minutes():
    fast = Probe(1.0, 1.0, flops_per_s=200.0, step_flops=10.0)
    slow = Probe(1.0, 1.0, flops_per_s=100.0, step_flops=40.0)
    f = flops_per_run(64.0, [fast, slow], [2.0, 2.0])  # 60 s of training: F / 200 + F / 100 = 60
    assert f == pytest.approx(4000.0)
    assert plan_flops_steps(f, fast, None) == 400 and plan_flops_steps(f, slow, None) == 100
    assert plan_flops_steps(f, slow, 50) == 50 and plan_flops_steps(1.0, slow, None) == 1
    assert flops_per_run(1.0, [fast], [2.0]) == 0.0
