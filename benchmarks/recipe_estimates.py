"""Layouts, parameters, FLOPs, memory and time estimates for the recipes of docs/recipes.md (no weights needed).

Weights cannot be downloaded here, so every model is built from its public architecture numbers (the config
fields below, each with its source) on the `meta` device and converted with `loopfit.convert.to_looped` to the
layout of docs/recipes.md. Parameters by component, training FLOPs over the curriculum and inference FLOPs per
depth come from `loopfit.flops` (the functions `loopfit count` uses). Memory and time are estimates:

- Saved activations are **measured** on this CPU: the model's real layer shapes (3 source layers, layout 1-1-1,
  a 512-token vocabulary; the vocabulary only matters to the loss, counted apart) wrapped in the trainer's own
  LoRA (`loopfit.train.student.apply_lora`, r = 16, all linear layers) or left fully trainable, run through the
  trainer's `Student` forward under bf16 autocast with `num_steps=(0, 2)` at two sequence lengths, the frozen linear
  weights stored in bf16 as a bf16 run stores them (`loopfit.train.frozen`); every tensor autograd saves
  (parameters excluded, each storage counted once) is attributed to the prelude, block, adapter or coda layer that
  saved it. That gives bytes per token and a per-token-free part (bf16 copies of float32 weights) per layer
  application, which scale to the full layout, batch and backprop depth. The attention kernel on a GPU may
  save slightly different tensors than CPU SDPA; the weights and the loss are counted analytically.
- Training tokens/s are the **measured** H100 rate of the same training step (benchmarks/results/
  train_throughput_cuda.json: SmolLM2-135M 4-6-4, LoRA + KD, bf16, 16 x 1024) scaled by FLOPs per token: at the
  achieved FLOP/s of that run (a launch-bound 135M model: a floor for bigger models) and at the FLOP/s the GPU
  reached while busy (the run's profile: busy 26% of the step), which bigger models approach.

Run: `python -m benchmarks.recipe_estimates` (about a minute on 2 CPU cores; writes
benchmarks/results/recipe_estimates.json).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import warnings
from pathlib import Path

import torch
from torch import nn

from benchmarks.common import RESULTS, report
from benchmarks.recipe_models import MODELS, REFERENCE

GIB = 2**30
CHUNK = 1024  # tokens per chunk of the fused loss (`--distillation.chunk_size` default)
LORA_R = 16
BACKPROP_DEPTH = 8  # the recipes' --backprop_depth (peak activations: k = 8 iterations with gradient)
MEAN = 8  # the recipes' --mean_recurrence_schedule.max_mean_rec
WARMUP = 0.25  # ... .warmup (linear ramp of the mean over the first quarter)
SEQ = 1024  # the recipes' --seq_len
MICRO_BATCH = 4  # sequences per GPU micro-batch in the memory table
GPU_GIB = 80 * 10**9 / GIB * 0.9  # an 80 GB H100 with 10% left for the CUDA context and fragmentation
TOKENS = 1e9  # token budget of the time estimates (GPU-hours per 1B tokens)
RECIPE_TOKENS = 5000 * 8 * 8 * 4 * SEQ  # docs/recipes.md: 5000 steps x 8 GPUs x batch 8 x accumulation 4 x 1024
BUSY_FRACTION = 0.26  # docs/benchmarks.md: profile of the bf16 H100 step, GPU busy 26% of the time
LOSS_CHUNK_TENSORS = 6.1  # fused loss extra memory in chunk-sized fp32 [chunk x V] tensors: 0.286 GiB measured at
# N = 8192, V = 49152, chunk 256 (benchmarks/results/kd_loss.json, fp32) = 6.1 x 256 x 49152 x 4 bytes


def build_config(spec: dict, num_hidden_layers: int | None = None):
    from transformers import AutoConfig

    kwargs = dict(spec["config"])
    if num_hidden_layers is not None:
        kwargs["num_hidden_layers"] = num_hidden_layers
    cfg = AutoConfig.for_model(spec["model_type"], **kwargs)
    cfg._attn_implementation = "sdpa"
    return cfg


def meta_models(spec: dict):
    """The source model and its looped conversion, both on the meta device (no memory, no weights)."""
    from transformers import AutoModelForCausalLM

    from loopfit.convert import parse_layout, to_looped

    cfg = build_config(spec)
    with torch.device("meta"):
        src = AutoModelForCausalLM.from_config(cfg)
        looped = to_looped(src, parse_layout(spec["layers"], cfg.num_hidden_layers),
                           untie_embeddings=spec.get("untie", False))  # fmt: skip
    return cfg, src, looped


def lora_parameters(looped: nn.Module, r: int = LORA_R) -> dict[str, int]:
    """LoRA parameters of `all-linear` (every nn.Linear but the LM head, the loop adapter included), r(in + out)
    each, by component (prelude, block, adapter, coda) and `total`."""
    dec = looped.model
    out = {}
    for name in ("prelude", "block", "adapter", "coda"):
        mods = getattr(dec, name).modules()
        out[name] = sum(r * (m.in_features + m.out_features) for m in mods if isinstance(m, nn.Linear))
    out["total"] = sum(out.values())
    return out


# ---------------------------------------------------------------------------------- measured saved activations
def measure_activations(spec: dict, lora: bool, lengths=(100, 200)) -> dict:
    """Bytes autograd saves, by component (prelude, block, adapter, coda, other): per token per application, and the
    part that does not grow with tokens, split into once per module and once per application.

    A 3-layer copy of the model (layout 1-1-1, real layer shapes, vocabulary 512, uninitialised weights: only
    shapes matter), with the trainer's LoRA (its frozen base weights stored in bf16, as `loopfit.train.frozen` stores
    them in a bf16 run) or every parameter trainable, with a bf16 run's shared input casts (`loopfit.train.casts`:
    one saved bf16 copy of each linear input, not one per reading layer), runs the trainer's `Student` forward under
    bf16 autocast, batch 1: at `num_steps=(0, 2)` for both lengths (a line through the two gives bytes per token and
    the token-free part) and at `num_steps=(0, 1)` for the shorter (what one more loop iteration adds). The
    token-free part is the bf16 copies autocast makes of float32 weights: a trainable weight's is cached once per
    forward (a frozen float32 weight's would be saved at every use; stored in bf16, a frozen weight is saved as
    itself, a parameter). The prelude here is one layer, the first: its input needs no gradient, so it saves less
    than a later prelude layer, which saves what a block layer does.
    """
    from transformers import AutoModelForCausalLM

    from loopfit.convert import layout_from_sizes, to_looped
    from loopfit.train.casts import share_input_casts
    from loopfit.train.config import LoRAConfig
    from loopfit.train.frozen import store_frozen_linears
    from loopfit.train.student import Student, apply_lora

    small = {**spec, "config": {**spec["config"], "vocab_size": 512}}
    cfg = build_config(small, num_hidden_layers=3)
    with torch.device("meta"):
        src = AutoModelForCausalLM.from_config(cfg)
        looped = to_looped(src, layout_from_sizes(3, 1, 1, 1))
    looped = looped.to_empty(device="cpu")
    if lora:
        looped = apply_lora(looped, LoRAConfig(enabled=True, r=LORA_R, lora_alpha=2 * LORA_R))
        store_frozen_linears(looped, None)
    share_input_casts(looped)  # as a bf16 run: one saved bf16 copy of each linear input (`loopfit.train.casts`)
    student = Student(looped).train()
    dec = (looped.get_base_model() if lora else looped).model
    parts = {"prelude": list(dec.prelude), "block": list(dec.block), "coda": list(dec.coda), "adapter": [dec.adapter]}
    names = (*parts, "other")
    where = ["other"]

    def enter(name: str):
        def hook(*_):
            where.append(name)

        return hook

    def leave(*_):
        where.pop()

    hooks = []
    for name, mods in parts.items():
        for m in mods:
            hooks += [m.register_forward_pre_hook(enter(name)), m.register_forward_hook(leave)]
    param_ptrs = {p.untyped_storage().data_ptr() for p in student.parameters()}
    quadratic: set = set()

    def saved(length: int, k: int) -> dict[str, int]:
        seen: dict[int, tuple[str, int]] = {}

        def pack(t):
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in param_ptrs and ptr not in seen:
                seen[ptr] = (where[-1], storage.nbytes())
                if t.dim() >= 2 and t.shape[-1] == length and t.shape[-2] == length:
                    quadratic.add(tuple(t.shape))  # an attention matrix kept: memory would grow with T^2
            return t

        ids = torch.randint(0, 512, (1, length))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
            keep = student(ids, num_steps=(0, k))
        del keep
        sums = dict.fromkeys(names, 0)
        for name, nbytes in seen.values():
            sums[name] += nbytes
        return sums

    (a, b), k = lengths, 2
    sa, sb, s1 = saved(a, k), saved(b, k), saved(a, 1)
    for h in hooks:
        h.remove()
    res = {}
    for n in names:
        looping = n in ("block", "adapter")
        times = k if looping else 1
        per_tok = (sb[n] - sa[n]) / (b - a) / times
        fixed = sa[n] - per_tok * a * times  # token-free bytes at k applications
        per_app = (sa[n] - s1[n]) - per_tok * a if looping else 0.0  # what one more application adds
        res[n] = {"per_token": per_tok, "fixed_per_application": per_app, "fixed_once": fixed - times * per_app}
    res["quadratic_tensors"] = sorted(quadratic)
    return res


def activation_bytes(a: dict, n_p: int, n_b: int, n_c: int, k: int) -> tuple[float, float]:
    """(bytes per token, token-free bytes) autograd keeps for a layout `n_p`-`n_b`-`n_c` at backprop depth `k`,
    from `measure_activations`: the first prelude layer as measured, later prelude layers like a block layer run
    once, each coda layer as measured, the block layers and the adapter `k` times."""
    blk, ada, pre, coda, other = a["block"], a["adapter"], a["prelude"], a["coda"], a["other"]
    per_tok = (pre["per_token"] + (n_p - 1) * blk["per_token"] + n_c * coda["per_token"]
               + k * (n_b * blk["per_token"] + ada["per_token"]) + other["per_token"])  # fmt: skip
    fixed = (pre["fixed_once"] + (n_p - 1) * (blk["fixed_once"] + blk["fixed_per_application"])
             + n_c * coda["fixed_once"] + n_b * (blk["fixed_once"] + k * blk["fixed_per_application"])
             + ada["fixed_once"] + k * ada["fixed_per_application"] + other["fixed_once"])  # fmt: skip
    return per_tok, fixed


# ----------------------------------------------------------------------------------------------- the estimates
def estimate(spec: dict, acts: dict | None) -> dict:
    from loopfit.flops import (
        Curriculum,
        count_parameters,
        head_matmul_params,
        inference_flops_per_token,
        training_flops,
    )
    from loopfit.train.frozen import frozen_linear_weights

    cfg, src, looped = meta_models(spec)
    sp, p = count_parameters(src), count_parameters(looped)
    # The teacher's linear weights a bf16 run stores in bf16 (`loopfit.train.frozen`'s rule: its untied head
    # included, a head tied to the embeddings not), shared under LoRA with the student's frozen base weights.
    src.requires_grad_(False)  # a frozen teacher, as in training; `to_looped` shares no parameter with it
    sp_linear = sum(t.numel() for t in frozen_linear_weights(looped, src))
    head, src_head = head_matmul_params(looped), head_matmul_params(src)
    n_teacher = sp["prelude"]  # the source's decoder layers (embeddings and head apart)
    lay = looped.config
    n_p, n_b, n_c = len(lay.prelude_layers), len(lay.block_layers), len(lay.coda_layers)
    # `loopfit count`'s training FLOPs: the sizes it reads (head = the LM head's matmul V x H, counted when tied)
    fp = {c: p[c] for c in ("prelude", "adapter", "block", "coda")} | {"head": head}
    cur = Curriculum(mean_recurrence=MEAN, backprop_depth=BACKPROP_DEPTH, shape="linear", warmup=WARMUP)
    tf = training_flops(fp, TOKENS, cur)
    at_mean = training_flops(fp, TOKENS, Curriculum(MEAN, BACKPROP_DEPTH, shape="none"))  # the final mean, constant
    n_end, k_end = at_mean["mean_num_steps_no_grad"], at_mean["mean_num_steps_grad"]
    n_lora = lora_parameters(looped)
    pl = {c: p[c] + n_lora[c] for c in ("prelude", "block", "adapter", "coda")}
    it = pl["block"] + pl["adapter"]  # one loop iteration

    def step_flops(n: float, k: float) -> float:
        """The LoRA + KD step per token as benchmarks/train_throughput.py counts it: 6 N1 + 2 N2 (adapter and
        LoRA products included), the student head's forward and input gradient (4VH), the teacher's forward with
        its head (2(N_teacher + VH))."""
        return 6 * (pl["prelude"] + k * it + pl["coda"]) + 2 * n * it + 4 * head + 2 * (n_teacher + src_head)

    step_avg = step_flops(tf["mean_num_steps_no_grad"], tf["mean_num_steps_grad"])
    row = {
        "model": spec["name"],
        "hf_id": spec["hf_id"],
        "family": cfg.model_type,
        "source_layers": cfg.num_hidden_layers,
        "layers": spec["layers"],
        "layout": f"{n_p}-{n_b}-{n_c}",
        "layout_note": spec["layout_note"],
        "untie_embeddings": spec.get("untie", False),
        "source_parameters": sp,
        "published_total": spec.get("published_total"),
        "parameters": p,
        "lora_parameters": n_lora,
        "head_matmul": head,
        "curriculum": dict(mean=MEAN, backprop_depth=BACKPROP_DEPTH, warmup=WARMUP, shape="linear", sampled=True),
        # loopfit count's numbers (loopfit.flops.training_flops over the curriculum, and at the final mean)
        "training_flops_per_token_count": tf["flops"] / TOKENS,
        "training_flops_per_token_at_mean": at_mean["flops"] / TOKENS,
        "expected_num_steps_avg": {"no_grad": tf["mean_num_steps_no_grad"], "grad": tf["mean_num_steps_grad"]},
        "expected_num_steps_at_mean": {"no_grad": n_end, "grad": k_end},
        "step_flops_per_token_avg": step_avg,
        "step_flops_per_token_at_mean": step_flops(n_end, k_end),
        "inference_flops_per_token": {r: inference_flops_per_token(p, r, head) for r in (1, 2, 4, 8, 16, 32)},
        "source_inference_flops_per_token": inference_flops_per_token(sp, 1, src_head),
    }
    # KV cache: K and V of every attention application kept, bf16 (2 bytes; an fp32 model doubles it)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_layer = 2 * cfg.num_key_value_heads * head_dim * 2
    row["kv_bytes_per_token_per_layer"] = kv_layer
    row["kv_bytes_per_token"] = {
        "source": kv_layer * cfg.num_hidden_layers,
        "compress": kv_layer * (n_p + n_b + n_c),
        **{f"full_R{r}": kv_layer * (n_p + r * n_b + n_c) for r in (1, 4, 8, 32)},
    }
    if "sliding_attention" in (getattr(cfg, "layer_types", None) or []):
        kept = lay.prelude_layers + lay.block_layers + lay.coda_layers
        row["sliding_layers"] = {
            "window": cfg.sliding_window,
            "prelude": sum(cfg.layer_types[i] == "sliding_attention" for i in lay.prelude_layers),
            "block": sum(cfg.layer_types[i] == "sliding_attention" for i in lay.block_layers),
            "coda": sum(cfg.layer_types[i] == "sliding_attention" for i in lay.coda_layers),
            "kept": len(kept),
        }
    if acts is not None:
        row["memory"] = memory(cfg, acts, n_p, n_b, n_c, p, sp, sp_linear, n_lora["total"])
    return row


def memory(cfg, acts: dict, n_p: int, n_b: int, n_c: int, p: dict, sp: dict, sp_linear: int, n_lora: int) -> dict:
    """GiB per GPU (no sharding): weights as loopfit holds them under `--precision bf16` (float32, but the source's
    `sp_linear` linear weights in bf16: the teacher's, shared with a LoRA student's frozen base), trainable
    state (fp32 parameter + gradient + AdamW m and v = 16 bytes each), saved activations at k = 8 (measured
    coefficients) and the fused loss's chunk working set; with gradient checkpointing an estimate."""
    loss = LOSS_CHUNK_TENSORS * CHUNK * cfg.vocab_size * 4 / GIB
    out = {"loss_chunk_gib": loss, "micro_batch": f"{MICRO_BATCH} x {SEQ}", "backprop_depth": BACKPROP_DEPTH}
    for mode in ("lora", "full"):
        a = acts[mode]
        per_tok, fixed = activation_bytes(a, n_p, n_b, n_c, BACKPROP_DEPTH)
        if mode == "lora":  # frozen student weights are shared with the (same-source) online teacher
            # share_teacher_weights; an untied head shares the tied one
            weights = 4 * (sp["total"] + p["adapter"]) - 2 * sp_linear
            trainable = n_lora
        else:
            weights = 4 * (sp["total"] + p["total"]) - 2 * sp_linear  # the student fp32, the teacher's linears bf16
            trainable = p["total"]
        static = (weights + 16 * trainable + fixed) / GIB + loss
        seq_gib = per_tok * SEQ / GIB
        # gradient checkpointing (estimate): each checkpointed decoder layer keeps its fp32 input (4 H bytes per
        # token); the adapter and the rest are not checkpointed; backward rebuilds one layer at a time
        layers = n_p + n_c + BACKPROP_DEPTH * n_b
        blk, ada = a["block"], a["adapter"]
        ck_tok = (layers * 4 * cfg.hidden_size + BACKPROP_DEPTH * ada["per_token"] + a["other"]["per_token"]
                  + blk["per_token"])  # fmt: skip
        ck_fixed = (ada["fixed_once"] + BACKPROP_DEPTH * ada["fixed_per_application"] + blk["fixed_once"]
                    + blk["fixed_per_application"] + (2 * p["total"] if mode == "full" else 0))  # fmt: skip
        ck_static = (weights + 16 * trainable + ck_fixed) / GIB + loss
        ck_seq = ck_tok * SEQ / GIB
        out[mode] = {
            "weights_gib": weights / GIB,
            "trainable_parameters": trainable,
            "optimizer_and_grads_gib": 16 * trainable / GIB,
            "activation_bytes_per_token": per_tok,
            "activation_fixed_gib": fixed / GIB,
            "activations_per_sequence_gib": seq_gib,
            "total_gib": static + MICRO_BATCH * seq_gib,
            "max_sequences_80gb": max(0, math.floor((GPU_GIB - static) / seq_gib)),
            "checkpointing": {
                "activation_bytes_per_token": ck_tok,
                "activations_per_sequence_gib": ck_seq,
                "total_gib": ck_static + MICRO_BATCH * ck_seq,
                "max_sequences_80gb": max(0, math.floor((GPU_GIB - ck_static) / ck_seq)),
            },
        }
    return out


