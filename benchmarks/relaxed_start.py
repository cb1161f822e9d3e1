"""Starting loss of a relaxed (RRT) conversion, before any training: rank and block init against the teacher.

    python -m benchmarks.relaxed_start [--model smollm2-135m] [--layout 4:6:4] [--ranks 0,8,16,64,full]
        [--inits layers,0,average] [--rows 32] [--seq_len 256] [--depths 1,2,3,4,6] [--skip_reference] [--name NAME]

The held-out text is the last 10% of the bytes of tiny-shakespeare, cut into `rows` chunks of `seq_len` tokens
(`loopfit.evaluate.chunk_tokens`); the loss at each depth comes from `loopfit.evaluate.depth_sweep`, the function
behind `loopfit eval`. Rows: the teacher, today's conversion (identity adapter: the pruned model at every R), and
`to_looped(..., relaxation_rank=r, block_init=i)` for every rank and init. Writes benchmarks/results/NAME.json.
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import machine, report
from loopfit.convert import layout_from_sizes, to_looped
from loopfit.evaluate import chunk_tokens, depth_sweep
from loopfit.loading import load_model, load_tokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="../shared/data/text/tinyshakespeare.txt")
    ap.add_argument("--layout", default="4:6:4", help="prelude:block:coda sizes (the block just before the coda)")
    ap.add_argument("--ranks", default="0,8,16,64,full")
    ap.add_argument("--inits", default="layers,0,average", help="block inits: layers, average or a group number")
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--seq_len", type=int, default=256)
    ap.add_argument("--depths", default="1,2,3,4,6")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip_reference", action="store_true", help="skip the teacher and today's conversion")
    ap.add_argument("--name", default="relaxed_start", help="results file benchmarks/results/NAME.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tok = load_tokenizer(args.model)
    source = load_model(args.model).eval()
    raw = open(args.data, "rb").read()
    text = raw[int(len(raw) * 0.9) :].decode("utf-8", errors="ignore")
    ids = tok(text, add_special_tokens=False)["input_ids"][: args.rows * args.seq_len]
    batches = chunk_tokens(ids, args.seq_len, batch_size=4)
    depths = [int(d) for d in args.depths.split(",")]
    p, b, c = (int(x) for x in args.layout.split(":"))
    layout = layout_from_sizes(source.config.num_hidden_layers, p, b, c)

    rows = []

    def run(name: str, model) -> None:
        t = time.perf_counter()
        res = depth_sweep(model, batches, depths)
        row = {"model": name} | {f"R={r}": loss for r, loss in zip(res["depths"], res["loss"])}
        rows.append(row | {"tokens": res["tokens"], "seconds": round(time.perf_counter() - t, 1)})
        print(row, flush=True)

    if not args.skip_reference:
        run("teacher", source)
        run("today (identity adapter)", to_looped(source, layout))
    for init in args.inits.split(","):
        init = int(init) if init.isdigit() else init
        for rank in args.ranks.split(","):
            rank = rank if rank == "full" else int(rank)
            model = to_looped(source, layout, relaxation_rank=rank, block_init=init)
            groups = model.config.relaxation_groups
            n = sum(p.numel() for p in model.model.relaxation.parameters()) if model.model.relaxation else 0
            run(f"rank {rank}, block {init} (L = {len(groups)}, {n / 1e6:.2f} M delta params)", model)
            del model
    meta = {"args": vars(args), "layout": str(layout), "groups": groups, "machine": machine()}
    report(args.name, rows, meta)


if __name__ == "__main__":
    main()
