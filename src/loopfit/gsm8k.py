"""GSM8K at each depth: batched greedy chain-of-thought generation, strict and flexible answer extraction.

Strict extraction reads the number after the first `#### ` (the dataset's own answer format, which the prompt asks
for); flexible extraction takes the last number in the output (what lm-eval's `flexible-extract` does). Both
normalise `$`, thousands separators and trailing periods, and compare numerically (`18.00` equals `18`).
Few-shot examples come from a separate train file (`--shots_file`), never from the evaluated file.
"""

from __future__ import annotations

import json as jsonlib
import math
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from loopfit.data.sources import read_documents
from loopfit.errors import LoopfitError, check_count, check_output
from loopfit.evaluate import parse_depths
from loopfit.io import atomic_file, write_json
from loopfit.loading import load_model, load_tokenizer
from loopfit.plotting import pyplot, save_png

INSTRUCTION = "Solve the problem step by step. End with the final answer on its own line as '#### <number>'."
STOP_STRINGS = ["\nQuestion:", "Question:", "<|im_end|>", "</s>"]
# A minus sign counts only where it cannot be a hyphen or an operator between numbers ("3-5" gives 3 and 5).
_NUMBER = r"(?:(?<![\w.)])-)?\$?\s?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
_STRICT = re.compile(r"####\s*(" + _NUMBER + ")")
_ANY = re.compile(_NUMBER)
_CALC = re.compile(r"<<[^>]*>>")


def normalize_number(text: str) -> str | None:
    """`'$1,234.50'` -> `'1234.5'`, `'-7'` -> `'-7'`, `'18.00'` -> `'18'`; None if not a number."""
    s = text.replace("$", "").replace(",", "").replace(" ", "").rstrip(".")
    try:
        value = float(s)
    except ValueError:
        return None
    if math.isfinite(value) and value == int(value):
        return str(int(value))
    return repr(value)


def extract_strict(text: str) -> str | None:
    """The number after the first `####`, normalised; None if there is none."""
    m = _STRICT.search(text)
    return normalize_number(m.group(1)) if m else None


def extract_flexible(text: str) -> str | None:
    """The last number in the text, normalised; None if there is none."""
    found = _ANY.findall(text)
    return normalize_number(found[-1]) if found else None


def truncate_at_stop(text: str) -> str:
    """Cut a continuation where the model starts a new few-shot question or emits an end marker."""
    cut = min((i for i in (text.find(s) for s in STOP_STRINGS) if i >= 0), default=len(text))
    return text[:cut]


