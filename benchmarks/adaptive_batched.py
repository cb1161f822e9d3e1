"""Batched generation with adaptive depth against fixed depth: tokens/s and iterations at batch 1, 8 and 32.

    python -m benchmarks.adaptive_batched --model runs/demo/healed [--max_num_steps 4 8] [--batches 1 8 32]

For each `--max_num_steps` R: the loss (mean NLL, teacher-forced with the KV cache, `score_adaptive_batch`) of
held-out text (`--offset` on, the last 10% of tinyshakespeare by default) at fixed depth R and for each threshold
of `--kl` and `--state`; the loosest threshold of each criterion within `--tolerance` (relative) of fixed depth's
loss is then timed. Timing: greedy generation of `--new_tokens` tokens (no EOS stop) after prompts of 16-48
held-out tokens (different lengths, left-padded), at each batch size, for fixed depth through the adaptive decoder
(`none`), fixed depth through `model.generate` (`hf`), the chosen kl / state thresholds, and for reference the
shallower fixed depths `--fixed_depths` (`none@d`, with their loss). Each row: tokens/s
(generated tokens over wall-clock, prefill included; best of `--repeats` interleaved rounds), mean iterations per
token, and the mean over decoding steps of the batch's deepest row (what a batch that runs to its deepest member
would pay).
Writes benchmarks/results/NAME.json (`--name`, default adaptive_batched).
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import report
from loopfit.adaptive import ExitConfig, generate_adaptive_batch, left_pad, score_adaptive_batch
from loopfit.loading import load_model, load_tokenizer


def _nll(model, ids: torch.Tensor, prefix: int, x: ExitConfig, batch: int) -> tuple[float, float]:
    """Mean NLL and mean iterations per token of `ids[:, prefix:]`, scored `batch` rows at a time."""
    outs = []
    for i in range(0, ids.shape[0], batch):
        outs += score_adaptive_batch(model, ids[i : i + batch], prefix, x)
    nll = -sum(sum(o.logprobs) for o in outs) / sum(len(o.logprobs) for o in outs)
    its = sum(sum(o.iterations) for o in outs) / sum(len(o.iterations) for o in outs)
    return nll, its


def _generate(model, prompts, x: ExitConfig | None, new_tokens: int, num_steps: int) -> tuple[float, float, float]:
    """(seconds, mean iterations per token, mean per step of the batch's deepest row) for one batch of prompts."""
    t0 = time.perf_counter()
    if x is None:
        ids, mask = left_pad(prompts)
        with torch.inference_mode():
            model.generate(ids, attention_mask=mask, num_steps=num_steps, max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)  # fmt: skip
        return time.perf_counter() - t0, float(num_steps), float(num_steps)
    outs = generate_adaptive_batch(model, prompts, x, max_new_tokens=new_tokens)
    dt = time.perf_counter() - t0
    its = [it for o in outs for it in o.iterations]
    deepest = [max(o.iterations[k] for o in outs) for k in range(new_tokens - 1)]
    return dt, sum(its) / len(its), sum(deepest) / len(deepest)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="runs/demo/healed", help="a looped model folder (default: the main job's)")
    ap.add_argument("--data", default="../shared/data/text/tinyshakespeare.txt")
    ap.add_argument("--offset", type=float, default=0.9, help="start of the held-out text (fraction of the file)")
    ap.add_argument("--max_num_steps", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--kl", type=float, nargs="+", default=[0.01, 0.03, 0.1, 0.3, 1.0])
    ap.add_argument("--state", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    ap.add_argument("--fixed_depths", type=int, nargs="*", default=[2], help="shallower fixed depths, for reference")
    ap.add_argument("--tolerance", type=float, default=0.005, help="allowed relative loss increase over fixed depth")
    ap.add_argument("--score_seqs", type=int, default=16)
    ap.add_argument("--prefix", type=int, default=32)
    ap.add_argument("--score_tokens", type=int, default=48)
    ap.add_argument("--new_tokens", type=int, default=32)
    ap.add_argument("--batch1_prompts", type=int, default=4, help="prompts decoded one at a time for batch 1")
    ap.add_argument("--repeats", type=int, default=2, help="interleaved timing rounds; the best of each is kept")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--name", default="adaptive_batched", help="writes benchmarks/results/NAME.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model).eval()
    tok = load_tokenizer(args.model)
    text = open(args.data, encoding="utf-8").read()
    ids = tok(text[int(args.offset * len(text)) :], add_special_tokens=False)["input_ids"]
    width = args.prefix + args.score_tokens
    scored = torch.tensor([ids[i * width : (i + 1) * width] for i in range(args.score_seqs)])
    rest = ids[args.score_seqs * width :]  # prompts come from text the loss was not measured on
    prompts = [rest[64 * i : 64 * i + 16 + (7 * i) % 33] for i in range(max(args.batches))]

    rows, losses = [], []
    for R in args.max_num_steps:
        base, _ = _nll(model, scored, args.prefix, ExitConfig("none", max_num_steps=R), args.score_seqs)
        losses.append(dict(max_num_steps=R, criterion="none", threshold=None, nll=base, mean_iterations=float(R)))
        chosen = {}
        for criterion, grid in (("kl", args.kl), ("state", args.state)):
            for thr in grid:
                x = ExitConfig(criterion, thr, max_num_steps=R)
                nll, its = _nll(model, scored, args.prefix, x, args.score_seqs)
                ok = nll <= base * (1 + args.tolerance)
                losses.append(dict(max_num_steps=R, criterion=criterion, threshold=thr, nll=nll,
                                   delta_pct=100 * (nll / base - 1), mean_iterations=its, within=ok))  # fmt: skip
                print(losses[-1], flush=True)
                if ok:
                    chosen[criterion] = (thr, nll)  # grids run from tight to loose: keep the loosest within
        runs = [("hf", None, R, base), ("none", None, R, base)] + [(c, t, R, n) for c, (t, n) in chosen.items()]
        for d in [d for d in args.fixed_depths if d < R]:  # shallower fixed depths: is one as good and cheaper?
            nll, _ = _nll(model, scored, args.prefix, ExitConfig("none", max_num_steps=d), args.score_seqs)
            losses.append(dict(max_num_steps=d, criterion="none", threshold=None, nll=nll,
                               delta_pct=100 * (nll / base - 1), mean_iterations=float(d)))  # fmt: skip
            print(losses[-1], flush=True)
            runs.append((f"none@{d}", None, d, nll))
        for batch in args.batches:
            groups = [[p] for p in prompts[: args.batch1_prompts]] if batch == 1 else [prompts[:batch]]
            best = {}  # criterion -> (seconds, mean iterations, mean batch-deepest); best of interleaved rounds
            for _ in range(args.repeats):
                for criterion, thr, depth, _nll_value in runs:
                    x = None if criterion == "hf" else ExitConfig(criterion.split("@")[0], thr, max_num_steps=depth)
                    _generate(model, groups[0][:1], x, 2, depth)  # warm-up
                    timed = [_generate(model, g, x, args.new_tokens, depth) for g in groups]
                    dt = sum(t[0] for t in timed)
                    if criterion not in best or dt < best[criterion][0]:
                        best[criterion] = (dt, *(sum(t[k] for t in timed) / len(timed) for k in (1, 2)))
            tps = {c: sum(len(g) for g in groups) * args.new_tokens / best[c][0] for c in best}
            fixed_tps = max(tps["hf"], tps["none"])
            for criterion, thr, _depth, nll in runs:
                rows.append(dict(max_num_steps=R, batch=batch, criterion=criterion, threshold=thr, nll=nll,
                                 delta_pct=100 * (nll / base - 1), tokens_per_s=tps[criterion],
                                 speedup_vs_fixed=tps[criterion] / fixed_tps, mean_iterations=best[criterion][1],
                                 batch_deepest=best[criterion][2]))  # fmt: skip
                print(rows[-1], flush=True)
    meta = dict(vars(args), cache_mode=model.config.cache_mode, layout=model.config.layout, losses=losses)
    report(args.name, rows, meta)  # the machine's load average goes into meta with the rest


if __name__ == "__main__":
    main()
