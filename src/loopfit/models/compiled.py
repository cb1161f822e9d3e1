"""`torch.compile` of the loop: each decoder layer's forward compiled, its graphs reused by every loop iteration.

What is compiled, and why there:
- The prelude, block and coda decoder layers, one `torch.compile` each. Layers of one family share their code, so
  dynamo keeps one set of graphs for all of them (their weights are graph inputs, not constants): a block layer
  compiled at iteration 0 is the same graph at iteration 7, and a step at another depth R reuses it (R is a Python
  loop count outside the graphs, never a guard). The unrolled forward is not compiled whole: its length would be a
  guard and every new R a recompilation.
- The adapter, masks, rotary embedding, state init, head and losses stay eager (one matmul or cheap setup each).
- A plain model of a supported family (a static baseline, a plain KD student, a teacher) has its decoder layers
  compiled the same way, for training and for generation. HF's cache write inside a compiled layer would be traced,
  guarding on the layer index and on each cache layer's state (a recompilation per layer: SmolLM2's 30 layers
  exhaust the limit and fall back to eager); `generation_kwargs` gives `generate` a cache whose write is a graph
  break instead (`EagerWriteCache`), as the loop's slots are.
- KV cache: a layer's write into its (iteration, layer) slot (`layers._CompiledCacheSlot.update`) is a graph break
  that runs eagerly, so the slot number is no guard; with a cache each layer runs as two graphs (projections and
  rotary; attention and MLP). The layer index the attention passes to the cache is read as a symbolic int
  (`allow_unspec_int_on_nn_module`, set process-wide by `compile_loop`), so one graph serves every layer.

Shapes (`dynamic`): None (the default) compiles for the shapes first seen and makes a dimension symbolic the first
time it changes (one recompilation per graph, then none): training at a fixed batch and `seq_len` stays static;
generation's prompt length becomes symbolic after the second prompt length, the KV length at the second decoding
step. Size-1 dimensions are always specialised, so the one-token decoding step has its own graphs. True: symbolic
from the start (no shape recompilation, possibly slower kernels); False: one graph per shape.

Sources: torch.compile (PyTorch 2.x, `torch._dynamo`, inductor). CUDA graphs for fixed-depth decoding are
`loopfit.models.graphed` (a static cache and one graph per decoding step), not a compile mode here.
"""

from __future__ import annotations

import inspect
import sys

import torch
from torch import nn
from transformers import DynamicCache

from loopfit.models.families import family_of
from loopfit.models.layers import COMPILED_MARK

# Room for the graph variants that training and decoding need (train / eval, grad / no grad, with / without a
# cache, prefill / one-token step) on the code objects that every layer of a family shares; dynamo's default is 8.
_RECOMPILE_LIMIT = 64


def _set_dynamo_options() -> None:
    """The two dynamo settings the loop needs, set process-wide (and only ever relaxed, never reverted).

    `allow_unspec_int_on_nn_module`: with a KV cache the attention passes its `layer_idx` to the cache write (a
    graph break); read as a static int it would be a guard and compile one graph per layer. `recompile_limit`: at
    least `_RECOMPILE_LIMIT`. Process-wide because a `torch._dynamo.config.patch` around every layer call cost about
    as much as the compiled call's own guard check (32 us against 29 us, measured on a loaded 2-core CPU).
    """
    cfg = torch._dynamo.config
    cfg.allow_unspec_int_on_nn_module = True
    cfg.recompile_limit = max(cfg.recompile_limit, _RECOMPILE_LIMIT)


