"""Cost of the loss at every depth (`--every_depth.k`): time of one training micro-step (forward, loss, backward)
at k = 1, 2, 4, interleaved so that a loaded machine slows every k alike; median of the repeats, in wall-clock and
in this process's CPU time (which a machine shared with other jobs disturbs much less than the wall-clock).

Two students: a tiny Llama (6 layers, hidden 64, vocab 512) converted 2-2-2, and SmolLM2-135M converted 4-6-4 (the
heal of configs/heal-smol.yaml: LoRA r = 16 on every linear layer and the adapter trained, live KD from
SmolLM2-135M, forward KL at T = 2, CE and KD weights 0.5, fused loss, bf16 autocast). Both at batch 4 x 256 and a
fixed depth (3 iterations without gradient, then 3 with it: R = 6, as the heal's min_num_steps = backprop_depth =
3). Also printed: `train_flops_per_token` at each k, the count MFU and the sweep's budget use.

    python -m benchmarks.every_depth [--which tiny|smol|both] [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from benchmarks.common import report
from loopfit.convert import layout_from_sizes, to_looped
from loopfit.flops import flop_params, train_flops_per_token
from loopfit.loading import load_model
from loopfit.train.config import DistillationConfig, EveryDepthConfig, LoRAConfig
from loopfit.train.student import Student, apply_lora, build_objective, objective_loss

KS = (1, 2, 4)
NUM_STEPS = (3, 3)


def _tiny():
    cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)  # fmt: skip
    torch.manual_seed(0)
    src = LlamaForCausalLM(cfg).eval()
    return src, to_looped(src, layout_from_sizes(6, 2, 2, 2), state_init="zeros"), torch.float32


def _smol():
    src = load_model("smollm2-135m").eval().requires_grad_(False)
    looped = to_looped(src, layout_from_sizes(src.config.num_hidden_layers, 4, 6, 4), state_init="zeros")
    return src, looped, torch.bfloat16


def measure(name: str, repeats: int, batch: int = 4, seq: int = 256) -> list[dict]:
    teacher, looped, dtype = _tiny() if name == "tiny" else _smol()
    teacher.requires_grad_(False)
    student = apply_lora(looped, LoRAConfig(enabled=True, r=16, modules_to_save=["adapter"])).train()
    dcfg = DistillationConfig(enabled=True, teacher_model_name="t", ce_scale=0.5, kd_scale=0.5, temperature=2.0)
    objectives = {k: build_objective(dcfg, student, teacher, every_depth=EveryDepthConfig(k)) for k in KS}
    vocab = teacher.config.vocab_size
    ids = torch.randint(4, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    batch_ = {"input_ids": ids, "labels": ids}
    n_items = torch.tensor(float(batch * (seq - 1)))
    wrapped = Student(student)
    times: dict[int, list[float]] = {k: [] for k in KS}
    cpu: dict[int, list[float]] = {k: [] for k in KS}
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
    for rep in range(repeats + 1):  # the first round warms up
        for k in KS:
            t0, c0 = time.perf_counter(), time.process_time()
            with autocast:
                parts = objective_loss(objectives[k], wrapped, teacher, batch_, NUM_STEPS, n_items)
            parts.total.backward()
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            student.zero_grad(set_to_none=True)
            if rep:
                times[k].append(dt)
                cpu[k].append(dc)
    fp = flop_params(student, teacher)
    rows = []
    base, base_cpu = statistics.median(times[1]), statistics.median(cpu[1])
    flops_k1 = train_flops_per_token(fp, *NUM_STEPS, seq, teacher=True)
    for k in KS:
        med = statistics.median(times[k])
        flops = train_flops_per_token(fp, *NUM_STEPS, seq, teacher=True, depths=min(k, sum(NUM_STEPS)))
        med_cpu = statistics.median(cpu[k])
        rows.append({"model": name, "k": k, "seconds_per_step": med, "vs_k1": med / base,
                     "cpu_seconds_per_step": med_cpu, "cpu_vs_k1": med_cpu / base_cpu,
                     "flops_per_token_g": flops / 1e9, "flops_vs_k1": flops / flops_k1,
                     "min_s": min(times[k]), "max_s": max(times[k])})  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--which", choices=["tiny", "smol", "both"], default="both")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name in ("tiny", "smol") if args.which == "both" else (args.which,):
        rows += measure(name, args.repeats)
    report("every_depth", rows, meta={"num_steps": NUM_STEPS, "batch": "4 x 256", "threads": args.threads})


if __name__ == "__main__":
    main()
