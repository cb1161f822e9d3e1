"""What the constant-memory `compress` KV cache costs in quality: teacher-forced loss of cached decoding, per depth.

    python -m benchmarks.cache_modes MODEL [--data ../shared/data/text/tinyshakespeare.txt] [--depths 2,4,8]

For each depth R and each cache mode, the held-out text is fed one token at a time through the cache (the way
`generate` decodes) and the mean next-token NLL of the fed tokens is recorded, along with the KV-cache size. `full`
cached decoding equals the uncached forward (tested), so its loss is the reference; `compress` lets a new token's
iteration i attend to earlier tokens' final-iteration keys/values instead of their iteration-i ones.
"""

from __future__ import annotations

import argparse
import math

import torch

from benchmarks.common import report
from loopfit.adaptive import ExitConfig, score_adaptive
from loopfit.loading import load_model, load_tokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "model",
        help="a looped model folder (ideally healed: with the identity adapter at init, "
        "every iteration computes the same thing and both modes agree trivially)",
    )
    ap.add_argument("--data", default="../shared/data/text/tinyshakespeare.txt")
    ap.add_argument("--depths", default="2,4,8")
    ap.add_argument("--sequences", type=int, default=2)
    ap.add_argument("--prefix", type=int, default=32)
    ap.add_argument("--scored", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model).eval()
    tok = load_tokenizer(args.model)
    text = open(args.data, encoding="utf-8").read()
    ids = tok(text[-len(text) // 10 :], add_special_tokens=False, return_tensors="pt").input_ids[0]
    span = args.prefix + args.scored
    seqs = [ids[i * span : (i + 1) * span][None] for i in range(args.sequences)]
    rows = []
    for depth in map(int, args.depths.split(",")):
        losses = {}
        for mode in ("full", "compress"):
            model.config.cache_mode = mode
            nll = []
            with torch.inference_mode():
                for seq in seqs:
                    out = score_adaptive(model, seq, args.prefix, ExitConfig(criterion="none", max_num_steps=depth))
                    nll += [-x for x in out.logprobs]
            losses[mode] = sum(nll) / len(nll)
        b = len(model.config.block_layers)
        other = len(model.config.prelude_layers) + len(model.config.coda_layers)
        rows.append(
            {
                "depth": depth,
                "full_loss": losses["full"],
                "compress_loss": losses["compress"],
                "loss_increase": losses["compress"] - losses["full"],
                "ppl_ratio": math.exp(losses["compress"] - losses["full"]),
                "kv_slots_full": other + depth * b,
                "kv_slots_compress": other + b,
            }
        )
    report("cache_modes", rows, {"model": args.model, "data": args.data, "scored_tokens": args.sequences * args.scored})


if __name__ == "__main__":
    main()
