"""Time and extra peak memory of CE + KD (forward KL) over a V = 49152 lm_head: naive, chunked, fused, matmul floor.

Every configuration runs in its own subprocess so that the peak resident memory (`ru_maxrss`) belongs to it alone;
"extra" is that peak minus the resident memory once the inputs exist. The floor is the time of the unavoidable
matrix products alone (student and teacher logits, the two student gradient products), run chunk by chunk into
preallocated outputs; its GFLOP/s is the matmul peak of that run. After its memory is taken, each loss is timed
again interleaved with the floor in the same process (`--rounds`, best of each), so that `x_floor` compares the two
under the same load; the floor's own subprocess gives the table's floor row.

    python benchmarks/kd_loss.py                       # full grid, writes benchmarks/results/kd_loss.json
    python benchmarks/kd_loss.py --ns 2048 --dtypes float32 --methods fused floor
    python benchmarks/kd_loss.py --device cuda --ns 8192 --methods floor fused --chunk_size 1024 --repeats 20 \
        --rounds 20 --out benchmarks/results/kd_loss_cuda.json      # on a GPU: memory from the CUDA allocator

On CUDA the timed region is synchronised on both ends, the warm-up runs at full size (cuBLAS picks its kernels
per shape), and "extra" memory is `torch.cuda.max_memory_allocated` minus what the inputs hold.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

V, H, TEMPERATURE = 49152, 576, 2.0


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(
    method: str, n: int, dtype_name: str, chunk_size: int, repeats: int, rounds: int, device: str = "cpu"
) -> dict:
    import torch
    import torch.nn.functional as F

    from loopfit.losses import chunked_kd_loss, fused_kd_loss

    torch.set_num_threads(2)
    dtype = getattr(torch, dtype_name)
    cuda = device == "cuda"
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, H, generator=g).to(device, dtype).requires_grad_()
    w = (torch.randn(V, H, generator=g) * 0.05).to(device, dtype).requires_grad_()
    th = torch.randn(n, H, generator=g).to(device, dtype)
    tw = (torch.randn(V, H, generator=g) * 0.05).to(device, dtype)
    labels = torch.randint(0, V, (n,), generator=g).to(device)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def naive(h, w, th, labels):
        logits = F.linear(h, w).float()
        with torch.no_grad():
            t_logits = F.linear(th, tw).float()
        ce = F.cross_entropy(logits, labels)
        kd = F.kl_div(
            torch.log_softmax(logits / TEMPERATURE, -1), torch.log_softmax(t_logits / TEMPERATURE, -1),
            reduction="batchmean", log_target=True,
        ) * TEMPERATURE**2  # fmt: skip
        (ce + kd).backward()

    def fused(h, w, th, labels, impl=fused_kd_loss):
        out = impl(h, w, labels, teacher_hidden=th, teacher_weight=tw, temperature=TEMPERATURE, chunk_size=chunk_size)
        out.total.backward()

    c = min(chunk_size, n)
    bufs = tuple(torch.empty(c, k, dtype=dtype, device=device) for k in (V, V, H))
    gw = torch.empty(V, H, dtype=dtype, device=device)

    @torch.no_grad()
    def floor(h, w, th, labels):
        h, w = h.detach(), w.detach()
        for s in range(0, h.shape[0], chunk_size):
            hc = h[s : s + chunk_size]
            logits, t_logits, gh = (b[: hc.shape[0]] for b in bufs)
            torch.mm(hc, w.T, out=logits)
            torch.mm(th[s : s + chunk_size], tw.T, out=t_logits)
            torch.mm(logits, w, out=gh)
            torch.mm(logits.T, hc, out=gw)

    fn = {"naive": naive, "fused": fused, "floor": floor}.get(method)
    if method == "chunked":
        fn = lambda *a: fused(*a, impl=chunked_kd_loss)  # noqa: E731
    warm = n if cuda else min(n, 256)  # warm-up on a slice on CPU: kernels ready, without raising the peak RSS
    fn(h.detach()[:warm].requires_grad_(), w, th[:warm], labels[:warm])
    h.grad = w.grad = None
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else rss_bytes()
    times = []
    for _ in range(repeats):
        h.grad = w.grad = None
        sync()
        t0 = time.perf_counter()
        fn(h, w, th, labels)
        sync()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    floor_times = []
    for _ in range(rounds if method != "floor" else 0):  # interleaved: loss and floor see the same load
        for f, acc in ((floor, floor_times), (fn, times)):
            h.grad = w.grad = None
            sync()
            t0 = time.perf_counter()
            f(h, w, th, labels)
            sync()
            acc.append(time.perf_counter() - t0)
    flops = 8 * n * V * H
    return {
        "method": method, "n": n, "dtype": dtype_name, "chunk_size": chunk_size, "seconds": min(times),
        "all_seconds": times, "extra_peak_gib": max(peak - base, 0) / 2**30, "matmul_gflop": flops / 1e9,
        "gflops_per_s": flops / min(times) / 1e9 if method == "floor" else None,
        "floor_seconds_same_process": min(floor_times) if floor_times else None,
        "x_floor_same_process": min(times) / min(floor_times) if floor_times else None,
        "gpu": torch.cuda.get_device_name() if cuda else None,
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ns", type=int, nargs="+", default=[2048, 8192])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--methods", nargs="+", default=["floor", "fused", "chunked", "naive"])
    ap.add_argument("--chunk_size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2, help="timed runs (naive always 1: it is slow and huge)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved loss / floor pairs per loss (naive 1)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "kd_loss.json"))
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        method, n, dtype = args.worker
        print(json.dumps(worker(method, int(n), dtype, args.chunk_size, args.repeats, args.rounds, args.device)))
        return

    load_before = os.getloadavg()
    rows = []
    for n in args.ns:
        for dtype in args.dtypes:
            for method in args.methods:
                repeats, rounds = (1, min(args.rounds, 1)) if method == "naive" else (args.repeats, args.rounds)
                cmd = [sys.executable, __file__, "--worker", method, str(n), dtype, "--device", args.device,
                       "--chunk_size", str(args.chunk_size), "--repeats", str(repeats),
                       "--rounds", str(rounds)]  # fmt: skip
                res = subprocess.run(cmd, capture_output=True, text=True)
                if res.returncode != 0:
                    print(res.stderr[-2000:], file=sys.stderr)
                    raise SystemExit(f"worker {method} {n} {dtype} failed")
                rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
                r = rows[-1]
                print(
                    f"  {method:8s} N={n:5d} {dtype:9s} {r['seconds']:7.2f} s  {r['extra_peak_gib']:6.2f} GiB",
                    flush=True,
                )
    by = {(r["n"], r["dtype"], r["method"]): r for r in rows}
    print(f"\nCE + forward-KL (T={TEMPERATURE}) over V={V}, H={H}; 2 threads; chunk {args.chunk_size}")
    print(f"{'N':>6} {'dtype':9} {'method':8} {'time s':>8} {'x floor':>8} {'extra GiB':>10} {'% naive mem':>12}")
    for r in rows:
        fl = by.get((r["n"], r["dtype"], "floor"))
        nv = by.get((r["n"], r["dtype"], "naive"))
        # The same-process ratio where there is one (same load on both sides), else against the floor's subprocess.
        r["x_floor"] = r["x_floor_same_process"] or (r["seconds"] / fl["seconds"] if fl else None)
        r["pct_naive_extra_mem"] = 100 * r["extra_peak_gib"] / nv["extra_peak_gib"] if nv else None
        xf = f"{r['x_floor']:.2f}" if r["x_floor"] else "-"
        pm = f"{r['pct_naive_extra_mem']:.1f}" if r["pct_naive_extra_mem"] is not None else "-"
        mem = r["extra_peak_gib"]
        print(f"{r['n']:>6} {r['dtype']:9} {r['method']:8} {r['seconds']:8.2f} {xf:>8} {mem:10.3f} {pm:>12}")
    for r in rows:
        if r["method"] == "floor":
            print(f"matmul peak N={r['n']} {r['dtype']}: {r['gflops_per_s']:.0f} GFLOP/s")
    meta = {"load_avg_before": load_before, "load_avg_after": os.getloadavg(), "nproc": os.cpu_count(),
            "vocab": V, "hidden": H, "temperature": TEMPERATURE, "chunk_size": args.chunk_size,
            "device": args.device, "gpu": rows[0].get("gpu") if rows else None}  # fmt: skip
    print(f"load average before {load_before}, after {meta['load_avg_after']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(args.out).with_suffix(".tmp")
    tmp.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
