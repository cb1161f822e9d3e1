"""benchmarks/plot_yardsticks.py: reading result files into curves, its one-line errors, and the figure itself."""

import json

import pytest
import torch

from benchmarks.heal_yardsticks import split_blank_lines
from benchmarks.plot_yardsticks import DEFAULT_SERIES, RESULTS, load_series, plot


def _write(path, rows):
    path.write_text(json.dumps({"benchmark": "heal_yardsticks", "meta": {}, "rows": rows}))
    return path


LOOP = [
    {"model": "loop", "yardstick": "shakespeare", "tokens": 10, "R=1": 4.2, "R=6": 3.9, "R=24": 3.95},
    {"model": "loop", "yardstick": "gsm8k", "tokens": 5, "R=1": 4.0, "R=6": 4.5, "R=24": 4.6},
    {"model": "static", "yardstick": "shakespeare", "tokens": 10, "R=1": 3.94},
]


def test_load_series_reads_the_named_model_at_every_depth(tmp_path):
    path = _write(tmp_path / "r.json", LOOP)
    label, curves, looped = load_series(f"my loop={path}#loop", tmp_path)
    assert label == "my loop" and looped
    assert curves == {"shakespeare": {1: 4.2, 6: 3.9, 24: 3.95}, "gsm8k": {1: 4.0, 6: 4.5, 24: 4.6}}
    # A file name alone is looked up in the results folder; a label may hold '=' signs ("T = 1").
    label, curves, looped = load_series("static, T = 1=r.json#static", tmp_path)
    assert label == "static, T = 1" and curves == {"shakespeare": {1: 3.94}} and not looped


def test_looped_comes_from_the_rows_not_the_label(tmp_path):
    rows = [
        {"model": "a", "looped": False, "yardstick": "shakespeare", "tokens": 10, "R=1": 3.9},
        {"model": "b", "looped": True, "yardstick": "shakespeare", "tokens": 10, "R=1": 4.1},
    ]
    _write(tmp_path / "f.json", rows)
    assert load_series("the pruned model=f.json#a", tmp_path)[2] is False  # static, though the label does not say
    assert load_series("static-shaped label=f.json#b", tmp_path)[2] is True  # looped, scored at R = 1 alone


@pytest.mark.parametrize(
    "spec, message",
    [
        ("no-equals-sign", "is not LABEL=FILE"),
        ("x=missing.json", "no result file missing.json"),
        ("x=r.json", "holds several models ['loop', 'static']"),
        ("x=r.json#other", "holds no model 'other'"),
    ],
)
def test_load_series_refuses_bad_specs_in_one_line(tmp_path, spec, message):
    _write(tmp_path / "r.json", LOOP)
    with pytest.raises(SystemExit) as e:
        load_series(spec, tmp_path)
    assert str(e.value).startswith("loopfit: error: ") and message in str(e.value) and "\n" not in str(e.value)


def test_default_series_are_all_committed_results():
    series = [load_series(s, RESULTS) for s in DEFAULT_SERIES]
    assert all("shakespeare" in curves and "gsm8k" in curves for _, curves, _ in series)
    assert [label for label, _, looped in series if not looped] == [
        "static model, 573 steps, bf16",
        "static model at 1.5x the steps (860), bf16",
        "its static model, 957 steps, seed 0",
        "its static model, seed 1",
        "its static model, seed 2",
    ]


def test_plot_writes_a_png(tmp_path):
    out = tmp_path / "img" / "y.png"
    plot([load_series(f"loop={_write(tmp_path / 'r.json', LOOP)}#loop", tmp_path)], out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in out.parent.iterdir()] == ["y.png"]  # no temporary file left beside it


def test_split_blank_lines_puts_every_label_in_one_part():
    nl = 9
    ids = torch.tensor([[5, nl, nl, 6, nl, 7], [nl, nl, nl, 8, 8, nl]])
    labels = ids.clone()
    labels[1, 5] = -100  # padding stays out of both parts
    (blank,), (rest,) = split_blank_lines([{"input_ids": ids, "labels": labels}], nl)
    assert blank["labels"].tolist() == [[-100, nl, nl, -100, -100, -100], [nl, nl, nl, -100, -100, -100]]
    assert rest["labels"].tolist() == [[5, -100, -100, 6, nl, 7], [-100, -100, -100, 8, 8, -100]]
    assert torch.equal(blank["input_ids"], ids) and torch.equal(rest["input_ids"], ids)
