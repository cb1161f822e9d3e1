"""Fixed-depth decoding of a looped SmolLM2 on a GPU: `generate` (dynamic cache) against the static-cache decoder,
eager and replayed from a CUDA graph (`loopfit.models.graphed`), at several batch sizes and depths.

Each configuration decodes `--new_tokens` greedy tokens after a `--prompt_len`-token random prompt (no end of
sequence: every row runs to the end), once to warm up (the graph's capture included), then `--repeats` timed runs
(median; the device synchronised before reading the clock). `match_generate`: the share of tokens equal to
`generate`'s; `graph_equals_eager`: whether the graph's tokens equal the eager static step's (the same kernels).

    python -m benchmarks.graphed_decoding --source /tmp/smol-rand      # a random-weight SmolLM2 (random_source.py)
    python -m benchmarks.graphed_decoding --batches 1 8 --depths 4 --precision fp32
    python -m benchmarks.graphed_decoding --device cpu --batches 1 --new_tokens 16   # no graph rows: a dry run
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.common import report
from loopfit.convert import layout_from_sizes, to_looped
from loopfit.loading import load_model
from loopfit.models.graphed import GraphedDecoder


@torch.inference_mode()
def _timed(repeats: int, fn, *args, **kwargs):
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    out = fn(*args, **kwargs)  # warm-up: kernels, allocator blocks, the graph's capture
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        out = fn(*args, **kwargs)
        sync()
        times.append(time.perf_counter() - t)
    return out, statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", default="smollm2-135m")
    ap.add_argument("--layout", default="4-6-4")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--depths", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--prompt_len", type=int, default=64)
    ap.add_argument("--new_tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: no CUDA-graph rows (a dry run)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("loopfit: error: no CUDA GPU here (--device cpu runs the rows without graphs)")
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    src = load_model(args.source)
    p, b, c = map(int, args.layout.split("-"))
    layout = layout_from_sizes(src.config.num_hidden_layers, p, b, c)
    model = to_looped(src, layout, adapter_init="identity").eval().to(args.device, dtype)
    del src
    n = args.new_tokens
    rows = []
    for batch in args.batches:
        g = torch.Generator().manual_seed(batch)
        ids = torch.randint(3, model.config.vocab_size, (batch, args.prompt_len), generator=g).to(args.device)
        mask = torch.ones_like(ids)
        for depth in args.depths:
            kw = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, num_steps=depth, eos_token_id=None)
            ref, t_gen = _timed(args.repeats, model.generate, input_ids=ids, attention_mask=mask, **kw)
            ref = ref[:, args.prompt_len :]
            eager = GraphedDecoder(model, batch, args.prompt_len + n, depth, use_graph=False)
            out_e, t_e = _timed(args.repeats, eager.generate, ids, mask, n)
            runs = [("generate", t_gen, ref), ("static eager", t_e, out_e)]
            if args.device == "cuda":
                graphed = GraphedDecoder(model, batch, args.prompt_len + n, depth, use_graph=True)
                out_g, t_g = _timed(args.repeats, graphed.generate, ids, mask, n)
                runs.append(("CUDA graph", t_g, out_g))
                del graphed
            tokens = batch * n
            for name, t, out in runs:
                rows.append({
                    "batch": batch, "depth": depth, "decoder": name, "tokens_per_s": tokens / t, "seconds": t,
                    "ms_per_token_step": 1000 * t / n, "x_generate": t_gen / t,
                    "match_generate": (out == ref).float().mean().item(),
                    "graph_equals_eager": bool(torch.equal(out, out_e)) if name == "CUDA graph" else None,
                })  # fmt: skip
            del eager
            if args.device == "cuda":
                torch.cuda.empty_cache()
    meta = {"device": args.device, "source": args.source, "layout": args.layout, "precision": args.precision,
            "prompt_len": args.prompt_len, "new_tokens": n, "repeats": args.repeats,
            "timing": "median of repeats after one warm-up run"}  # fmt: skip
    report("graphed_decoding", rows, meta, out=args.out)


if __name__ == "__main__":
    main()
