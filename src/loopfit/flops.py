"""Parameter counts by component, training FLOPs over the recurrence curriculum, inference FLOPs per token.

Training FLOPs per token are `train_flops_per_token` (arXiv:2511.07384's `6·N1 + 2·N2` plus the LM head, the
adapter, the fixed-point iteration, a live teacher and optionally the attention scores), integrated over the
expected depths of the trainer's `DepthSchedule`. Inference FLOPs per token are `2·(prelude + R·(adapter + block)
+ coda + head matmul)`, attention over the context left out (the `6·N·D` convention).
"""

from __future__ import annotations

import json as jsonlib
import math
from dataclasses import dataclass

import numpy as np
from torch import nn

from loopfit.errors import LoopfitError, check_count, check_number, check_output
from loopfit.evaluate import parse_depths
from loopfit.io import write_json
from loopfit.loading import load_model
from loopfit.models.families import family_of
from loopfit.plotting import pyplot, save_png
from loopfit.train.config import MeanRecurrenceSchedule
from loopfit.train.schedules import DepthSchedule

COMPONENTS = ("embeddings", "prelude", "adapter", "block", "relaxation", "coda", "final_norm", "head", "exit_gate")
CURRICULA = ("linear", "1-sqrt", "none")


def _modules(model: nn.Module) -> dict[str, list[nn.Module]]:
    """The modules of each component; a plain HF model's decoder layers count as the prelude (they run once)."""
    base = getattr(model, "get_base_model", lambda: model)()  # a PEFT wrapper counts its base model plus adapters
    head = [base.get_output_embeddings()]
    if base.config.model_type == "looped":
        dec = base.model
        parts = {"prelude": [dec.prelude], "adapter": [dec.adapter], "block": [dec.block], "coda": [dec.coda]}
        parts["relaxation"] = [dec.relaxation] if dec.relaxation is not None else []  # per-iteration deltas
        # The exit gate (models/exit_gate.py) is counted but left out of the FLOPs: H (or H·width) MACs an iteration.
        gate = [dec.exit_gate] if dec.exit_gate is not None else []
        return {"embeddings": [dec.embed_tokens], **parts, "final_norm": [dec.norm], "head": head, "exit_gate": gate}
    try:
        family = family_of(base.config)
    except ValueError as e:
        raise LoopfitError(str(e)) from None
    parts = {"prelude": [family.layers(base)], "adapter": [], "block": [], "relaxation": [], "coda": []}
    return {"embeddings": [family.embedding(base)], **parts, "final_norm": [family.final_norm(base)], "head": head,
            "exit_gate": []}  # fmt: skip


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Parameters by component, each tensor counted once (a head tied to the embeddings counts 0), plus `total`."""
    seen: set[int] = set()
    counts = {}
    for name, mods in _modules(model).items():
        n = 0
        for mod in mods:
            for p in mod.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    n += p.numel()
        counts[name] = n
    rest = sum(p.numel() for p in model.parameters() if id(p) not in seen)
    if rest:
        raise LoopfitError(f"{rest} parameters belong to no known component of this model")
    counts["total"] = sum(counts[c] for c in COMPONENTS)
    # A relaxed loop runs one of its L deltas per iteration: what one iteration adds to the block's weights.
    base = getattr(model, "get_base_model", lambda: model)()
    counts["relaxation_per_iteration"] = counts["relaxation"] // max(
        getattr(getattr(base, "model", None), "num_relaxed", 0), 1
    )
    return counts


def attention_widths(model: nn.Module) -> dict[str, int]:
    """Query width `heads x head_dim` summed over each component's attention layers (the `L·H·Q` of the attention
    scores' FLOPs): `{"prelude", "block", "coda"}`; a plain model's layers count as the prelude."""
    base = getattr(model, "get_base_model", lambda: model)()
    conf = base.config.base_config if base.config.model_type == "looped" else base.config
    heads = conf.num_attention_heads
    width = heads * (getattr(conf, "head_dim", None) or conf.hidden_size // heads)
    mods = _modules(model)
    return {c: width * sum(len(m) for m in mods[c]) for c in ("prelude", "block", "coda")}


def flop_params(model: nn.Module, teacher: nn.Module | None = None) -> dict[str, int]:
    """What training FLOPs per token scale with (`train_flops_per_token`'s `p`): weights per token of `prelude`,
    `adapter`, `block` (one loop iteration is adapter + block), `coda`; `head`, the LM head's matmul V·H (counted
    when tied); `attn_prelude` / `attn_block` / `attn_coda` (`attention_widths`); with a live teacher, `teacher`
    (its decoder layers), `teacher_head` and `attn_teacher`."""
    p = count_parameters(model)
    out = {c: p[c] for c in ("prelude", "adapter", "block", "coda")} | {"head": head_matmul_params(model)}
    out["block"] += p["relaxation_per_iteration"]
    out |= {f"attn_{c}": w for c, w in attention_widths(model).items()}
    if teacher is not None:
        t = count_parameters(teacher)
        out["teacher"] = t["prelude"] + t["block"] + t["coda"]
        out["teacher_head"] = head_matmul_params(teacher)
        out["attn_teacher"] = sum(attention_widths(teacher).values())
    return out


def train_flops_per_token(
    p: dict[str, float],
    n_no_grad: float,
    k_grad: float,
    seq_len: int = 0,
    fixed_point: bool = False,
    teacher: bool = False,
    depths: float = 1,
    forward_only: bool = False,
) -> float:
    """Training FLOPs per token of one step at depth `(n_no_grad, k_grad)`: forward and backward of the student,
    plus the live teacher's forward. The one count behind MFU, the sweep's budget and `loopfit count`.

    arXiv:2511.07384's `6·N1 + 2·N2` (2 FLOPs per weight forward, 4 more backward, forward only in the no-grad
    iterations), one loop iteration being adapter + block, plus the terms the paper leaves out:

        g  = k_grad + fixed_point            (the fixed-point loss runs one more iteration, with gradient)
        N1 = prelude + g·(adapter + block) + coda + head      N2 = n_no_grad·(adapter + block)
        F  = 6·N1 + 2·N2 + seq_len·(12·(A_prelude + g·A_block + A_coda) + 4·n_no_grad·A_block)
             + teacher: 2·(N_teacher + V·H_teacher) + 4·seq_len·A_teacher
             + (depths - 1)·(6·(coda + head) + 12·seq_len·A_coda)

    The last line is the loss at every depth (`--every_depth.k`): each depth scored besides the final one runs the
    coda and the head forward and backward once more (counted whole even when its state came from an iteration
    without gradient, whose backward stops at the coda's input); the teacher's logits are computed once.
    `head` is the LM head's matmul V·H over every token (tied or not). The attention scores (Q·Kᵀ and A·V,
    4·T·A forward per token and layer, A = query heads x head_dim) are counted over the full T x T, as torch's
    flop counter and PaLM's `12·L·H·Q·T` do, neither halved for the causal mask nor cut to a sliding window;
    `seq_len=0` leaves them out (the `6·N·D` convention). Weight gradients are counted for every weight on the
    gradient path, frozen (LoRA) or not, as in the paper: the work a LoRA step does is lower (about 4 per frozen
    weight, plus LoRA's own small matmuls). Not counted: embeddings (a lookup), norms, rotary and other
    elementwise work, the loss's softmax, the hidden-state loss's projection, recomputation; a mixture-of-experts
    layer counts all its experts, not the routed ones. Against
    `torch.utils.flop_counter` on a tiny looped model (tests/test_depth_schedule.py) it is within 0.4%.

    Args:
        p: sizes from `flop_params` (missing keys count 0).
        n_no_grad, k_grad: loop iterations without / with gradient (expectations are fine: F is linear in both);
            0, 0 for a plain model.
        seq_len: tokens per sequence T for the attention term; 0 leaves it out.
        fixed_point: `--fixed_point_scale > 0`.
        teacher: a live teacher runs (KD without a teacher cache).
        depths: depths the loss scores, `min(k, R)` of the loss at every depth (an expectation is fine); 1: the
            final one only.
        forward_only: the exit gate's stage (`--exit_gate.train`): the model is frozen and runs forward only, all
            `n_no_grad + k_grad` iterations and the coda + head at each of `depths` (the 2·N and 4·T·A terms alone;
            the gate's own H FLOPs per iteration are left out).

    Returns:
        FLOPs per token.
    """
    t = seq_len
    if forward_only:
        r, it = n_no_grad + k_grad, p.get("adapter", 0) + p.get("block", 0)
        coda = 2 * (p.get("coda", 0) + p.get("head", 0)) + 4 * t * p.get("attn_coda", 0)
        f = 2 * (p.get("prelude", 0) + r * it) + 4 * t * (p.get("attn_prelude", 0) + r * p.get("attn_block", 0))
        f += depths * coda + (2 * (p.get("teacher", 0) + p.get("teacher_head", 0)) + 4 * t * p.get("attn_teacher", 0)
                              if teacher else 0)  # fmt: skip
        return float(f)
    g = k_grad + (1 if fixed_point else 0)
    it, a_it = p.get("adapter", 0) + p.get("block", 0), p.get("attn_block", 0)
    n1 = p.get("prelude", 0) + g * it + p.get("coda", 0) + p.get("head", 0)
    f = 6 * n1 + 2 * n_no_grad * it
    f += t * (12 * (p.get("attn_prelude", 0) + g * a_it + p.get("attn_coda", 0)) + 4 * n_no_grad * a_it)
    if teacher:
        f += 2 * (p.get("teacher", 0) + p.get("teacher_head", 0)) + 4 * t * p.get("attn_teacher", 0)
    f += (depths - 1) * (6 * (p.get("coda", 0) + p.get("head", 0)) + 12 * t * p.get("attn_coda", 0))
    return float(f)


@dataclass
class Curriculum:
    """Recurrence curriculum of a training run as `loopfit count` takes it (`schedule` turns it into the trainer's
    `DepthSchedule`)."""

    mean_recurrence: float = 8
    """Final (maximum) mean recurrence."""
    backprop_depth: int = 8
    """Iterations run with gradient (at most)."""
    shape: str = "linear"
    """Ramp of the mean: `linear`, `1-sqrt` or `none` (constant)."""
    warmup: float = 0.25
    """Fraction of training over which the mean ramps from 1 to `mean_recurrence`."""
    sampled: bool = True
    """Use the expected depths under the Poisson-lognormal sampler; False: nominal R = mean."""
    min_num_steps: int = 1
    """Floor of the sampled depth (`--min_num_steps`)."""

    def validate(self) -> None:
        if self.shape not in CURRICULA:
            raise LoopfitError(f"curriculum shape must be one of {', '.join(CURRICULA)}, got '{self.shape}'")
        if self.mean_recurrence < 1 or self.backprop_depth < 1 or self.min_num_steps < 1:
            raise LoopfitError("--mean_recurrence, --backprop_depth and --min_num_steps must be >= 1")
        if not 0 <= self.warmup <= 1:
            raise LoopfitError(f"--warmup must be in [0, 1], got {self.warmup}")

    def schedule(self, total_steps: int) -> DepthSchedule:
        """The `DepthSchedule` of a run of `total_steps` steps following this curriculum (the mean is `ceil`ed)."""
        ramp_on = self.shape != "none"
        mean = MeanRecurrenceSchedule(ramp_on, self.warmup, self.shape if ramp_on else "linear", self.mean_recurrence)
        return DepthSchedule(total_steps, math.ceil(self.mean_recurrence), self.backprop_depth, mean,
                             min_num_steps=self.min_num_steps, sampled=self.sampled)  # fmt: skip


def training_flops(
    params: dict[str, float],
    tokens: float,
    depth: Curriculum | DepthSchedule | None,
    points: int = 10_000,
    seq_len: int = 0,
    fixed_point: bool = False,
    teacher: bool = False,
    every_depth: int = 1,
) -> dict:
    """`train_flops_per_token` at the expected depths of `depth`, integrated over `tokens` training tokens (midpoint
    rule over `points` equal slices of training); `depth=None`: a plain model (no loop). `every_depth`: the loss at
    every depth's k (`DepthSchedule.supervised_depths_at`).

    Returns:
        `{"flops", "mean_num_steps_no_grad", "mean_num_steps_grad"}` (the last two averaged over training).

    Raises:
        LoopfitError: a bad `Curriculum`.
    """
    if isinstance(depth, Curriculum):
        depth.validate()
        depth = depth.schedule(points)
    if depth is None:
        n = k = np.zeros(1)
        sup = np.ones(1)
    else:
        steps = depth.midpoints(points)
        k = np.array([depth.gradient_depth_at(s) for s in steps])
        n = np.array([depth.expected_depth_at(s) for s in steps]) - k
        sup = np.array([depth.supervised_depths_at(s, every_depth) for s in steps])
    per_token = [train_flops_per_token(params, a, b, seq_len, fixed_point, teacher, c) for a, b, c in zip(n, k, sup)]
    return {
        "flops": float(tokens * np.mean(per_token)),
        "mean_num_steps_no_grad": float(n.mean()),
        "mean_num_steps_grad": float(k.mean()),
    }


def inference_flops_per_token(params: dict[str, int], depth: int, head_matmul: int) -> float:
    """Forward FLOPs per token at depth R (weights only): `2·(prelude + R·(adapter + block) + coda + head)`."""
    block = params["block"] + params.get("relaxation_per_iteration", 0)
    return 2.0 * (params["prelude"] + depth * (params["adapter"] + block) + params["coda"] + head_matmul)


def head_matmul_params(model: nn.Module) -> int:
    """Multiply-adds per token of the LM head (counted even when its weight is tied to the embeddings)."""
    return _modules(model)["head"][0].weight.numel()


def plot_vs_flops(results: dict, flops: list[float], path: str, baseline_flops: float | None = None) -> None:
    """Accuracy (gsm8k JSON) or loss (depth-sweep JSON) against inference FLOPs per token, one point per depth."""
    plt = pyplot()

    key = "accuracy" if "accuracy" in results else "loss"
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(flops, results[key], "o-", label="looped")
    for x, y, r in zip(flops, results[key], results["depths"]):
        ax.annotate(f"R={r}", (x, y), textcoords="offset points", xytext=(3, 3), fontsize=8)
    base = results.get(f"baseline_{key}")
    if base is not None and baseline_flops is not None:
        ax.plot([baseline_flops], [base], "s", color="C3", label="baseline")
    elif base is not None:
        ax.axhline(base, color="C3", ls="--", label="baseline")
    xs = list(flops) + ([baseline_flops] if baseline_flops else [])
    if max(xs) > 10 * min(xs):  # a log axis only where it spans a decade; short ones get crowded tick labels
        ax.set_xscale("log")
    ax.set_xlabel("inference FLOPs per token")
    ax.set_ylabel(key)
    ax.legend()
    save_png(fig, path)


def count_command(
    model: str,
    mean_recurrence: float | None = None,
    backprop_depth: int = 8,
    tokens: float = 1e9,
    curriculum: str = "linear",
    warmup: float = 0.25,
    sampled: bool = True,
    min_num_steps: int = 1,
    seq_len: int = 0,
    fixed_point: bool = False,
    depths: list[int] | str | None = None,
    results: str | None = None,
    baseline: str | None = None,
    json: str | None = None,
    plot: str | None = None,
) -> None:
    """Count parameters by component and estimate training and inference FLOPs of a (looped or plain) model.

    Args:
        model: model folder, hub id, .gguf file or `smollm2-135m`.
        mean_recurrence: final mean recurrence of the training curriculum (default: the model's mean_recurrence).
        backprop_depth: iterations run with gradient in training (at most).
        tokens: training tokens D.
        curriculum: ramp of the mean recurrence: `linear`, `1-sqrt` or `none`.
        warmup: fraction of training over which the mean ramps from 1 to --mean_recurrence.
        sampled: integrate the expected depths of the Poisson-lognormal sampler (E[R] = mean + 1); false: R = mean.
        min_num_steps: floor of the sampled depth in training (as `loopfit train --min_num_steps`).
        seq_len: tokens per training sequence; counts the attention scores' FLOPs (0: left out, the 6·N·D rule).
        fixed_point: training runs the fixed-point loss (`--fixed_point_scale > 0`): one more iteration with grad.
        depths: depths at which to report inference FLOPs per token (default 1,2,4,8,16,32,64, or those of --results).
        results: a depth-sweep or gsm8k JSON to plot against FLOPs (needs --plot).
        baseline: a plain model whose inference FLOPs per token are reported (and plotted) beside the looped ones.
        json: write the counts and FLOPs here.
        plot: PNG of accuracy (or loss) from --results against inference FLOPs per token.
    """

    if plot is not None and results is None:
        raise LoopfitError("--plot needs --results (a depth-sweep or gsm8k JSON)")
    # Checked before the model loads (Curriculum.validate checks again once the model's default mean is known).
    if curriculum not in CURRICULA:
        raise LoopfitError(f"--curriculum must be one of {', '.join(CURRICULA)}, got '{curriculum}'")
    check_number("mean_recurrence", mean_recurrence, low=1)
    check_count("backprop_depth", backprop_depth)
    check_number("tokens", tokens, low=0, low_open=True)
    check_number("warmup", warmup, 0, 1)
    check_count("min_num_steps", min_num_steps)
    check_count("seq_len", seq_len, 0)
    if depths is not None:
        parse_depths(depths, [])
    check_output("json", json)
    check_output("plot", plot)
    res = None
    if results is not None:
        try:
            with open(results, encoding="utf-8") as f:
                res = jsonlib.load(f)
            parse_depths(res["depths"], [])
        except (OSError, ValueError, KeyError, TypeError) as e:  # UnicodeDecodeError is a ValueError
            raise LoopfitError(f"cannot read depths from results file {results}: {e}") from None
    lm = load_model(model)
    looped = lm.config.model_type == "looped"
    cur = Curriculum(
        mean_recurrence=mean_recurrence if mean_recurrence is not None else getattr(lm.config, "mean_recurrence", 1),
        backprop_depth=backprop_depth,
        shape=curriculum,
        warmup=warmup,
        sampled=sampled,
        min_num_steps=min_num_steps,
    )
    cur.validate()
    if tokens <= 0:
        raise LoopfitError(f"--tokens must be > 0, got {tokens}")
    depths = parse_depths(depths, res["depths"] if res else [1, 2, 4, 8, 16, 32, 64])
    params = count_parameters(lm)
    head = head_matmul_params(lm)
    flops = [inference_flops_per_token(params, r if looped else 1, head) for r in depths]
    out = {
        "model": model,
        "parameters": params,
        "tokens": tokens,
        "curriculum": vars(cur),
        "training": training_flops(
            flop_params(lm), tokens, cur if looped else None, seq_len=seq_len, fixed_point=fixed_point and looped
        ),
        "inference": {"depths": depths, "flops_per_token": flops},
    }
    base_flops = None
    if baseline is not None:
        b = load_model(baseline)
        bp = count_parameters(b)
        base_flops = inference_flops_per_token(bp, 1, head_matmul_params(b))
        out["baseline"] = {"model": baseline, "parameters": bp, "flops_per_token": base_flops}
    for name in COMPONENTS + ("total",):
        print(f"{name:>12}: {params[name]:,}")
    print(f"training FLOPs ({tokens:.3g} tokens): {out['training']['flops']:.4g}")
    for r, fl in zip(depths, flops):
        print(f"inference FLOPs/token at R={r}: {fl:.4g}")
    if json is not None:
        write_json(json, out)
    if plot is not None:
        res_flops = [inference_flops_per_token(params, r if looped else 1, head) for r in res["depths"]]
        plot_vs_flops(res, res_flops, plot, base_flops)