def reference_rate(path: Path) -> dict:
    """The measured H100 bf16 looped step (train_throughput_cuda.json) and the FLOP/s it stands for."""
    data = json.loads(path.read_text())
    row = next(r for r in data["rows"] if r["precision"] == "bf16" and r["system"].startswith("loopfit"))
    achieved = row["gflop_per_token"] * 1e9 * row["tokens_per_s"]
    return {
        "file": str(path),
        "gpu": data["meta"].get("cuda"),
        "batch": data["meta"].get("batch"),
        "tokens_per_s": row["tokens_per_s"],
        "flops_per_token": row["gflop_per_token"] * 1e9,
        "achieved_flops": achieved,
        "busy_flops": achieved / BUSY_FRACTION,
        "peak_flops": row["peak_gflops"] * 1e9,
    }


def check_reference(rate: dict) -> float:
    """FLOPs per token of the benchmark's step (R = 4, all under gradient), recomputed with this script's
    accounting on a meta SmolLM2-135M: it must equal the benchmark's own figure."""
    from loopfit.flops import count_parameters, head_matmul_params

    _, src, looped = meta_models(REFERENCE)
    p, sp = count_parameters(looped), count_parameters(src)
    p = {c: p[c] + n for c, n in lora_parameters(looped).items() if c != "total"}  # the benchmark counts LoRA's
    head = head_matmul_params(looped)
    f = 6 * (p["prelude"] + 4 * (p["adapter"] + p["block"]) + p["coda"]) + 4 * head + 2 * (sp["prelude"] + head)
    if abs(f - rate["flops_per_token"]) > 1e-6 * f:
        raise SystemExit(f"FLOP accounting differs from the benchmark's: {f} vs {rate['flops_per_token']}")
    return f


