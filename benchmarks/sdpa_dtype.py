"""Attention of one short document on CPU under bf16 autocast: SDPA in bf16 against float32, the measurement behind
`loopfit.models.packed_attention.FLOAT32_MAX_TOKENS_X_HEAD_DIM`.

`kernels`: PyTorch's SDPA (flash-attention kernel on CPU) on one causal document of L tokens, bf16 inputs, for each
head shape of `--heads` (query heads / key-value heads x head_dim; default SmolLM2's 9/3x64, a Qwen3-like 16/8x128
and a Gemma-like 8/4x256); forward without gradient, and forward + backward, each in bf16 and in float32 with the
casts (inputs up, output down) included; median of `--repeats` timings of `--calls` calls.

`step` (with `--step`): the peers benchmark's loopfit JSD step (SmolLM2 teacher, pruned 14-layer student, LoRA r 16,
4 GSM8K chat records packed in one 678-token row of documents of 132-218 tokens, bf16; `benchmarks/peers.py`),
run with `FLOAT32_MAX_TOKENS_X_HEAD_DIM` = 0 (every document in bf16) and at its default, each in its own
processes, `--pairs` of each in turn, `--steps` timed steps each (after 2 untimed).

    python -m benchmarks.sdpa_dtype [--lengths 64 132 ...] [--heads 9/3x64 ...] [--step] [--steps 20] [--pairs 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import report

LENGTHS = (64, 132, 170, 218, 256, 320, 512, 1024)
HEADS = ("9/3x64", "16/8x128", "8/4x256")


def _median_ms(fn, calls: int, repeats: int) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t) / calls * 1e3)
    return statistics.median(times)


def kernels(lengths, heads, calls: int, repeats: int) -> list[dict]:
    return [_kernel_row(n, shape, calls, repeats) for shape in heads for n in lengths]


def parse_heads(spec: str) -> tuple[int, int, int]:
    """`"9/3x64"` -> (9, 3, 64): query heads / key-value heads x head_dim. Raises ValueError for another form."""
    q, rest = spec.split("/")
    kv, dim = rest.split("x")
    out = int(q), int(kv), int(dim)
    if min(out) < 1 or out[0] % out[1]:
        raise ValueError(spec)
    return out


def _kernel_row(n: int, shape: str, calls: int, repeats: int) -> dict:
    hq, hkv, dim = parse_heads(shape)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, n, dim, generator=g, dtype=torch.bfloat16).requires_grad_() for h in (hq, hkv, hkv))
    grad = torch.randn(1, hq, n, dim, generator=g, dtype=torch.bfloat16)

    def bf16():
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    def fp32():
        out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True, enable_gqa=True)
        return out.to(torch.bfloat16)

    with torch.no_grad():
        fwd = {name: _median_ms(fn, calls, repeats) for name, fn in (("bf16", bf16), ("fp32", fp32))}
    both = {name: _median_ms(lambda fn=fn: fn().backward(grad), calls, repeats)
            for name, fn in (("bf16", bf16), ("fp32", fp32))}  # fmt: skip
    return {"heads": shape, "tokens": n, "fwd_bf16_ms": fwd["bf16"], "fwd_fp32_ms": fwd["fp32"],
            "fwd_bwd_bf16_ms": both["bf16"], "fwd_bwd_fp32_ms": both["fp32"],
            "fwd_bwd_fp32_over_bf16": both["fp32"] / both["bf16"]}  # fmt: skip


def step(steps: int, pairs: int) -> list[dict]:
    """The peers step at `FLOAT32_MAX_TOKENS_X_HEAD_DIM` 0 and at its default, each setting in its own process
    (alternating between the settings step by step in one process measures the switch too), `pairs` processes of
    each."""
    from benchmarks import peers
    from loopfit.models import packed_attention

    times: dict[int, list[float]] = {0: [], packed_attention.FLOAT32_MAX_TOKENS_X_HEAD_DIM: []}
    with tempfile.TemporaryDirectory() as tmp:
        student = peers.prepare_student(Path(tmp))
        for _ in range(pairs):
            for limit in times:
                out = Path(tmp) / "step.json"
                cmd = [sys.executable, "-m", "benchmarks.sdpa_dtype", "--step_worker", student, str(limit), str(out),
                       "--steps", str(steps)]  # fmt: skip
                subprocess.run(cmd, check=True, cwd=Path(__file__).resolve().parent.parent)
                worker = json.loads(out.read_text())
                times[limit] += worker["step_s"]
    return [{"float32_max_tokens_x_head_dim": limit, "step_s_median": statistics.median(t), "step_s_min": min(t),
             "step_s_max": max(t), "steps": len(t), "processes": pairs, "documents": worker["documents"]}
            for limit, t in times.items()]  # fmt: skip


def step_worker(student: str, limit: int, out: str, steps: int) -> None:
    import loopfit.process  # noqa: F401  (the `loopfit` command's defaults, as the peers benchmark)
    from benchmarks import peers
    from loopfit.io import write_json
    from loopfit.loading import load_tokenizer
    from loopfit.models import packed_attention
    from loopfit.train.recipe import fit

    packed_attention.FLOAT32_MAX_TOKENS_X_HEAD_DIM = limit
    batch = peers.packed_batch(peers.shared_batch(load_tokenizer(student), peers.chat_records(peers.GSM8K, 4)))
    with tempfile.TemporaryDirectory() as tmp:
        run = peers.loopfit_run(student, peers.GSM8K, batch, 4, "jsd", str(Path(tmp) / "run"), 2 + steps, "bf16")
        fit(run, until=2)
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            fit(run, until=run.step + 1)
            times.append(time.perf_counter() - t)
        run.logger.close()
    bounds = packed_attention.segments(torch.as_tensor(batch["position_ids"]))[0]
    write_json(Path(out), {"step_s": times, "documents": [b - a for a, b in zip(bounds[:-1], bounds[1:])]})


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    p.add_argument("--heads", nargs="+", default=list(HEADS), help="Q/KVxD: query heads / key-value heads x head_dim")
    p.add_argument("--calls", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--step", action="store_true", help="also the peers step A/B (loads SmolLM2; GSM8K shared data)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per process with --step")
    p.add_argument("--pairs", type=int, default=3, help="processes per setting with --step")
    p.add_argument("--step_worker", nargs=3, metavar=("STUDENT", "LIMIT", "OUT"), help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    counts = ("calls", "repeats", "steps", "pairs", "threads")
    bad = [f"--{k} {v}" for k, v in vars(args).items() if k in counts and v < 1]
    bad += [f"--lengths {n}" for n in args.lengths if n < 1]
    if bad:
        raise SystemExit(f"loopfit: error: {', '.join(bad)}: must be at least 1")
    for spec in args.heads:
        try:
            parse_heads(spec)
        except ValueError:
            why = "not Q/KVxD with Q a multiple of KV (e.g. 9/3x64)"
            raise SystemExit(f"loopfit: error: --heads {spec}: {why}") from None
    torch.set_num_threads(args.threads)
    if args.step_worker:
        student, limit, out = args.step_worker
        return step_worker(student, int(limit), out, args.steps)
    rows = kernels(args.lengths, args.heads, args.calls, args.repeats)
    meta = {"attention": "one causal document, GQA", "calls": args.calls, "repeats": args.repeats}
    report("sdpa_dtype", rows, meta, out=args.out)
    if args.step:
        out = None if args.out is None else str(Path(args.out).with_name(Path(args.out).stem + "_step.json"))
        report("sdpa_dtype_step", step(args.steps, args.pairs), {"job": "peers loopfit_jsd, bf16, packed"}, out=out)


if __name__ == "__main__":
    main()
