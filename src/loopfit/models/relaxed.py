"""Relaxed recursion: the shared block plus one low-rank delta per loop iteration (RRT, arXiv:2410.20672, section 3).

Mapping. The source layers strictly between the prelude and the coda (the middle) are cut into L groups, each as
long as the block (b layers); loop iteration i stands for group i, layer j of the block for layer j of the group.
With `align="end"` (the default) the groups end at the coda and the first `len(middle) mod b` middle layers, those
just after the prelude, fit no group and are dropped: the same layers today's `--prelude/--block/--coda` layout
drops (it puts the block just before the coda), so the last group is the block's own layers. `align="start"` drops
the last `len(middle) mod b` layers instead (those just before the coda).

Per-iteration parameters of block layer j at iteration i:
  - every `nn.Linear`: `W_block + up[i] @ down[i]` (rank r, no scaling factor), initialised from the rank-r
    truncated SVD of `W_source(group i, layer j) - W_block(j)`: `up = U_r S_r`, `down = V_r^T`. `down` keeps
    orthonormal rows even where the delta is zero (the group the block was initialised from): splitting sqrt(S)
    over both factors would make both zero there, a saddle where neither factor ever gets a gradient. Its bias,
    if any, is a per-iteration vector stored exactly.
  - every other module's own parameters when they are all vectors (norm weights and biases): per-iteration
    vectors stored exactly, used in place of the block's.
Rank `full` gives each linear its full rank (min(in, out)): exact deltas, so at R = L the model computes the source
with exactly the uncovered layers removed. A rank above a matrix's full rank is capped there.

Depth-wise LoRA started at zero (`init_zeros`, no source groups: `relaxation_iterations` L): the same per-iteration
parameters on any loop (any adapter and state init), with `up = 0`, `down` random orthonormal rows (different for
every iteration and layer) and the vectors and biases copied from the block, so the model starts exactly as the plain
loop and training lets the iterations differ (as LoRA starts its B factor at zero; arXiv:2106.09685). It is the
relaxation without the teacher start, which at ranks 8-64 begins far above the pruned model (docs/training.md).

Beyond L iterations every further iteration uses the last group's parameters (`min(i, L - 1)`): the state after
iteration L - 1 is the output of group L - 1, the group that in the source saw the most similar (latest) states, while
cycling back to group 0 would feed a late state to weights that only ever saw early ones, and would make R = L + 1
a different model from the one that R = L ends on. It also needs no parameters beyond the L deltas.

The iteration index reaches the deltas as `LoopedModel.loop_iteration`, which `LoopedModel.iterate` sets around
the block's layers (and gradient checkpointing restores for its recomputation); forward hooks on the block's
modules add the deltas. The deltas stay modules (`model.relaxation`), so the block's linears keep their names and
PEFT LoRA can wrap them as usual; PEFT cannot express a per-iteration delta itself (its adapters have one value per
module), so PEFT trains `relaxation` as a `modules_to_save` module.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

RANK_FULL = "full"
ALIGNS = ("end", "start")
_SEP = "__"  # module names cannot hold dots: `0.self_attn.q_proj` is stored as `0__self_attn__q_proj`


def relaxation_groups(
    prelude: list[int], block: list[int], coda: list[int], num_layers: int, align: str = "end"
) -> tuple[list[list[int]], list[int]]:
    """The source layers each loop iteration stands for, and the middle layers that fit no group.

    Args:
        prelude / block / coda: source-layer indices of the layout's parts.
        num_layers: the source's number of layers.
        align: `end` (groups end at the coda; the first middle layers are left over) or `start`.

    Returns:
        `(groups, uncovered)`: L lists of `len(block)` source indices, and the left-over middle layers.

    Raises:
        ValueError: the prelude does not end before the coda starts, the block lies outside the middle, no group
            fits, or an unknown `align`.
    """
    if align not in ALIGNS:
        raise ValueError(f"relaxation align must be one of {ALIGNS}, got {align!r}")
    lo = max(prelude) + 1 if prelude else 0
    hi = min(coda) if coda else num_layers
    if lo > hi:
        raise ValueError("relaxation needs the prelude to end before the coda starts")
    middle = list(range(lo, hi))
    outside = [i for i in block if i not in middle]
    if outside:
        raise ValueError(f"relaxation needs the block inside the middle layers {lo}-{hi - 1}; {outside} are not")
    b = len(block)
    n_groups = len(middle) // b
    if n_groups == 0:
        raise ValueError(f"no group of {b} layers fits in the {len(middle)} middle layers")
    cut = len(middle) - n_groups * b
    kept, uncovered = (
        (middle[cut:], middle[:cut]) if align == "end" else (middle[: n_groups * b], middle[n_groups * b :])
    )
    return [kept[g * b : (g + 1) * b] for g in range(n_groups)], uncovered


def check_groups_match(base_config, block: list[int], groups: list[list[int]]) -> None:
    """Raise `ValueError` if a group's layer j differs from block layer j in a per-layer config entry.

    The block's layers are built with their own source index, so per-layer settings (attention type, SmolLM3's
    `no_rope_layers`, ...) are the block's; a group whose layer has another setting cannot be reproduced by deltas.
    """
    n = base_config.num_hidden_layers
    per_layer = {
        k: v
        for k, v in vars(base_config).items()
        if isinstance(v, (list, tuple)) and len(v) == n and k != "layer_types"
    }
    types = getattr(base_config, "layer_types", None)
    if types:
        per_layer["layer_types"] = types
    for key, values in per_layer.items():
        for group in groups:
            for j, (src, own) in enumerate(zip(group, block)):
                if values[src] != values[own]:
                    raise ValueError(
                        f"source layer {src} has {key} {values[src]!r} but block layer {j} (source {own}) has "
                        f"{values[own]!r}: choose a block whose layers match every group's"
                    )


def _rank_of(rank: int | str, out_features: int, in_features: int) -> int:
    full = min(out_features, in_features)
    return full if rank == RANK_FULL else min(int(rank), full)


def svd_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`(up, down)` with `up @ down` the best rank-`rank` approximation of `delta` (out, in) (Eckart-Young).

    `up = U_r S_r` (out, r) and `down = V_r^T` (r, in, orthonormal rows even for a zero delta), in float64.
    """
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    return u[:, :rank] * s[:rank], vh[:rank]


