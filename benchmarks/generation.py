"""Generation speed of a looped SmolLM2 at several depths, with each KV-cache mode (batch 1, greedy).

    python benchmarks/generation.py [--model smollm2-135m] [--layout 4-6-4] [--new_tokens 64]

Prints tokens/s and the KV-cache size per depth and cache mode; writes benchmarks/results/generation.json.
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import report
from loopfit.convert import layout_from_sizes, to_looped
from loopfit.loading import load_model, load_tokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--layout", default="4-6-4")
    ap.add_argument("--depths", default="1,4,8")
    ap.add_argument("--new_tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    src = load_model(args.model)
    tok = load_tokenizer(args.model)
    p, b, c = map(int, args.layout.split("-"))
    model = to_looped(src, layout_from_sizes(src.config.num_hidden_layers, p, b, c), adapter_init="random").eval()
    text = tok.apply_chat_template(
        [{"role": "user", "content": "Explain why the sky is blue."}], tokenize=False, add_generation_prompt=True
    )
    ids = tok(text, return_tensors="pt").input_ids
    rows = []
    for mode in ("full", "compress"):
        model.config.cache_mode = mode
        for depth in map(int, args.depths.split(",")):
            with torch.inference_mode():
                model.generate(ids, num_steps=depth, max_new_tokens=4, min_new_tokens=4, do_sample=False)
                t = time.perf_counter()
                out = model.generate(
                    ids,
                    num_steps=depth,
                    max_new_tokens=args.new_tokens,
                    min_new_tokens=args.new_tokens,
                    do_sample=False,
                    return_dict_in_generate=True,
                )
                dt = time.perf_counter() - t
                cache = out["cache"] if "cache" in out else out["past_key_values"]  # renamed in transformers 5.24
                kv_mib = (
                    sum(
                        layer.keys.numel() + layer.values.numel()
                        for layer in cache.layers
                        if getattr(layer, "keys", None) is not None
                    )
                    * 4
                    / 2**20
                )
            rows.append(
                {
                    "cache_mode": mode,
                    "depth": depth,
                    "new_tokens": args.new_tokens,
                    "tokens_per_s": args.new_tokens / dt,
                    "seconds": dt,
                    "kv_cache_mib": kv_mib,
                    "cache_slots": len(cache.layers),
                }
            )
    report("generation", rows, {"model": args.model, "layout": args.layout, "prompt_tokens": ids.shape[1]})


if __name__ == "__main__":
    main()
