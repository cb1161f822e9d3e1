import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import make_tiny_model, make_tiny_tokenizer

from loopfit.convert import Layout, to_looped

pytest.importorskip("lm_eval")

DOCS = [
    {"question": "The cat sat on the", "choices": ["mat", "moon", "dog"], "label": 0},
    {"question": "One, two,", "choices": ["three", "blue"], "label": 0},
    {"question": "Roses are red, violets are", "choices": ["green", "blue", "loud"], "label": 1},
]


@pytest.fixture
def task_setup(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    src = make_tiny_model("llama", num_layers=4, hidden=32)
    lm = to_looped(src, Layout([0], [1, 2], [3]), adapter_init="random", mean_recurrence=2).eval()
    model_dir = tmp_path / "looped"
    lm.save_pretrained(model_dir)
    tok = make_tiny_tokenizer()
    tok.save_pretrained(model_dir)
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny_mc.yaml").write_text(
        "task: tiny_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{label}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return lm, tok, model_dir, tasks


def _expected_loglikelihoods(lm, tok, depth):
    """Sum of log p(' choice' | question) at depth R, computed directly."""
    out = []
    with torch.no_grad():
        for d in DOCS:
            ctx = tok(d["question"])["input_ids"]
            row = []
            for c in d["choices"]:
                cont = tok(" " + c)["input_ids"]
                ids = torch.tensor([ctx + cont])
                logp = lm(ids, num_steps=depth).logits.log_softmax(-1)[0, :-1]
                row.append(sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont)))
            out.append(row)
    return out


def test_loopfit_model_type_runs_a_local_task_at_the_given_depth(task_setup):
    import lm_eval
    from lm_eval.tasks import TaskManager

    import loopfit.lm_eval_model  # noqa: F401  (registers `loopfit`)

    lm, tok, model_dir, tasks = task_setup
    for depth in (1, 3):
        res = lm_eval.simple_evaluate(
            model="loopfit",
            model_args=f"pretrained={model_dir},num_steps={depth}",
            tasks=["tiny_mc"],
            task_manager=TaskManager(include_path=str(tasks)),
            device="cpu",
            batch_size=2,
            log_samples=True,
        )
        samples = sorted(res["samples"]["tiny_mc"], key=lambda s: s["doc_id"])
        got = [[r[0][0] for r in s["resps"]] for s in samples]
        expected = _expected_loglikelihoods(lm, tok, depth)
        for g, e in zip(got, expected):
            assert g == pytest.approx(e, abs=1e-4)
        acc = sum(max(range(len(e)), key=e.__getitem__) == d["label"] for e, d in zip(expected, DOCS)) / len(DOCS)
        assert res["results"]["tiny_mc"]["acc,none"] == pytest.approx(acc)
    # the depth changes the scores (a random adapter makes every iteration matter)
    flat = [[x for row in _expected_loglikelihoods(lm, tok, r) for x in row] for r in (1, 3)]
    assert flat[0] != pytest.approx(flat[1], abs=1e-4)


def test_cli_wrapper(task_setup, tmp_path):
    _, _, model_dir, tasks = task_setup
    out = tmp_path / "results"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    cmd = [sys.executable, "-m", "loopfit.lm_eval_model", "--model", "loopfit",
           "--model_args", f"pretrained={model_dir},num_steps=2", "--tasks", "tiny_mc", "--include_path", str(tasks),
           "--device", "cpu", "--output_path", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = list(out.rglob("results_*.json"))
    assert results, proc.stdout[-2000:]
    data = json.loads(results[0].read_text())
    assert "acc,none" in data["results"]["tiny_mc"]
    assert data["config"]["model_args"]["num_steps"] == 2
