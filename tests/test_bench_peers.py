"""benchmarks/peers.py's summary of repeated runs: medians, spreads, per-repeat ratios and the loss comparison.

The runs are made up here (the real ones need the peers venv: `bash benchmarks/run_peers.sh`), so every number the
summary gives is known in advance."""

import pytest

from benchmarks.peers import compare, distillation_config, summarize


def _run(step_s, tokens=500, peak=2.0, train_peak=1.5, loss0=0.5, **extra):
    return {"step_s": step_s, "tokens_per_step": tokens, "peak_rss_gib": peak, "train_peak_rss_gib": train_peak,
            "loss0": loss0, **extra}  # fmt: skip


def test_summarize_median_and_spread():
    runs = [_run([1.0, 1.0], peak=2.0), _run([2.0, 3.0], peak=2.4), _run([0.5, 0.5], peak=1.9, loss0=0.5 + 1e-7)]
    row = summarize("loopfit_jsd", runs)
    # tokens/s per run: 500 * 2 / 2 = 500, 1000 / 5 = 200, 1000 / 1 = 1000
    assert [r["tokens_per_s"] for r in runs] == [500.0, 200.0, 1000.0]
    assert (row["tokens_per_s"], row["tokens_per_s_min"], row["tokens_per_s_max"]) == (500.0, 200.0, 1000.0)
    assert row["step_s"] == 1.0  # median of the mean step times 1.0, 2.5, 0.5
    assert (row["peak_rss_gib"], row["peak_rss_gib_min"], row["peak_rss_gib_max"]) == (2.0, 1.9, 2.4)
    assert row["train_peak_rss_gib"] == 1.5 and row["runs"] == 3 and row["loss0"] == 0.5
    assert row["loss0_max_dev"] == pytest.approx(1e-7)


def test_summarize_failed_run_is_an_error_row():
    row = summarize("trl_gkd", [_run([1.0]), {"error": "ImportError: no trl"}])
    assert row == {"system": "trl_gkd", "runs": 2, "error": "ImportError: no trl"}


def test_compare_ratios_of_medians_and_per_repeat_range():
    runs = {
        "loopfit_jsd": [_run([1.0], peak=2.0), _run([2.0], peak=2.0), _run([1.0], peak=2.0)],  # 500, 250, 500 tok/s
        "trl_gkd": [_run([4.0], peak=4.0, loss0=0.5005), _run([4.0], peak=5.0), _run([2.0], peak=4.0)],  # 125,125,250
    }
    by = {s: summarize(s, rs) for s, rs in runs.items()}
    meta = compare(by, runs)
    assert meta["speedup_vs_trl"] == pytest.approx(500 / 125)
    assert meta["speedup_vs_trl_range"] == pytest.approx([2.0, 4.0])  # 500/125, 250/125, 500/250
    assert meta["memory_ratio_vs_trl"] == pytest.approx(2.0 / 4.0)
    assert meta["memory_ratio_vs_trl_range"] == pytest.approx([0.4, 0.5])
    assert meta["jsd_loss_rel_diff_vs_trl"] == pytest.approx(0.0005 / 0.5005)
    assert not any(k.endswith("vs_torchtune") for k in meta)


def test_compare_torchtune_kl_subtracts_teacher_entropy():
    ours = [_run([1.0], ce0=5.75, kd0=4.415)]
    tt = [_run([1.0], ce0=5.75, kd0=5.5415, teacher_entropy=1.1265)]
    runs = {"loopfit_fkl": ours, "torchtune_fkl": tt}
    meta = compare({s: summarize(s, rs) for s, rs in runs.items()}, runs)
    assert meta["ce_rel_diff_vs_torchtune"] == 0.0
    assert meta["fkl_rel_diff_vs_torchtune"] == pytest.approx(0.0, abs=1e-12)
    assert meta["speedup_vs_torchtune"] == pytest.approx(1.0)


def test_loopfit_rows_run_the_peers_objectives():
    jsd, fkl = distillation_config("jsd"), distillation_config("fkl", chunk_size=256)
    assert (jsd.kind, jsd.kind_params, jsd.ce_scale, jsd.kd_scale, jsd.temperature) == ("jsd", {"beta": 0.5}, 0, 1, 1)
    assert (fkl.kind, fkl.ce_scale, fkl.kd_scale, fkl.temperature, fkl.chunk_size) == ("fkl", 0.5, 0.5, 1, 256)


