"""Adaptive exit on a looped model: mean iterations, loss change and speed per criterion and threshold (batch 1).

    python -m benchmarks.adaptive_exit --model runs/heal [--data FILE] [--tokens 128] [--max_num_steps 16]
    python -m benchmarks.adaptive_exit --model smollm2-135m --layout 4-6-4 --adapter_init average

Scores `--tokens` tokens of held-out text teacher-forced, one token at a time with the KV cache (the decoding
path), after a `--prefix`-token prompt. Each row: criterion, threshold, mean iterations per token, mean NLL, its
change against the fixed depth `--max_num_steps`, and tokens/s.
Writes benchmarks/results/adaptive_exit_{full,compress}.json.
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import report
from loopfit.adaptive import ExitConfig, score_adaptive
from loopfit.loading import load_model, load_tokenizer

GRID = "kl:1e-4,kl:5e-4,kl:1e-3,kl:1e-2,state:0.01,state:0.03,state:0.1,argmax:2,argmax:5"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="a looped model folder, or a plain model to convert")
    ap.add_argument("--layout", default="4-6-4", help="prelude-block-coda sizes when converting a plain model")
    ap.add_argument("--adapter_init", default="average", help="adapter init when converting a plain model")
    ap.add_argument("--data", default="../shared/data/text/tinyshakespeare.txt")
    ap.add_argument("--offset", type=float, default=0.9, help="start of the scored text (fraction of the file)")
    ap.add_argument("--prefix", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--max_num_steps", type=int, default=16)
    ap.add_argument("--cache_mode", default=None, choices=[None, "full", "compress"])
    ap.add_argument("--runs", default=GRID, help="criterion:threshold pairs, comma-separated")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model).eval()
    tok = load_tokenizer(args.model)
    if model.config.model_type != "looped":
        from loopfit.convert import layout_from_sizes, to_looped

        p, b, c = map(int, args.layout.split("-"))
        layout = layout_from_sizes(model.config.num_hidden_layers, p, b, c)
        model = to_looped(model, layout, adapter_init=args.adapter_init).eval()
    if args.cache_mode:
        model.config.cache_mode = args.cache_mode
    text = open(args.data, encoding="utf-8").read()
    text = text[int(args.offset * len(text)) :]
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"][: args.prefix + args.tokens]])
    runs = [("none", None)] + [(c, float(t)) for c, t in (r.split(":") for r in args.runs.split(","))]
    rows, base_nll = [], None
    for criterion, thr in runs:
        t0 = time.perf_counter()
        out = score_adaptive(model, ids, args.prefix, ExitConfig(criterion, thr, max_num_steps=args.max_num_steps))
        dt = time.perf_counter() - t0
        nll = -sum(out.logprobs) / len(out.logprobs)
        base_nll = nll if base_nll is None else base_nll
        rows.append(
            dict(criterion=criterion, threshold=thr, mean_iterations=out.mean_iterations, nll=nll,
                 delta_nll=nll - base_nll, tokens_per_s=len(out.logprobs) / dt)
        )  # fmt: skip
        print(rows[-1], flush=True)
    meta = dict(vars(args), cache_mode=model.config.cache_mode, layout=model.config.layout)
    report(f"adaptive_exit_{model.config.cache_mode}", rows, meta)


if __name__ == "__main__":
    main()
