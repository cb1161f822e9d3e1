import json

import pytest
from conftest import make_tiny_model, make_tiny_tokenizer

from loopfit import gsm8k
from loopfit.convert import Layout, to_looped
from loopfit.errors import LoopfitError
from loopfit.gsm8k import (
    Problem,
    build_prompt,
    extract_flexible,
    extract_strict,
    truncate_at_stop,
    wilson_interval,
)

# text, strict, flexible
TRICKY = [
    ("Natalia sold 48 + 24 = 72 clips.\n#### 72", "72", "72"),
    ("#### 1,234", "1234", "1234"),
    ("#### $1,000,000 dollars", "1000000", "1000000"),
    ("The answer is $18.", None, "18"),
    ("She pays $18.00 in total.", None, "18"),
    ("#### -5", "-5", "-5"),
    ("The temperature drops to -12 degrees.", None, "-12"),
    ("x = -5", None, "-5"),
    ("He reads pages 3-5, so 5 - 3 = 2", None, "2"),
    ("#### 72\n\nQuestion: Tom has 3 apples", "72", "3"),  # untruncated few-shot continuation
    ("So 2.50 + 0.5 = 3.0.", None, "3"),
    ("It is 0.25 of the cake", None, "0.25"),
    ("1,23 and then 7", None, "7"),
    ("no numbers here", None, None),
    ("#### 42\nThe answer is 41", "42", "41"),
    ("####42", "42", "42"),
    ("It grows by 50%.", None, "50"),
    ("The answer is 1,000.", None, "1000"),
]


@pytest.mark.parametrize("text,strict,flexible", TRICKY)
def test_answer_extraction(text, strict, flexible):
    assert extract_strict(text) == strict
    assert extract_flexible(text) == flexible


def test_truncate_at_stop():
    assert truncate_at_stop("So 72.\n#### 72\n\nQuestion: next one 3") == "So 72.\n#### 72\n"
    assert extract_flexible(truncate_at_stop("#### 72\n\nQuestion: Tom has 3 apples")) == "72"
    assert truncate_at_stop("plain 5") == "plain 5"


def test_wilson_interval_known_values():
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.27754), abs=1e-5)
    assert wilson_interval(5, 10) == pytest.approx((0.23659, 0.76341), abs=1e-5)
    lo, hi = wilson_interval(81, 100)
    assert lo < 0.81 < hi and hi - lo < 0.17


def test_prompts_plain_and_chat():
    tok = make_tiny_tokenizer()
    shot = Problem("What is 2+3?", "2+3=<<2+3=5>>5\n#### 5")
    plain = build_prompt(tok, "What is 4+4?", [shot], chat=False, system=None)
    assert plain == "Question: What is 2+3?\nAnswer: 2+3=5\n#### 5\n\nQuestion: What is 4+4?\nAnswer:"
    chat = build_prompt(tok, "What is 4+4?", [shot], chat=True, system="Be brief.")
    assert chat.startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert chat.count("<|im_start|>user") == 2 and chat.count("<|im_start|>assistant") == 2
    assert chat.endswith("<|im_start|>assistant\n") and "<<" not in chat


def _write_problems(path, items):
    path.write_text("".join(json.dumps({"question": q, "answer": f"work\n#### {a}"}) + "\n" for q, a in items))


def test_scoring_counts_what_the_model_said(tmp_path, monkeypatch):
    problems = [Problem(f"q{i}", f"#### {i}") for i in range(4)]
    said = {"q0": "so #### 0", "q1": "it is 1", "q2": "#### 5 but 2", "q3": "nothing"}
    monkeypatch.setattr(gsm8k, "generate_batch", lambda m, t, prompts, *a: [said[p] for p in prompts])
    summary, records = gsm8k.evaluate_depth(None, None, problems, [p.question for p in problems], 4, 8, 3, False)
    assert summary["strict"]["correct"] == 1  # q0
    assert summary["flexible"]["correct"] == 3  # q0, q1, q2
    assert summary["flexible"]["ci95"] == pytest.approx(list(wilson_interval(3, 4)))
    assert [r["index"] for r in records] == [0, 1, 2, 3] and records[2]["output"] == "#### 5 but 2"


def test_gsm8k_command_end_to_end(tmp_path):
    from loopfit.cli import main

    src = make_tiny_model("llama", num_layers=4, hidden=32)
    folder = tmp_path / "looped"
    to_looped(src, Layout([0], [1, 2], [3]), adapter_init="random").save_pretrained(folder)
    make_tiny_tokenizer().save_pretrained(folder)
    test, train = tmp_path / "test.jsonl", tmp_path / "train.jsonl"
    _write_problems(test, [("What is 1+1?", 2), ("What is 2+2?", 4), ("What is 3+3?", 6)])
    _write_problems(train, [("What is 5+5?", 10), ("What is 1+1?", 2), ("What is 6+6?", 12)])
    out = tmp_path / "g.json"
    main(["gsm8k", str(folder), "--data", str(test), "--depths", "1,2", "--limit", "2", "--shots", "2",
          "--shots_file", str(train), "--chat=true", "--max_new_tokens", "5", "--batch_size", "2",
          "--json", str(out), "--plot", str(tmp_path / "g.png")])  # fmt: skip
    res = json.loads(out.read_text())
    assert res["depths"] == [1, 2] and res["n"] == 2 and len(res["ci95"]) == 2
    recs = [json.loads(line) for line in (tmp_path / "g.outputs.jsonl").read_text().splitlines()]
    assert len(recs) == 4 and {r["depth"] for r in recs} == {1, 2}
    for d, acc in zip(res["depths"], res["accuracy"]):
        assert acc == sum(r["correct_flexible"] for r in recs if r["depth"] == d) / 2
    assert (tmp_path / "g.png").read_bytes()[:4] == b"\x89PNG"
    # the shots exclude a train question that also appears in the test set
    with pytest.raises(LoopfitError, match="only 2 usable"):
        gsm8k.gsm8k_command(str(folder), data=str(test), shots=3, shots_file=str(train))
    with pytest.raises(LoopfitError, match="must not be the evaluated file"):
        gsm8k.gsm8k_command(str(folder), data=str(test), shots=1, shots_file=str(test))


@pytest.mark.parametrize("cache_mode", ["full", "compress"])
def test_batched_left_padded_generation_equals_one_at_a_time(cache_mode):
    src = make_tiny_model("llama", num_layers=4, hidden=32)
    lm = to_looped(src, Layout([0], [1, 2], [3]), adapter_init="random", cache_mode=cache_mode).eval()
    tok = make_tiny_tokenizer()
    prompts = ["Question: what is 2+2?\nAnswer:", "Hi", "Question: 7?"]
    batched = gsm8k.generate_batch(lm, tok, prompts, 3, 10, False)
    assert batched == [gsm8k.generate_batch(lm, tok, [p], 3, 10, False)[0] for p in prompts]