def test_packed_batch_holds_the_shared_batch_records_and_scores_as_it():
    """loopfit's rows read the shared batch's records unpadded in one row with per-record positions; the live
    JSD objective on it equals the padded batch's (the loss the benchmark compares with TRL's)."""
    import torch
    from conftest import make_tiny_model, make_tiny_tokenizer

    from benchmarks.peers import packed_batch, shared_batch
    from loopfit.convert import Layout, to_static
    from loopfit.models.packed_attention import use_packed_attention
    from loopfit.train.student import Student, build_objective, objective_loss

    pairs = (("2+2?", "4, since 2+2=4."), ("Name a colour.", "Blue."), ("Why?", "Because."))
    records = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in pairs]
    padded = shared_batch(make_tiny_tokenizer(), records)
    packed = packed_batch(padded)
    lengths = padded["attention_mask"].sum(1).tolist()
    assert packed["input_ids"].shape == (1, sum(lengths))
    assert packed["input_ids"][0].tolist() == [t for row, n in zip(padded["input_ids"].tolist(), lengths)
                                               for t in row[:n]]  # fmt: skip
    assert packed["position_ids"][0].tolist() == [i for n in lengths for i in range(n)]
    assert (packed["labels"][packed["position_ids"] == 0] == -100).all()
    teacher = make_tiny_model("llama", num_layers=4, hidden=32)
    student = to_static(teacher, Layout([0], [2], [3])).train()
    objective = build_objective(distillation_config("jsd"), student, teacher)
    n = (padded["labels"][:, 1:] != -100).sum().float()
    want = objective_loss(objective, Student(student), teacher, padded, None, n)
    use_packed_attention(student), use_packed_attention(teacher)
    got = objective_loss(objective, Student(student), teacher, packed, None, n)
    assert float(want.kd) > 0
    torch.testing.assert_close(got.total, want.total, rtol=1e-5, atol=1e-6)


def _spawned(monkeypatch, tmp_path, systems, **flags) -> dict:
    """Each system's worker command and environment as `benchmarks.peers.spawn` would start them (the run itself
    faked to fail, so nothing starts), under the benchmark's flags with `flags` changed."""
    import subprocess
    import types

    import benchmarks.peers as peers

    seen = {}

    def fake_run(cmd, env, **kw):
        seen[cmd[cmd.index("--worker") + 1]] = (cmd, env)
        return subprocess.CompletedProcess(cmd, 1, stdout="no run here")

    monkeypatch.setattr(peers.subprocess, "run", fake_run)
    args = types.SimpleNamespace(**{**dict(data="d", batch_size=4, steps=1, warmup=0, loopfit_rows="packed",
                                           threads=None, chunk_size=None, precision="fp32",
                                           gradient_checkpointing=False, repeats=1, huge_pages="loopfit"),
                                    **flags})  # fmt: skip
    for system in systems:
        assert "error" in peers.spawn(system, "python", args, "student", tmp_path, 0)
    return seen


@pytest.mark.parametrize(
    "mode,want",
    [("loopfit", {"loopfit_jsd": None, "trl_gkd": "0"}), ("all", {"loopfit_jsd": "1", "trl_gkd": "1"}),
     ("none", {"loopfit_jsd": "0", "trl_gkd": "0"})],
)  # fmt: skip
def test_huge_pages_reach_each_system_as_asked(monkeypatch, tmp_path, mode, want):
    """`--huge_pages loopfit` leaves the variable unset for loopfit's rows (its worker sets it as the command does)
    and off for the peers, whatever the caller's environment holds; `all` / `none` set it for every system."""
    import benchmarks.peers as peers

    monkeypatch.setenv(peers.THP_ENV, "1")
    seen = _spawned(monkeypatch, tmp_path, want, huge_pages=mode)
    assert {system: env.get(peers.THP_ENV) for system, (cmd, env) in seen.items()} == want


def test_precision_reaches_every_system(monkeypatch, tmp_path):
    """`--precision bf16` is passed to every worker (loopfit's rows, TRL's and torchtune's), not to one of them."""
    import benchmarks.peers as peers

    seen = _spawned(monkeypatch, tmp_path, peers.SYSTEMS, precision="bf16")
    assert {system: cmd[cmd.index("--precision") + 1] for system, (cmd, env) in seen.items()} == dict.fromkeys(
        peers.SYSTEMS, "bf16"
    )
