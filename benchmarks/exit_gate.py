"""The learned exit gate against the kl, state and argmax criteria on one model: iterations saved at equal loss, and
tokens/s at batch 1.

    python -m benchmarks.exit_gate --model RUN/final [--data FILE] [--offset 0.9] [--tokens 128] [--max_num_steps 4]

`--model` is a looped folder with an exit gate (`loopfit train --exit_gate.train=true`, docs/evaluation.md). Scores
`--tokens` tokens of held-out text teacher-forced, one token at a time with the KV cache (the decoding path of
`score_adaptive`), after a `--prefix`-token prompt, for the fixed depths 1..`--max_num_steps` and for each
criterion over its threshold grid. Per criterion, the summary row is the grid point with the fewest mean iterations
whose NLL is within `--tolerance` (relative, default +0.5%) of the fixed depth `--max_num_steps`: iterations saved
= max_num_steps - its mean iterations, and its tokens/s (wall clock, batch 1, this machine). The fixed depths are
a criterion too (`fixed`): a loop that does better with fewer iterations everywhere is better served by a smaller
R than by any exit rule. Writes benchmarks/results/exit_gate.json.
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import report
from loopfit.adaptive import ExitConfig, score_adaptive
from loopfit.loading import load_model, load_tokenizer

GRIDS = {
    "gate": (0.1, 0.3, 0.5, 0.7, 0.9, 0.97),
    "kl": (1e-4, 1e-3, 1e-2, 1e-1, 0.3),
    "state": (0.01, 0.03, 0.1, 0.3),
    "argmax": (1, 2, 3),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a looped model folder with an exit gate")
    ap.add_argument("--data", default="../shared/data/text/tinyshakespeare.txt")
    ap.add_argument("--offset", type=float, default=0.9, help="start of the scored text (fraction of the file)")
    ap.add_argument("--prefix", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--max_num_steps", type=int, default=4)
    ap.add_argument("--tolerance", type=float, default=0.005, help="relative NLL increase counted as equal loss")
    ap.add_argument("--criteria", default=",".join(GRIDS), help="comma-separated subset of " + ",".join(GRIDS))
    ap.add_argument("--grid", default="", help="thresholds replacing the default grids, e.g. 'gate:0.5,0.9 kl:1e-2'")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--name", default="exit_gate", help="results file name")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model).eval()
    tok = load_tokenizer(args.model)
    text = open(args.data, encoding="utf-8").read()
    text = text[int(args.offset * len(text)) :]
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"][: args.prefix + args.tokens]])
    score_adaptive(model, ids[:, : args.prefix + 8], args.prefix, ExitConfig("none", max_num_steps=1))  # warm-up
    R = args.max_num_steps
    grids = dict(GRIDS) | {c: tuple(map(float, t.split(","))) for c, t in (g.split(":") for g in args.grid.split())}
    runs = [("fixed", r, ExitConfig("none", max_num_steps=r)) for r in range(1, R + 1)]
    runs += [(c, t, ExitConfig(c, t, max_num_steps=R)) for c in args.criteria.split(",") for t in grids[c]]
    rows = []
    for criterion, thr, exit in runs:
        t0 = time.perf_counter()
        out = score_adaptive(model, ids, args.prefix, exit)
        dt = time.perf_counter() - t0
        nll = -sum(out.logprobs) / len(out.logprobs)
        rows.append(dict(criterion=criterion, threshold=thr, mean_iterations=out.mean_iterations, nll=nll,
                         tokens_per_s=len(out.logprobs) / dt))  # fmt: skip
        print(rows[-1], flush=True)
    base = next(r["nll"] for r in rows if r["criterion"] == "fixed" and r["threshold"] == R)
    for r in rows:
        r["delta_nll"] = r["nll"] - base
        r["rel_delta_nll"] = r["nll"] / base - 1
    summary = []
    for criterion in dict.fromkeys(r["criterion"] for r in rows):
        ok = [r for r in rows if r["criterion"] == criterion and r["rel_delta_nll"] <= args.tolerance]
        best = min(ok, key=lambda r: (r["mean_iterations"], r["nll"]), default=None)
        if best is None:
            summary.append(dict(criterion=criterion, threshold=None, iterations_saved=None))
            continue
        keep = ("threshold", "mean_iterations", "nll", "rel_delta_nll", "tokens_per_s")
        summary.append(dict(criterion=criterion, iterations_saved=R - best["mean_iterations"],
                            **{k: best[k] for k in keep}))  # fmt: skip
    meta = dict(vars(args), layout=model.config.layout, gate_width=model.config.exit_gate_width,
                baseline_nll=base, summary=summary)  # fmt: skip
    report(args.name, rows, meta)
    print(f"at equal loss (NLL within +{args.tolerance:.1%} of fixed R = {R}, {base:.4f}):")
    for row in summary:
        print(row)


if __name__ == "__main__":
    main()
