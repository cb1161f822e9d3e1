"""Parameter counts by component, training FLOPs over the recurrence curriculum, inference FLOPs per token.

Training FLOPs follow arXiv:2511.07384: `6·D·N1 + 2·D·N2` with N1 = prelude + k·block + coda (parameters run with
gradient), N2 = n·block (no-grad iterations), D = tokens; embeddings, head and adapter are left out. Inference
FLOPs per token are `2·(prelude + R·(adapter + block) + coda + head matmul)`; attention over the context (which
grows with the sequence length) is left out of both, as in the `6·N·D` convention.
"""

from __future__ import annotations

import json as jsonlib
import math
from dataclasses import dataclass

import numpy as np
from torch import nn

from loopfit.errors import LoopfitError
from loopfit.models.families import family_of

COMPONENTS = ("embeddings", "prelude", "adapter", "block", "coda", "final_norm", "head")
CURRICULA = ("linear", "1-sqrt", "none")


def _modules(model: nn.Module) -> dict[str, list[nn.Module]]:
    """The modules of each component; a plain HF model's decoder layers count as the prelude (they run once)."""
    base = getattr(model, "get_base_model", lambda: model)()  # a PEFT wrapper counts its base model plus adapters
    head = [base.get_output_embeddings()]
    if base.config.model_type == "looped":
        dec = base.model
        parts = {"prelude": [dec.prelude], "adapter": [dec.adapter], "block": [dec.block], "coda": [dec.coda]}
        return {"embeddings": [dec.embed_tokens], **parts, "final_norm": [dec.norm], "head": head}
    try:
        family = family_of(base.config)
    except ValueError as e:
        raise LoopfitError(str(e)) from None
    parts = {"prelude": [family.layers(base)], "adapter": [], "block": [], "coda": []}
    return {"embeddings": [family.embedding(base)], **parts, "final_norm": [family.final_norm(base)], "head": head}


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
    return counts


def curriculum_mean(t: np.ndarray, max_mean: float, warmup: float, shape: str) -> np.ndarray:
    """Mean recurrence at training fraction(s) `t`: ramps 1 -> `max_mean` over `warmup`, `ceil` of the value."""
    if shape == "none" or warmup <= 0:
        return np.full_like(t, math.ceil(max_mean), dtype=float)
    x = np.clip(t / warmup, 0.0, 1.0)
    f = x if shape == "linear" else 1.0 - np.sqrt(1.0 - x)
    return np.ceil(1.0 + (max_mean - 1.0) * f)


def expected_steps(mean: float, backprop_depth: int, sampled: bool = True, min_steps: int = 1) -> tuple[float, float]:
    """Expected `(n_no_grad, k_grad)` per training step at curriculum mean `mean`.

    `sampled`: under the Poisson-lognormal sampler of `loopfit.models.sample_num_steps` (R = Poisson(rate) + 1,
    so E[R] = mean + 1, draws below `min_steps` raised to it), computed by Gauss-Hermite quadrature over the
    log-rate; otherwise the nominal `R = mean`, `k = min(backprop_depth, mean)`.
    """
    k_max = min(backprop_depth, max(1, math.ceil(mean)))
    if not sampled:
        k = min(k_max, mean)
        return max(mean - k, 0.0), float(k)
    sigma = 0.5
    mu = math.log(max(mean, 1e-6)) - sigma**2 / 2
    nodes, weights = np.polynomial.hermite_e.hermegauss(64)
    rates = np.exp(mu + sigma * nodes)
    weights = weights / weights.sum()
    j = np.arange(0, int(rates.max() * 3 + 50))
    log_pmf = j[None, :] * np.log(rates[:, None]) - rates[:, None] - np.array([math.lgamma(x + 1) for x in j])[None, :]
    pmf = (weights[:, None] * np.exp(log_pmf)).sum(0)  # P(Poisson = j), mixed over the rate
    r = np.maximum(j + 1, min_steps)
    e_k = float((pmf * np.minimum(k_max, r)).sum())
    e_r = float((pmf * r).sum())
    return e_r - e_k, e_k


