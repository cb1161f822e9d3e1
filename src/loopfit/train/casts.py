"""One autocast copy per linear input under `--precision bf16`, shared by every linear layer that reads it.

Under `torch.autocast`, each `F.linear` casts its float32 input to bfloat16 itself. A pre-norm decoder layer feeds
one normed hidden state to several linear layers (q, k and v; gate and up), and PEFT's LoRA feeds its input to the
base layer and to `lora_A` again: the same tensor is cast 3-6 times per layer in the forward pass, each copy saved for
the backward pass, and the backward pass casts each of their gradients back to float32 before summing them.
`share_input_casts` casts it once: a forward pre-hook on every `nn.Linear` of the models hands each layer the one
bfloat16 copy of its input (the same round-to-nearest autocast applies, so the forward pass computes the same
numbers), one copy is saved instead of several, and the gradients of the layers reading it are summed in float32
as before (`_SharedCast.backward` casts each back alone, so the gradients are bit-equal too).

PEFT also casts a LoRA layer's input to the adapter's dtype before `lora_A` (`_cast_input_dtype`): a bfloat16
input (the attention output before `o_proj`, the MLP product before `down_proj`) is cast to float32 and back by
autocast. Under autocast that round trip is exact and useless; `share_input_casts` turns it off
(`cast_input_dtype_enabled`, PEFT's switch).
"""

from __future__ import annotations

import torch
from peft.tuners.lora import LoraLayer
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from loopfit.losses.autocast import autocast_dtype, cached_cast
from loopfit.models.layers import COMPILED_MARK

_MARK = "_loopfit_shared_cast"


class _SharedCast(torch.autograd.Function):
    """`cast` (x cast to a lower dtype without autograd) as an output of x, whose gradient goes back to x's dtype
    on its own, as if this consumer had cast x itself. Shapes: x and cast alike."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cast: torch.Tensor) -> torch.Tensor:
        ctx.dtype = x.dtype
        return cast.view_as(cast)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.to(ctx.dtype), None


class _Casts:
    """The cache of one pair of models: float32 input -> its bfloat16 copy (`cached_cast`: recast after an in-place
    change; weakly keyed, so an entry lives as long as the input does, one forward pass)."""

    def __init__(self):
        self.cache = WeakIdKeyDictionary()

    def __call__(self, module: nn.Module, args: tuple):
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor) or x.dtype != torch.float32:
            return None
        dtype = autocast_dtype(x.device.type)
        if dtype is None:
            return None
        cast = cached_cast(self.cache, x, dtype)
        if x.requires_grad and torch.is_grad_enabled():
            cast = _SharedCast.apply(x, cast)
        return (cast, *args[1:])


def share_input_casts(*models: nn.Module | None) -> int:
    """Install the shared input casts on every `nn.Linear` of `models` (None skipped) and turn off PEFT's input
    casting in their LoRA layers; returns the number of layers hooked (0 on a second call: installed once).

    Outside autocast the hooks do nothing. Left alone: subclasses of `nn.Linear` with a forward of their own
    (quantized layers), layers inside a decoder layer that `--compile` compiled
    (`COMPILED_MARK`; the compiler fuses autocast's casts itself, and a Python cache in a hook would break its
    graph), and layers with forward hooks of their own, which may read the input (a relaxed loop's per-iteration
    deltas, `loopfit.models.relaxed.RelaxHook`: given the shared copy, their gradient would join the layer's in
    bfloat16 instead of float32).
    """
    casts = _Casts()
    hooked = 0
    for model in models:
        if model is None:
            continue
        compiled = {id(m) for layer in model.modules() if getattr(layer, COMPILED_MARK, False) for m in layer.modules()}
        for m in model.modules():
            if id(m) in compiled:
                continue
            if isinstance(m, LoraLayer):
                m.cast_input_dtype_enabled = False
            # `nn.Linear.forward` itself: a subclass with its own forward (a quantized layer) may treat its input
            # differently from `F.linear` under autocast.
            plain = isinstance(m, nn.Linear) and type(m).forward is nn.Linear.forward
            if plain and not getattr(m, _MARK, False) and not m._forward_hooks:
                m.register_forward_pre_hook(casts)
                setattr(m, _MARK, True)
                hooked += 1
    return hooked
