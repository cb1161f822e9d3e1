"""Teacher cache on SmolLM2-135M: bytes per token and reconstruction error per estimator, read throughput of the
memory-mapped shards against Parquet, and a distillation step from the cache vs the online teacher vs no KD.

    python benchmarks/teacher_cache.py            # writes benchmarks/results/teacher_cache.json

The step is measured directly (looped student forward at R = 2, fused CE + KD loss, backward; no optimizer), not
through `loopfit train`: wiring `--distillation.teacher_cache` into the trainer belongs to the training code.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from loopfit.cache import CacheSettings, TeacherCache, TeacherTargetsDataset, target_positions, write_cache
from loopfit.losses import fused_kd_loss

GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "train.jsonl"
ESTIMATORS = {
    "topk k=64": dict(estimator="topk", top_k=64),
    "topk_tail k=64": dict(estimator="topk_tail", top_k=64),
    "topk_tail k=16": dict(estimator="topk_tail", top_k=16),
    "sampled n=32": dict(estimator="sampled", samples=32),
}


class MemoTeacher(torch.nn.Module):
    """The teacher, with each batch's logits kept so that every estimator reuses one forward pass."""

    def __init__(self, model):
        super().__init__()
        self.model, self.memo = model, {}

    def forward(self, input_ids, **kw):
        key = input_ids.numpy().tobytes()
        if key not in self.memo:
            self.memo[key] = self.model(input_ids=input_ids, **kw)
        return self.memo[key]


def reconstruction_errors(cache: TeacherCache, logits: list[torch.Tensor], valid: list[torch.Tensor]) -> dict:
    fkl, rkl, tvd, missing = [], [], [], []
    for i, (lg, m) in enumerate(zip(logits, valid)):
        p = torch.softmax(lg[m].double(), -1)
        r = cache.dense(i)[m].double()
        logp, logr = p.log(), r.log()
        fkl.append(torch.where(p > 0, p * (logp - logr), 0.0).sum(-1))
        rkl.append(torch.where(r > 0, r * (logr - logp), 0.0).sum(-1))
        tvd.append(0.5 * (p - r).abs().sum(-1))
        missing.append(torch.where(r > 0, 0.0, p).sum(-1))  # teacher mass the reconstruction gives zero
    cat = lambda xs: torch.cat(xs)  # noqa: E731
    f = cat(fkl)
    return {
        "kl_teacher_recon": float(f.mean()) if torch.isfinite(f).all() else float("inf"),
        "kl_recon_teacher": float(cat(rkl).mean()),
        "tvd": float(cat(tvd).mean()),
        "teacher_mass_outside_support": float(cat(missing).mean()),
    }


def read_throughput(cache: TeacherCache, rounds: int) -> dict:
    order = [i for _ in range(rounds) for i in range(len(cache))]
    random.Random(0).shuffle(order)
    t0 = time.perf_counter()
    for i in order:
        cache[i]
    dt = time.perf_counter() - t0
    return {"rows_per_s": len(order) / dt, "tokens_per_s": len(order) * cache.seq_len / dt}


