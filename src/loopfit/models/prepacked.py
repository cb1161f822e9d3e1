"""Linear layers with their weights prepacked for oneDNN, for decoding on CPU.

Decoding multiplies a few rows (the batch) by every weight of the model at each new token, and on CPU the default
fp32 `linear` (MKL's GEMM on a row-major `[out, in]` weight) reads weights slowly at that shape: on a 2-core AVX2
EPYC, the 4-6-4 SmolLM2 loop's layer weights, streamed at batch 4, went through at 8.3 GB/s, against 16.3 GB/s
once each weight was reordered into oneDNN's blocked layout for that batch size; the 49152 x 576 head took 18.2 ms
against 5.1 ms. Sampling 128 tokens per prompt then ran 1.5x faster (127 -> 84 ms per token step), same tokens.

`prepacked_linears` reorders each eligible weight once on entry and routes the layer's forward through the packed
copy while nothing needs a gradient; it is the same pair of ops PyTorch's inductor uses when it freezes a CPU model
(`torch.ops.mkldnn._reorder_linear_weight`, `torch.ops.mkldnn._linear_pointwise`; see
`torch/_inductor/fx_passes/mkldnn_fusion.py`), without compiling anything and without the weights becoming
constants: the packing is redone on every entry (one pass over the weights), so the weights may change between
two blocks, as they do between the on-policy sampling calls of a training run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks

from loopfit.models.relaxed import RelaxHook

_LINEAR = torch.ops.mkldnn._linear_pointwise.default if hasattr(torch.ops.mkldnn, "_linear_pointwise") else None


def _reorder(weight: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight, batch_size)


def prepack_available() -> bool:
    """Whether this PyTorch build has oneDNN (mkldnn) with the linear prepacking ops."""
    mkldnn = torch.ops.mkldnn
    return bool(torch.backends.mkldnn.is_available() and hasattr(mkldnn, "_reorder_linear_weight")
                and hasattr(mkldnn, "_linear_pointwise"))  # fmt: skip


class _PackedForward:
    """The forward of one `nn.Linear` inside `prepacked_linears`: the packed weight when it may be used (no
    gradient wanted, no CPU autocast, an fp32 CPU input, the layer's weight and bias the very tensors packed and not
    written since), the layer's own forward otherwise, so the function never differs from `nn.Linear`'s beyond
    float rounding. A layer in a `_Siblings` group computes through the group's weight. `calls` counts the packed
    calls."""

    def __init__(self, module: nn.Linear, batch_size: int):
        self.module, self.weight, self.bias, self.batch_size = module, module.weight, module.bias, batch_size
        # Read on every call (~240 calls per decoded token of SmolLM2's loop): the parameter dict itself, not
        # `nn.Module.__getattr__`, and the bias detached once (its version check covers in-place writes).
        self.params = module._parameters
        self.versions = self._versions(module.weight, module.bias)
        self.bias_data = None if module.bias is None else module.bias.detach()
        self.packed: torch.Tensor | None = None  # packed on first use outside a group
        self.group: _Siblings | None = None
        self.calls = 0

    @staticmethod
    def _versions(weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[int, int]:
        return weight._version, -1 if bias is None else bias._version

    def valid(self) -> bool:
        """The layer's weight and bias are the tensors packed, unwritten since."""
        weight, bias = self.params.get("weight"), self.params.get("bias")
        return weight is self.weight and bias is self.bias and self._versions(weight, bias) == self.versions

    def usable(self, x: torch.Tensor) -> bool:
        return (x.is_cpu and x.dtype is torch.float32 and not torch.is_grad_enabled()
                and not torch.is_autocast_enabled("cpu") and self.valid())  # fmt: skip

    def release(self) -> None:
        self.packed = self.weight = self.bias = self.bias_data = self.params = None

    def pack(self) -> None:
        if self.packed is None:
            self.packed = _reorder(self.weight.detach(), self.batch_size)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.usable(x):
            return nn.Linear.forward(self.module, x)
        self.calls += 1
        if self.group is not None:
            out = self.group.output(self, x)
            if out is not None:
                return out
        self.pack()
        return _LINEAR(x.contiguous(), self.packed, self.bias_data, "none", [], "")


# Sibling layers that read the same input in the families' decoder layers: attention's query / key / value
# projections, the gated MLP's gate and up projections (and a MoE's shared expert's).
SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class _Siblings:
    """Sibling linear layers packed as one weight `cat([W_1, ..., W_k])`.

    The first of them called with an input computes every sibling's output in one matmul and keeps the others' for
    their call with that very tensor (identity, and its version where it has one: not under `torch.inference_mode`).
    At decoding's batch sizes that is 1.4x faster for SmolLM2's q/k/v than three matmuls (fewer, larger weight
    streams, fewer calls). If a sibling is called with another tensor while outputs of the last input are still
    unclaimed, the layers do not share their input in this model: the group dissolves and each layer packs its own
    weight. So does a group one of whose layers' weight was replaced or written in place."""

    def __init__(self, members: list[_PackedForward], batch_size: int):
        self.members, self.sizes = members, [m.weight.shape[0] for m in members]
        self.packed = _reorder(torch.cat([m.weight.detach() for m in members]), batch_size)
        biases = [m.bias_data for m in members]
        self.bias = None if biases[0] is None else torch.cat(biases)
        self.input: torch.Tensor | None = None
        self.version = -1
        self.pending: dict[_PackedForward, torch.Tensor] = {}
        for m in members:
            m.group = self

    def output(self, member: _PackedForward, x: torch.Tensor) -> torch.Tensor | None:
        """`member`'s output for `x`, or None once the group has dissolved (the member then computes alone)."""
        version = _version(x)
        if x is self.input and version == self.version and member in self.pending:
            return self.pending.pop(member)
        if self.pending:
            self.dissolve()
            return None
        # The caller's weights were checked (`usable`); each sibling's are at its own call, which takes its output
        # only if they are still the ones packed (a stale output is never used: it stays unclaimed, and dissolves
        # the group at the next input).
        y = _LINEAR(x.contiguous(), self.packed, self.bias, "none", [], "")
        outs = dict(zip(self.members, y.split_with_sizes(self.sizes, dim=-1)))
        mine = outs.pop(member)
        self.input, self.version, self.pending = x, version, outs
        return mine

    def dissolve(self) -> None:
        for m in self.members:
            m.group = None
        self.packed = self.input = self.bias = None
        self.pending, self.members = {}, []