def check_relaxable(layer: nn.Module) -> None:
    """Raise `ValueError` if a block layer has parameters the relaxation cannot give each iteration (e.g. a mixture
    of experts' stacked expert weights)."""
    _targets(layer)


class LowRankDeltas(nn.Module):
    """Per-iteration deltas of one linear layer: `up (L, out, r)`, `down (L, r, in)`, optional `bias (L, out)`."""

    def __init__(self, num_groups: int, linear: nn.Linear, rank: int | str):
        super().__init__()
        r = _rank_of(rank, linear.out_features, linear.in_features)
        self.up = nn.Parameter(torch.zeros(num_groups, linear.out_features, r))
        self.down = nn.Parameter(torch.zeros(num_groups, r, linear.in_features))
        self.bias = nn.Parameter(torch.zeros(num_groups, linear.out_features)) if linear.bias is not None else None

    def forward(self, i: int, module: nn.Linear, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """`out` (the block's `module(x)`) plus iteration i's delta; `x (..., in)`, result `(..., out)`."""
        if self.up.shape[-1]:
            out = out + F.linear(F.linear(x, self.down[i]), self.up[i])
        if self.bias is not None:
            out = out + (self.bias[i] - module.bias)
        return out


class VectorTable(nn.Module):
    """Per-iteration copies `(L, *shape)` of a module's own vector parameters (norm weights and biases)."""

    def __init__(self, num_groups: int, module: nn.Module):
        super().__init__()
        self.table = nn.ParameterDict(
            {n: nn.Parameter(torch.zeros(num_groups, *p.shape)) for n, p in module.named_parameters(recurse=False)}
        )

    def forward(self, i: int, module: nn.Module, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """`module(x)` recomputed with iteration i's vectors in place of the block's."""
        return functional_call(module, {n: t[i] for n, t in self.table.items()}, (x,))


def _targets(layer: nn.Module):
    """`(name, module, kind)` for each module of a block layer that gets per-iteration parameters.

    Raises `ValueError` for parameters that are neither a linear layer's nor a module's vectors (e.g. the stacked
    expert weights of a mixture of experts), which a delta per iteration cannot express here.
    """
    out, covered = [], set()
    for name, mod in layer.named_modules():
        own = dict(mod.named_parameters(recurse=False))
        if isinstance(mod, nn.Linear):
            out.append((name, mod, "linear"))
        elif own and all(p.dim() == 1 for p in own.values()):
            out.append((name, mod, "vectors"))
        else:
            continue
        covered |= {f"{name}.{n}" if name else n for n in own}
    left = [n for n, _ in layer.named_parameters() if n not in covered]
    if left:
        raise ValueError(f"relaxation covers linear layers and vector parameters; {left[:3]} are neither")
    return out


class Relaxation(nn.Module):
    """The per-iteration parameters of the block: `deltas` (one `LowRankDeltas` per linear layer) and `vectors`
    (one `VectorTable` per module of vectors), keyed by `{block layer}__{module path}`.

    `forward(key, i, module, x, out)` gives module `key`'s output at iteration i from the block's output `out` for
    input `x`; `i` is already clamped to `L - 1`.
    """

    def __init__(self, block: nn.ModuleList, num_groups: int, rank: int | str):
        super().__init__()
        self.num_groups = num_groups
        self.deltas = nn.ModuleDict()
        self.vectors = nn.ModuleDict()
        for j, layer in enumerate(block):
            for name, mod, kind in _targets(layer):
                key = _SEP.join(filter(None, (str(j), *name.split("."))))
                if kind == "linear":
                    self.deltas[key] = LowRankDeltas(num_groups, mod, rank)
                else:
                    self.vectors[key] = VectorTable(num_groups, mod)

    @staticmethod
    def targets(block: nn.ModuleList):
        """`(key, module)` of every block module that gets per-iteration parameters (for the hooks)."""
        for j, layer in enumerate(block):
            for name, mod, _ in _targets(layer):
                yield _SEP.join(filter(None, (str(j), *name.split(".")))), mod

    def forward(self, key: str, i: int, module: nn.Module, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        table = self.deltas[key] if key in self.deltas else self.vectors[key]
        return table(i, module, x, out)

    @torch.no_grad()
    def init_from(self, block: nn.ModuleList, group_layers: list[list[nn.Module]]) -> None:
        """Set iteration i's parameters from the source layers of group i (`group_layers[i][j]` stands for block
        layer j): linear deltas from the truncated SVD of `W_source - W_block`, vectors and biases copied exactly."""
        for j, layer in enumerate(block):
            for name, mod, kind in _targets(layer):
                key = _SEP.join(filter(None, (str(j), *name.split("."))))
                for i, group in enumerate(group_layers):
                    src = group[j].get_submodule(name) if name else group[j]
                    if kind == "linear":
                        d = self.deltas[key]
                        up, down = svd_factors(src.weight.float() - mod.weight.float(), d.up.shape[-1])
                        d.up[i].copy_(up)
                        d.down[i].copy_(down)
                        if d.bias is not None:
                            d.bias[i].copy_(src.bias)
                    else:
                        for n, t in self.vectors[key].table.items():
                            t[i].copy_(getattr(src, n))

    @torch.no_grad()
    def init_zeros(self, block: nn.ModuleList, generator: torch.Generator | None = None) -> None:
        """Depth-wise LoRA from zero: every iteration computes the block. `up` zero, `down (r, in)` random orthonormal
        rows (QR of a Gaussian draw from `generator`), biases and vectors the block's own."""
        for key, mod in self.targets(block):
            if key not in self.deltas:
                for n, t in self.vectors[key].table.items():
                    t.copy_(getattr(mod, n).expand_as(t))
                continue
            d = self.deltas[key]
            d.up.zero_()
            r, n_in = d.down.shape[-2:]
            for i in range(self.num_groups):
                q, _ = torch.linalg.qr(torch.randn(n_in, r, generator=generator, dtype=torch.float64))
                d.down[i].copy_(q.T)
                if d.bias is not None:
                    d.bias[i].copy_(mod.bias)


class RelaxHook:
    """Forward hook on a block module: replaces its output by the relaxed one at `owner.loop_iteration`.

    A plain object (not a closure) so that `copy.deepcopy` of the model points the copy's hooks at the copy.
    """

    def __init__(self, owner: nn.Module, key: str):
        self.owner, self.key = owner, key

    def __call__(self, module, args, out):
        i = self.owner.loop_iteration
        if i is None:
            return None
        self.owner.loop_iteration = None  # a vector table runs the module again: no second relaxation then
        try:
            return self.owner.relaxation(self.key, min(i, self.owner.num_relaxed - 1), module, args[0], out)
        finally:
            self.owner.loop_iteration = i


class RestoreIteration:
    """Gradient-checkpointing function of a block layer that restores `owner.loop_iteration` for the backward
    recomputation (transformers checkpoints the layer's `forward`; the iteration is not one of its inputs)."""

    def __init__(self, owner: nn.Module, checkpoint):
        self.owner, self.checkpoint = owner, checkpoint

    def __call__(self, fn, *args, **kwargs):
        i = self.owner.loop_iteration

        def run(*a, **k):
            prev, self.owner.loop_iteration = self.owner.loop_iteration, i
            try:
                return fn(*a, **k)
            finally:
                self.owner.loop_iteration = prev

        return self.checkpoint(run, *args, **kwargs)