def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    denom = 1 + z**2 / n
    centre = (p + z**2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z**2 / (4 * n**2)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass
class Problem:
    question: str
    answer: str
    """The reference solution (ends with `#### N`)."""

    @property
    def gold(self) -> str | None:
        return extract_strict(self.answer)


def read_problems(path: str, limit: int | None = None) -> list[Problem]:
    """GSM8K records (`question`, `answer`) from a JSONL/Parquet file or HF dataset folder."""

    problems = [Problem(d.prompt, d.response) for d in read_documents(path, format="gsm8k", limit=limit)]
    bad = [i for i, p in enumerate(problems) if p.gold is None]
    if bad:
        raise LoopfitError(f"{path}: record {bad[0]} has no '#### <number>' answer")
    return problems


def build_prompt(tokenizer, question: str, shots: list[Problem], chat: bool, system: str | None) -> str:
    """The prompt text: plain `Question:/Answer:` blocks, or chat turns with the shots as earlier turns."""
    clean = [(s.question, _CALC.sub("", s.answer)) for s in shots]
    if not chat:
        blocks = [f"Question: {q}\nAnswer: {a}\n\n" for q, a in clean]
        return "".join(blocks) + f"Question: {question}\nAnswer:"
    if not getattr(tokenizer, "chat_template", None):
        raise LoopfitError("--chat=true but the tokenizer has no chat template")
    messages = [{"role": "system", "content": system}] if system else []
    for q, a in clean:
        messages += [{"role": "user", "content": f"{q}\n{INSTRUCTION}"}, {"role": "assistant", "content": a}]
    messages.append({"role": "user", "content": f"{question}\n{INSTRUCTION}"})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@torch.inference_mode()
def generate_batch(model, tokenizer, prompts: list[str], depth: int | None, max_new_tokens: int, chat: bool) -> list:
    """Greedy continuations of a batch of prompts (left-padded), at depth `depth` for a looped model."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=not chat)
    kwargs = {"num_steps": depth} if depth is not None else {}
    eos = [t for t in {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")} if isinstance(t, int)]
    out = model.generate(
        **enc,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        temperature=None,
        top_p=None,
        top_k=None,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=eos or None,
        stop_strings=["Question:"],
        tokenizer=tokenizer,
        **kwargs,
    )
    return tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)


def evaluate_depth(model, tokenizer, problems, prompts, depth, max_new_tokens, batch_size, chat) -> tuple[dict, list]:
    """Accuracy (strict and flexible, with Wilson intervals) and per-question records at one depth."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths batch with less padding
    outputs: list[str] = [""] * len(prompts)
    start = time.perf_counter()
    for i in range(0, len(order), batch_size):
        idx = order[i : i + batch_size]
        for j, text in zip(
            idx, generate_batch(model, tokenizer, [prompts[k] for k in idx], depth, max_new_tokens, chat)
        ):
            outputs[j] = truncate_at_stop(text)
    seconds = time.perf_counter() - start
    records = []
    for k, (p, out) in enumerate(zip(problems, outputs)):
        strict, flexible = extract_strict(out), extract_flexible(out)
        records.append(
            dict(depth=depth, index=k, question=p.question, gold=p.gold, output=out, strict=strict,
                 flexible=flexible, correct_strict=strict == p.gold, correct_flexible=flexible == p.gold)
        )  # fmt: skip
    n = len(records)
    summary = {"n": n, "seconds": seconds}
    for kind in ("strict", "flexible"):
        c = sum(r[f"correct_{kind}"] for r in records)
        summary[kind] = {"accuracy": c / n, "correct": c, "ci95": list(wilson_interval(c, n))}
    return summary, records


def plot_accuracy(result: dict, path: str) -> None:
    """Accuracy against depth with 95% Wilson intervals; the baseline as a horizontal line."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 4))
    d, acc = result["depths"], result["accuracy"]
    lo = [a - c[0] for a, c in zip(acc, result["ci95"])]
    hi = [c[1] - a for a, c in zip(acc, result["ci95"])]
    ax.errorbar(d, acc, yerr=[lo, hi], fmt="o-", capsize=3, label=f"looped ({result['metric']})")
    if result.get("baseline_accuracy") is not None:
        ax.axhline(result["baseline_accuracy"], color="C3", ls="--", label="baseline")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("recurrence depth R")
    ax.set_ylabel("GSM8K accuracy")
    ax.set_title(f"GSM8K, {result['n']} questions, {result['shots']}-shot")
    ax.legend()
    save_png(fig, path)


def gsm8k_command(
    model: str,
    data: str | None = None,
    depths: list[int] | str | None = None,
    limit: int | None = None,
    shots: int = 0,
    shots_file: str | None = None,
    chat: bool = False,
    system: str | None = None,
    max_new_tokens: int = 256,
    batch_size: int = 8,
    metric: str = "flexible",
    baseline: str | None = None,
    json: str | None = None,
    plot: str | None = None,
    outputs: str | None = None,
    seed: int = 0,
) -> None:
    """GSM8K accuracy at each depth: greedy chain-of-thought generation, strict and flexible answer extraction.

    Args:
        model: looped (or plain) model: folder, hub id, .gguf file or `smollm2-135m`.
        data: GSM8K test records (JSONL/Parquet with `question` and `answer` ending in `#### N`).
        depths: loop depths to evaluate, e.g. `1,4,8` (the default); ignored for a plain model.
        limit: evaluate the first `limit` questions only.
        shots: number of worked examples in the prompt (taken from --shots_file).
        shots_file: GSM8K train records to draw the few-shot examples from (never the evaluated file).
        chat: use the tokenizer's chat template (shots become earlier turns).
        system: optional system prompt (with --chat=true).
        max_new_tokens: generation budget per question.
        batch_size: questions generated together (left-padded).
        metric: which extraction the headline `accuracy` uses: `flexible` (last number) or `strict` (`#### N`).
        baseline: a plain model evaluated once with the same prompts, reported as a reference line.
        json: write the per-depth accuracies here.
        plot: PNG of accuracy against depth.
        outputs: per-question outputs (JSONL); default: beside --json with the suffix `.outputs.jsonl`.
        seed: seeds the choice of few-shot examples.
    """

    if data is None:
        raise LoopfitError("--data is required")
    if metric not in ("flexible", "strict"):
        raise LoopfitError(f"--metric must be flexible or strict, got '{metric}'")
    check_count("shots", shots, 0)
    if shots > 0 and shots_file is None:
        raise LoopfitError("--shots > 0 needs --shots_file (GSM8K train records)")
    if shots_file is not None and Path(shots_file).resolve() == Path(data).resolve():
        raise LoopfitError("--shots_file must not be the evaluated file (few-shot examples would leak answers)")
    for flag, value in (("batch_size", batch_size), ("max_new_tokens", max_new_tokens), ("limit", limit)):
        check_count(flag, value)
    depths = parse_depths(depths, [1, 4, 8])
    if outputs is None and json is not None:
        outputs = str(Path(json).with_suffix(".outputs.jsonl"))
    for flag, path in (("json", json), ("plot", plot), ("outputs", outputs)):
        check_output(flag, path)
    problems = read_problems(data, limit)
    questions = {p.question.strip() for p in problems}
    pool = [p for p in read_problems(shots_file) if p.question.strip() not in questions] if shots else []
    if len(pool) < shots:
        raise LoopfitError(f"--shots {shots} but {shots_file} has only {len(pool)} usable examples")
    examples = random.Random(seed).sample(pool, shots)
    tok = load_tokenizer(model)
    prompts = [build_prompt(tok, p.question, examples, chat, system) for p in problems]
    lm = load_model(model).eval()
    looped = lm.config.model_type == "looped"
    result = {"model": model, "data": data, "n": len(problems), "shots": shots, "chat": chat, "metric": metric}
    result.update(depths=[], accuracy=[], ci95=[], per_depth=[])
    records: list[dict] = []
    for depth in depths if looped else [None]:
        summary, recs = evaluate_depth(lm, tok, problems, prompts, depth, max_new_tokens, batch_size, chat)
        records += recs
        result["depths"].append(depth if looped else 1)
        result["accuracy"].append(summary[metric]["accuracy"])
        result["ci95"].append(summary[metric]["ci95"])
        result["per_depth"].append(summary)
        print(f"R={depth}: strict {summary['strict']['accuracy']:.3f}  flexible {summary['flexible']['accuracy']:.3f}"
              f"  ({summary['n']} questions, {summary['seconds']:.0f} s)")  # fmt: skip
    result["baseline"], result["baseline_accuracy"] = baseline, None
    if baseline is not None:
        btok = load_tokenizer(baseline)
        bprompts = [build_prompt(btok, p.question, examples, chat, system) for p in problems]
        bmodel = load_model(baseline).eval()
        summary, recs = evaluate_depth(bmodel, btok, problems, bprompts, None, max_new_tokens, batch_size, chat)
        records += [dict(r, depth="baseline") for r in recs]
        result["baseline_accuracy"] = summary[metric]["accuracy"]
        result["baseline_summary"] = summary
        print(f"baseline: {metric} {summary[metric]['accuracy']:.3f}")
    if outputs is not None:
        with atomic_file(outputs) as f:
            f.writelines(jsonlib.dumps(r) + "\n" for r in records)
    if json is not None:
        write_json(json, result)
    if plot is not None:
        plot_accuracy(result, plot)