def parquet_throughput(cache: TeacherCache, folder: Path, rounds: int) -> dict:
    """The same CSR content as Parquet list columns (one row per sequence, 16 per row group), read at random."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols = {"counts": [], "ids": [], "values": []}
    for sh in cache.shards:
        arr = {k: np.load(cache.folder / rec["file"]) for k, rec in sh["files"].items()}
        offs = np.concatenate([[0], np.cumsum(arr["counts"].sum(1, dtype=np.int64))])
        for r in range(arr["counts"].shape[0]):
            cols["counts"].append(arr["counts"][r])
            cols["ids"].append(arr["ids"][offs[r] : offs[r + 1]])
            cols["values"].append(arr["values"][offs[r] : offs[r + 1]])
    table = pa.table({k: pa.array(v) for k, v in cols.items()})
    path = folder / "cache.parquet"
    pq.write_table(table, path, row_group_size=16)
    pf = pq.ParquetFile(path)
    order = [i for _ in range(rounds) for i in range(len(cache))]
    random.Random(0).shuffle(order)
    t0 = time.perf_counter()
    for i in order:
        rg = pf.read_row_group(i // 16)
        _ = {k: rg.column(k)[i % 16].values.to_numpy() for k in cols}
    dt = time.perf_counter() - t0
    return {"rows_per_s": len(order) / dt, "tokens_per_s": len(order) * cache.seq_len / dt,
            "bytes": path.stat().st_size}  # fmt: skip


def step_times(teacher, caches: dict, dataset, batch_rows: int, repeats: int) -> dict:
    from loopfit.convert import parse_layout, to_looped

    student = to_looped(teacher, parse_layout("0-3:20-25:26-29", teacher.config.num_hidden_layers)).train()
    idx = list(range(batch_rows))
    base = torch.utils.data.default_collate([dataset[i] for i in idx])
    ids, labels = base["input_ids"], base["labels"][:, 1:]

    def student_hidden():
        return student(input_ids=ids, num_steps=2, return_hidden=True).logits[:, :-1]

    def none():
        fused_kd_loss(student_hidden(), student.lm_head.weight, labels).total.backward()

    def online():
        with torch.no_grad():
            t_hidden = teacher.model(input_ids=ids).last_hidden_state[:, :-1]
        out = fused_kd_loss(student_hidden(), student.lm_head.weight, labels, teacher_hidden=t_hidden,
                            teacher_weight=teacher.lm_head.weight)  # fmt: skip
        out.total.backward()

    def from_cache(cache):
        def run():
            b = torch.utils.data.default_collate([TeacherTargetsDataset(dataset, cache)[i] for i in idx])
            tail = b["teacher_tail"][:, :-1] if "teacher_tail" in b else None
            sparse = dict(teacher_ids=b["teacher_ids"][:, :-1], teacher_values=b["teacher_values"][:, :-1],
                          teacher_tail=tail, estimator=cache.estimator)  # fmt: skip
            out = fused_kd_loss(student_hidden(), student.lm_head.weight, labels, **sparse)
            out.total.backward()

        return run

    variants = {"no distillation": none, "online teacher": online}
    variants.update({f"cache {name}": from_cache(c) for name, c in caches.items()})
    times = {k: [] for k in variants}
    for r in range(repeats + 1):  # interleaved, so that load changes hit every variant alike; round 0 warms up
        for name, fn in variants.items():
            student.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            fn()
            if r:
                times[name].append(time.perf_counter() - t0)
    best = {k: min(v) for k, v in times.items()}
    return {k: {"seconds": v, "all": times[k], "x_no_kd": v / best["no distillation"]} for k, v in best.items()}


def random_steps(args) -> dict:
    """Step times only, with a randomly initialised model of SmolLM2-135M's exact shape (timing depends on shapes
    alone), so that they can be measured on an idle machine without the weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
                         max_position_embeddings=2048)  # fmt: skip
    teacher = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, config.vocab_size, (args.step_rows, args.seq_len))
    rows = [{"input_ids": x, "labels": x.clone()} for x in ids]
    info = {"teacher": "random-smollm2-shape", "tokenizer_hash": "-", "data_hash": "-", "vocab_size": config.vocab_size}
    caches = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("topk_tail k=64", "sampled n=32"):
            settings = CacheSettings(batch_size=args.step_rows, **ESTIMATORS[name])
            out = Path(tmp) / name.replace(" ", "_").replace("=", "")
            caches[name] = TeacherCache(write_cache(teacher, rows, out, settings, info, progress=False))
        return step_times(teacher, caches, rows, args.step_rows, args.repeats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--seq_len", type=int, default=512)
    ap.add_argument("--step_rows", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "teacher_cache.json"))
    ap.add_argument("--random_weights", action="store_true", help="only the step times, random SmolLM2-shaped model")
    args = ap.parse_args()
    torch.set_num_threads(2)
    load_before = os.getloadavg()
    if args.random_weights:
        steps = random_steps(args)
        for k, v in steps.items():
            print(f"  {k:24s} {v['seconds']:7.2f} s  {v['x_no_kd']:5.2f}x no-KD")
        meta = {"random_weights": True, "seq_len": args.seq_len, "step_rows": args.step_rows,
                "load_avg_before": load_before, "load_avg_after": os.getloadavg()}  # fmt: skip
        result = {"meta": meta, "steps": steps}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        return
    from loopfit.data import build_dataset, tokenizer_hash
    from loopfit.loading import load_model, load_tokenizer

    tok = load_tokenizer("smollm2-135m")
    teacher = load_model("smollm2-135m").eval()
    data = build_dataset(str(GSM8K), tok, args.seq_len, chat=True, max_documents=args.rows * 4)
    rows = torch.utils.data.Subset(data.train, range(min(args.rows, len(data.train))))
    info = {"teacher": "smollm2-135m", "tokenizer_hash": tokenizer_hash(tok), "data_hash": data.data_hash,
            "vocab_size": teacher.lm_head.weight.shape[0]}  # fmt: skip
    memo = MemoTeacher(teacher)
    results = {"meta": {"rows": len(rows), "seq_len": args.seq_len, "load_avg_before": load_before}, "estimators": {}}
    caches = {}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        for name, kw in ESTIMATORS.items():
            out = Path(tmp) / name.replace(" ", "_").replace("=", "")
            cache = TeacherCache(write_cache(memo, rows, out, CacheSettings(batch_size=2, **kw), info, progress=False))
            caches[name] = cache
            summary = cache.verify()
            n_valid = sum(int(target_positions(rows[i]["labels"]).sum()) for i in range(len(rows)))
            res = {"bytes_per_token": summary["bytes_per_token"], "bytes_per_target_token": summary["bytes"] / n_valid,
                   "entries_per_target": summary["entries"] / n_valid}  # fmt: skip
            results["estimators"][name] = res
            print(f"{name:16s} {res['bytes_per_token']:7.1f} B/token {res['entries_per_target']:6.1f} entries/target")
        results["meta"]["cache_write_seconds_all_estimators"] = time.perf_counter() - t0
        memo.memo.clear()  # free the batch logits before recomputing per row
        with torch.no_grad():
            logits = [memo.model(input_ids=rows[i]["input_ids"][None]).logits[0] for i in range(len(rows))]
        valid = [target_positions(rows[i]["labels"]) for i in range(len(rows))]
        for name, cache in caches.items():
            results["estimators"][name].update(reconstruction_errors(cache, logits, valid))
        del logits
        sampled = caches["sampled n=32"]
        results["read"] = {
            "npy_mmap": read_throughput(sampled, 50),
            "parquet": parquet_throughput(sampled, Path(tmp), 50),
        }
        results["steps"] = step_times(teacher, {k: caches[k] for k in ("topk_tail k=64", "sampled n=32")}, rows,
                                      args.step_rows, args.repeats)  # fmt: skip
    results["meta"]["load_avg_after"] = os.getloadavg()

    print(f"\nSmolLM2-135M teacher, {len(rows)} GSM8K chat rows x {args.seq_len} tokens")
    print(
        f"{'estimator':16} {'B/token':>8} {'B/target':>9} {'KL(p||r)':>9} {'KL(r||p)':>9} {'TVD':>7} {'mass lost':>10}"
    )
    for name, r in results["estimators"].items():
        print(f"{name:16} {r['bytes_per_token']:8.1f} {r['bytes_per_target_token']:9.1f} {r['kl_teacher_recon']:9.4f} "
              f"{r['kl_recon_teacher']:9.4f} {r['tvd']:7.4f} {r['teacher_mass_outside_support']:10.4f}")  # fmt: skip
    for k, v in results["read"].items():
        print(f"read {k:9s}: {v['rows_per_s']:9.0f} rows/s {v['tokens_per_s'] / 1e6:7.2f} M tokens/s (random rows)")
    print(f"\nstep ({args.step_rows} x {args.seq_len} tokens, looped student R = 2, fwd + fused loss + bwd)")
    for k, v in results["steps"].items():
        print(f"  {k:24s} {v['seconds']:7.2f} s  {v['x_no_kd']:5.2f}x no-KD")
    print(f"load average before {load_before}, after {results['meta']['load_avg_after']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tmp_out = Path(args.out).with_suffix(".tmp")
    tmp_out.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp_out, args.out)


if __name__ == "__main__":
    main()