def _version(x: torch.Tensor) -> int:
    """`x`'s in-place write counter; an inference-mode tensor has none (-1): its identity is then what is checked."""
    return -1 if x.is_inference() else x._version


def _hooked(module: nn.Module) -> bool:
    """Whether `module` has hooks that could change its siblings' shared input between their calls: any forward or
    pre-forward hook but a relaxed loop's `RelaxHook` (which returns a new output and reads its input only)."""
    return bool(module._forward_pre_hooks) or any(not isinstance(h, RelaxHook) for h in module._forward_hooks.values())


def _sibling_groups(model: nn.Module, packed: dict[nn.Module, _PackedForward]) -> list[list[_PackedForward]]:
    """Groups of packed layers named as `SIBLINGS` under one parent, with equal input sizes, all or no biases and no
    hooks (`_hooked`); none while global module hooks are registered. Under `torch.inference_mode` a group checks the
    input's identity only (no version counter): no code between two sibling calls may write it in place, which holds
    for the families' attention and MLP code, and hooks that could are excluded here."""
    groups: list[list[_PackedForward]] = []
    if _global_forward_hooks or _global_forward_pre_hooks:
        return groups
    for parent in model.modules():
        for names in SIBLINGS:
            children = [parent._modules.get(n) for n in names]
            if not all(c in packed for c in children):
                continue
            members = [packed[c] for c in children]
            if (len({c.in_features for c in children}) == 1 and len({m.bias_data is None for m in members}) == 1
                    and not any(_hooked(c) for c in children)):  # fmt: skip
                groups.append(members)
    return groups


@contextlib.contextmanager
def prepacked_linears(model: nn.Module, batch_size: int, fuse_siblings: bool = True) -> Iterator[list[_PackedForward]]:
    """Within the block, every fp32 CPU `nn.Linear` of `model` (or subclass that keeps its forward, such as the
    loop's adapter; quantized and other layers with a forward of their own are left alone) computes through a copy
    of its weight prepacked for oneDNN at `batch_size` rows (a hint for the layout: other row counts, such as a
    prompt's prefill, still compute correctly); yields the packed forwards (`len` = layers packed; each one's
    `calls`). Outside PyTorch builds with oneDNN, it packs nothing. With `fuse_siblings`, layers that read the same
    input (a decoder layer's `q_proj` / `k_proj` / `v_proj`, its MLP's `gate_proj` / `up_proj`) are packed as one
    weight and computed in one matmul (`_Siblings`).

    The model computes the same function up to float rounding (different summation order), so a sampled token can
    differ where two tokens nearly tie. Inference only: while gradients are enabled, under CPU autocast, for inputs
    that are not fp32 on CPU, or once a layer's weight or bias has been replaced or written in place, a layer runs
    its own forward. Costs one packed copy of each weight while the block runs (~315 MB for SmolLM2's 4-6-4 loop
    with its tied head, in fp32). Each layer's forward is restored on exit, also after an exception.

    Raises:
        ValueError: `batch_size` below 1.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    packed: list[_PackedForward] = []
    try:
        if prepack_available():
            with torch.no_grad():
                for m in model.modules():
                    # A plain tensor only: an FSDP-sharded weight (a DTensor) holds a shard until its forward
                    # gathers it, and other tensor subclasses (quantized, meta) are not what the layer multiplies by.
                    if (isinstance(m, nn.Linear) and type(m).forward is nn.Linear.forward
                            and type(m.weight) in (torch.Tensor, nn.Parameter)
                            and m.weight.device.type == "cpu" and m.weight.dtype == torch.float32
                            and "forward" not in m.__dict__):  # fmt: skip
                        packed.append(_PackedForward(m, batch_size))
                        m.forward = packed[-1]  # an instance attribute: nn.Module.__call__ finds it first
                if fuse_siblings:
                    for members in _sibling_groups(model, {p.module: p for p in packed}):
                        _Siblings(members, batch_size)
                for p in packed:
                    if p.group is None:
                        p.pack()
        yield packed
    finally:
        for p in packed:
            del p.module.forward
            if p.group is not None:
                p.group.dissolve()
            # Nothing heavy outlives the block, not even until the cyclic GC runs: the packed copies, the weights
            # (a `lora_merged` block's merged ones), a group's last input and outputs. `calls` stays readable.
            p.release()