def compile_unsupported(device: torch.device | str, backend: str = "inductor") -> str | None:
    """Why `torch.compile` with `backend` cannot run on `device` here, or None if it can.

    Inductor on CPU compiles C++ and needs a C++ compiler (`torch._inductor.config.cpp.cxx`, g++ by default);
    on CUDA it needs Triton. Other backends are not checked.
    """
    if backend != "inductor":
        return None
    if torch.device(device).type == "cuda":
        from torch.utils._triton import has_triton

        return None if has_triton() else "inductor on CUDA needs triton, which is not installed"
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        get_cpp_compiler()
    except Exception as e:  # InvalidCxxCompiler, or a failure of the compiler search itself
        return f"inductor on CPU needs a C++ compiler and none was found ({type(e).__name__})"
    return None


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers `compile_loop` compiles: a looped model's prelude, block and coda (`loop_layers`), or a
    plain `*ForCausalLM` of a supported family's layers (a static baseline, or a plain KD student), each alone or
    inside a PEFT wrapper.

    Raises:
        ValueError: `model` is neither a looped model nor a plain model of a supported family.
    """
    try:
        return loop_layers(model)
    except ValueError:
        pass
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return list(family_of(inner.config).layers(inner))
    except (ValueError, AttributeError) as e:
        raise ValueError(f"{type(model).__name__} is not a looped model nor a plain model of a supported family "
                         f"({e}): no decoder layers to compile") from None  # fmt: skip


def loop_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of a looped model, prelude, block and coda in order.

    `model` is a `LoopedForCausalLM`, a `LoopedModel`, or a PEFT wrapper of either. Raises `ValueError` for any
    other model (a plain model has no loop).
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = getattr(inner, "model", inner)
    if getattr(getattr(inner, "config", None), "model_type", None) != "looped" or not hasattr(inner, "block"):
        raise ValueError(f"{type(model).__name__} is not a looped model: there is no loop to compile")
    return [*inner.prelude, *inner.block, *inner.coda]


def compile_loop(
    model: nn.Module,
    dynamic: bool | None = None,
    backend: str = "inductor",
    mode: str | None = None,
    fullgraph: bool = False,
) -> bool:
    """Compile the loop's decoder layers of `model` in place (a plain model's decoder layers: `decoder_layers`);
    return True, or False after a one-line warning on stderr when `torch.compile` cannot run on this machine (the
    model then stays eager).

    Calling it again on a compiled model changes nothing. Numerics: equal to eager within float rounding (inductor
    fuses and reorders reductions; `tests/test_compile.py` states the tolerances). The weights, their names and
    `save_pretrained` are unchanged; `uncompile_loop` restores the eager forwards. Side effect: two dynamo settings
    are relaxed process-wide (`_set_dynamo_options`).

    Args:
        model: a looped model (`LoopedForCausalLM`, `LoopedModel`, or a PEFT wrapper of either), or a plain
            `*ForCausalLM` of a supported family (or its PEFT wrapper), on its device.
        dynamic: shape policy passed to `torch.compile` (see the module docstring): None, True or False.
        backend, mode: passed to `torch.compile` (`mode="max-autotune"` etc.).
        fullgraph: passed to `torch.compile`; True fails on the KV cache's graph break (generation).

    Raises:
        ValueError: `model` is neither a looped model nor a plain model of a supported family.
    """
    layers = decoder_layers(model)
    param = next(model.parameters(), None)
    why = compile_unsupported(param.device if param is not None else "cpu", backend)
    if why is not None:
        print(f"loopfit: warning: torch.compile unavailable: {why}; running eager", file=sys.stderr)
        return False
    options = {"dynamic": dynamic, "backend": backend, "mode": mode, "fullgraph": fullgraph}
    _set_dynamo_options()
    for layer in layers:
        if not getattr(layer, COMPILED_MARK, False):
            # An instance attribute shadows the class's forward: `nn.Module.__call__` (hooks, HF's gradient
            # checkpointing wrapper) stays eager around the compiled body.
            layer.forward = torch.compile(layer.forward, **options)
            setattr(layer, COMPILED_MARK, True)
    return True


def is_compiled(model: nn.Module) -> bool:
    """Whether `compile_loop` compiled `model`'s decoder layers."""
    return all(getattr(layer, COMPILED_MARK, False) for layer in decoder_layers(model))


def uncompile_loop(model: nn.Module) -> None:
    """Undo `compile_loop`: the layers run their eager forward again (dynamo's caches are left as they are)."""
    for layer in decoder_layers(model):
        if getattr(layer, COMPILED_MARK, False):
            del layer.forward
            delattr(layer, COMPILED_MARK)


class EagerWriteCache(DynamicCache):
    """HF's `DynamicCache` whose write runs eagerly, a graph break, when a compiled decoder layer calls it: the
    layer index and the cache's state are then no guards, and one set of graphs serves every layer of a plain
    model (`_CompiledCacheSlot` does the same for the loop's slots)."""

    update = torch.compiler.disable(DynamicCache.update)


def generation_kwargs(model: nn.Module) -> dict:
    """Extra `generate` arguments for `model`: an `EagerWriteCache` for a plain model whose decoder layers
    `compile_loop` compiled (under the argument name of the installed transformers: `cache` from 5.24 on,
    `past_key_values` before), nothing otherwise (a looped model routes its own cache writes)."""
    if getattr(model.config, "model_type", None) == "looped":
        return {}
    try:
        if not is_compiled(model):
            return {}
    except ValueError:  # a family without a spec: nothing was compiled
        return {}
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {name: EagerWriteCache(config=model.config)}