@dataclass
class Curriculum:
    """Recurrence curriculum of a training run (the FLOPs integrate over it)."""

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

    def validate(self) -> None:
        if self.shape not in CURRICULA:
            raise LoopfitError(f"curriculum shape must be one of {', '.join(CURRICULA)}, got '{self.shape}'")
        if self.mean_recurrence < 1 or self.backprop_depth < 1:
            raise LoopfitError("--mean_recurrence and --backprop_depth must be >= 1")
        if not 0 <= self.warmup <= 1:
            raise LoopfitError(f"--warmup must be in [0, 1], got {self.warmup}")


def training_flops(params: dict[str, int], tokens: float, curriculum: Curriculum, points: int = 10_000) -> dict:
    """`6·D·N1 + 2·D·N2` integrated over the curriculum (midpoint rule over `points` equal slices of D)."""
    curriculum.validate()
    t = (np.arange(points) + 0.5) / points
    means = curriculum_mean(t, curriculum.mean_recurrence, curriculum.warmup, curriculum.shape)
    cache = {m: expected_steps(m, curriculum.backprop_depth, curriculum.sampled) for m in np.unique(means)}
    n = np.array([cache[m][0] for m in means])
    k = np.array([cache[m][1] for m in means])
    n1 = params["prelude"] + k * params["block"] + params["coda"]
    n2 = n * params["block"]
    d = tokens / points
    return {
        "flops": float((6 * d * n1 + 2 * d * n2).sum()),
        "mean_no_grad_steps": float(n.mean()),
        "mean_grad_steps": float(k.mean()),
    }


def inference_flops_per_token(params: dict[str, int], depth: int, head_matmul: int) -> float:
    """Forward FLOPs per token at depth R (weights only): `2·(prelude + R·(adapter + block) + coda + head)`."""
    return 2.0 * (params["prelude"] + depth * (params["adapter"] + params["block"]) + params["coda"] + head_matmul)


def head_matmul_params(model: nn.Module) -> int:
    """Multiply-adds per token of the LM head (counted even when its weight is tied to the embeddings)."""
    return _modules(model)["head"][0].weight.numel()


def plot_vs_flops(results: dict, flops: list[float], path: str, baseline_flops: float | None = None) -> None:
    """Accuracy (gsm8k JSON) or loss (depth-sweep JSON) against inference FLOPs per token, one point per depth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from loopfit.io import atomic_file

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
    fig.tight_layout()
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)


def count_command(
    model: str,
    mean_recurrence: float | None = None,
    backprop_depth: int = 8,
    tokens: float = 1e9,
    curriculum: str = "linear",
    warmup: float = 0.25,
    sampled: bool = True,
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
        depths: depths at which to report inference FLOPs per token (default 1,2,4,8,16,32,64, or those of --results).
        results: a depth-sweep or gsm8k JSON to plot against FLOPs (needs --plot).
        baseline: a plain model whose inference FLOPs per token are reported (and plotted) beside the looped ones.
        json: write the counts and FLOPs here.
        plot: PNG of accuracy (or loss) from --results against inference FLOPs per token.
    """
    from loopfit.errors import check_count, check_number, check_output
    from loopfit.evaluate import parse_depths
    from loopfit.io import write_json
    from loopfit.loading import load_model

    if plot is not None and results is None:
        raise LoopfitError("--plot needs --results (a depth-sweep or gsm8k JSON)")
    # Checked before the model loads (Curriculum.validate checks again once the model's default mean is known).
    if curriculum not in CURRICULA:
        raise LoopfitError(f"--curriculum must be one of {', '.join(CURRICULA)}, got '{curriculum}'")
    check_number("mean_recurrence", mean_recurrence, low=1)
    check_count("backprop_depth", backprop_depth)
    check_number("tokens", tokens, low=0, low_open=True)
    check_number("warmup", warmup, 0, 1)
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
        "training": training_flops(params, tokens, cur) if looped else {"flops": 6.0 * tokens * params["prelude"]},
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