def add_time(row: dict, rate: dict) -> None:
    f = row["step_flops_per_token_avg"]
    lo, hi = rate["achieved_flops"] / f, rate["busy_flops"] / f
    row["time"] = {
        "tokens_per_s_floor": lo,
        "tokens_per_s_busy": hi,
        "gpu_hours_per_1b_tokens": [TOKENS / hi / 3600, TOKENS / lo / 3600],
        "recipe_tokens": RECIPE_TOKENS,
        "recipe_hours_8_gpus": [RECIPE_TOKENS / hi / 3600 / 8, RECIPE_TOKENS / lo / 3600 / 8],
    }


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def markdown(data: dict) -> str:
    """The tables of docs/recipes.md, from a results JSON of this script."""
    ms = data["models"]
    g = 1e9
    out = []
    rows = []
    for m in ms:
        p, sp = m["parameters"], m["source_parameters"]
        emb_head = p["embeddings"] + p["head"]
        rows.append([
            m["model"], m["source_layers"], m["layout"], f"`{m['layers']}`", f"{sp['total'] / 1e6:,.1f}",
            f"{p['total'] / 1e6:,.1f}", f"{p['prelude'] / 1e6:.1f} / {p['block'] / 1e6:.1f} / {p['coda'] / 1e6:.1f}",
            f"{p['adapter'] / 1e6:.2f}", f"{emb_head / 1e6:.1f}", f"{m['lora_parameters']['total'] / 1e6:.2f}",
        ])  # fmt: skip
    out.append(_table(["model", "layers", "layout", "`--layers`", "source params (M)", "looped params (M)",
                       "prelude / block / coda (M)", "adapter (M)", "embeddings + head (M)", "LoRA r=16 (M)"],
                      rows))  # fmt: skip
    rows = []
    for m in ms:
        inf = m["inference_flops_per_token"]
        rows.append([
            m["model"], f"{m['training_flops_per_token_count'] / g:.2f}",
            f"{m['training_flops_per_token_at_mean'] / g:.2f}",
            f"{m['step_flops_per_token_avg'] / g:.2f}", f"{m['source_inference_flops_per_token'] / g:.2f}",
            " / ".join(f"{inf[str(r)] / g:.2f}" for r in (1, 2, 4, 8, 16, 32)),
        ])  # fmt: skip
    out.append(_table(["model", "train GFLOP/token, `loopfit count` (curriculum average)", "... at the final mean 8",
                       "LoRA + KD step GFLOP/token (time basis)", "source model, inference GFLOP/token",
                       "looped, inference GFLOP/token at R = 1 / 2 / 4 / 8 / 16 / 32"], rows))  # fmt: skip
    rows = []
    for m in ms:
        mem = m["memory"]
        lo, fu = mem["lora"], mem["full"]
        rows.append([
            m["model"], f"{lo['weights_gib']:.1f}", f"{mem['loss_chunk_gib']:.1f}", f"{lo['activation_fixed_gib']:.1f}",
            f"{lo['activations_per_sequence_gib']:.2f}", f"{lo['total_gib']:.1f}", lo["max_sequences_80gb"],
            f"{lo['checkpointing']['total_gib']:.1f}", lo["checkpointing"]["max_sequences_80gb"],
            f"{fu['weights_gib'] + fu['optimizer_and_grads_gib']:.1f}", f"{fu['total_gib']:.1f}",
            fu["max_sequences_80gb"],
            f"{fu['checkpointing']['total_gib']:.1f}", fu["checkpointing"]["max_sequences_80gb"],
        ])  # fmt: skip
    out.append(_table(["model", "LoRA: weights", "loss chunk", "activations, fixed", "activations per sequence",
                       "total at 4 x 1024", "max sequences", "ckpt: total at 4 x 1024", "ckpt: max sequences",
                       "full FT: weights + AdamW state", "total at 4 x 1024", "max sequences",
                       "ckpt: total at 4 x 1024", "ckpt: max sequences"], rows))  # fmt: skip
    rows = []
    for m in ms:
        kv = m["kv_bytes_per_token"]
        rows.append([m["model"], f"{m['kv_bytes_per_token_per_layer'] / 1024:.1f}", f"{kv['source'] / 1024:.0f}",
                     f"{kv['compress'] / 1024:.0f}", f"{kv['full_R4'] / 1024:.0f}", f"{kv['full_R8'] / 1024:.0f}",
                     f"{kv['full_R32'] / 1024:.0f}"])  # fmt: skip
    out.append(_table(["model", "per layer", "source model", "looped, `compress` (any R)", "`full`, R = 4", "R = 8",
                       "R = 32"], rows))  # fmt: skip
    rows = []
    for m in ms:
        t = m["time"]
        rows.append([
            m["model"], f"{m['step_flops_per_token_avg'] / g:.1f}",
            f"{t['tokens_per_s_floor']:,.0f} - {t['tokens_per_s_busy']:,.0f}",
            f"{t['gpu_hours_per_1b_tokens'][0]:.0f} - {t['gpu_hours_per_1b_tokens'][1]:.0f}",
            f"{t['recipe_hours_8_gpus'][0]:.1f} - {t['recipe_hours_8_gpus'][1]:.1f}",
        ])  # fmt: skip
    out.append(_table(["model", "step GFLOP/token", "tokens/s per H100 (floor - busy)", "H100-hours per 1B tokens",
                       "hours on 8 x H100 for 1.31B tokens"], rows))  # fmt: skip
    return "\n\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=None, help="names to estimate (default: all)")
    ap.add_argument("--skip_activations", action="store_true", help="no CPU measurement, no memory estimates")
    ap.add_argument("--rate", default=str(RESULTS / "train_throughput_cuda.json"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    ap.add_argument("--markdown", action="store_true", help="print the tables of docs/recipes.md from the JSON")
    args = ap.parse_args()
    if args.markdown:
        print(markdown(json.loads(Path(args.out or RESULTS / "recipe_estimates.json").read_text())))
        return
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import loopfit  # noqa: F401  (registers the looped model)

    rate = reference_rate(Path(args.rate))
    rate["check_flops_per_token"] = check_reference(rate)
    specs = {s["name"]: s for s in MODELS}
    for s in MODELS:
        if "same_as" in s:
            s.update({k: v for k, v in specs[s["same_as"]].items() if k not in s and k != "name"})
    chosen = [s for s in MODELS if args.models is None or s["name"] in args.models]
    rows, acts_by_arch = [], {}
    for spec in chosen:
        arch = spec.get("same_as", spec["name"])
        if not args.skip_activations and arch not in acts_by_arch:
            acts_by_arch[arch] = {"lora": measure_activations(spec, lora=True),
                                  "full": measure_activations(spec, lora=False)}  # fmt: skip
        row = estimate(spec, acts_by_arch.get(arch))
        if arch in acts_by_arch:
            row["activation_measurement"] = copy.deepcopy(acts_by_arch[arch])
        add_time(row, rate)
        rows.append(row)
        print(f"{spec['name']}: done", flush=True)
    table = []
    for r in rows:
        p, m, t = r["parameters"], r.get("memory", {}), r["time"]
        table.append({
            "model": r["model"],
            "--layers": r["layers"],
            "source M": r["source_parameters"]["total"] / 1e6,
            "looped M": p["total"] / 1e6,
            "block M": p["block"] / 1e6,
            "train GF/tok (count)": r["training_flops_per_token_count"] / 1e9,
            "step GF/tok": r["step_flops_per_token_avg"] / 1e9,
            "inf GF/tok R1/R8/R32": "/".join(f"{r['inference_flops_per_token'][d] / 1e9:.2f}" for d in (1, 8, 32)),
            "KV KiB/tok cmp/R8": f"{r['kv_bytes_per_token']['compress'] / 1024:.0f}/"
                                 f"{r['kv_bytes_per_token']['full_R8'] / 1024:.0f}",
            "LoRA GiB @4x1024": m.get("lora", {}).get("total_gib"),
            "full GiB @4x1024": m.get("full", {}).get("total_gib"),
            "tok/s H100": f"{t['tokens_per_s_floor']:.0f}-{t['tokens_per_s_busy']:.0f}",
            "GPU-h/1B": f"{t['gpu_hours_per_1b_tokens'][0]:.1f}-{t['gpu_hours_per_1b_tokens'][1]:.1f}",
        })  # fmt: skip
    meta = {
        "what": "estimates from public config numbers (meta device), loopfit.flops, CPU-measured saved activations "
        "and the measured H100 rate of train_throughput_cuda.json (SmolLM2-135M); none of these models ran on a GPU",
        "reference_rate": rate,
        "seq_len": SEQ,
        "micro_batch": MICRO_BATCH,
        "backprop_depth": BACKPROP_DEPTH,
        "mean_recurrence": MEAN,
        "warmup": WARMUP,
        "tokens": TOKENS,
        "loss_chunk": CHUNK,
        "loss_chunk_tensors": LOSS_CHUNK_TENSORS,
        "gpu_budget_gib": GPU_GIB,
        "busy_fraction": BUSY_FRACTION,
    }
    path = report("recipe_estimates", table, meta, out=args.out)
    data = json.loads(path.read_text())
    data["models"] = rows
    from loopfit.io import write_json

    write_json(path, data)


if __name__ == "__main__":
    main()
