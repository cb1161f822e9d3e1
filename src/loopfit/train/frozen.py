"""Frozen linear weights stored in the autocast dtype under `--precision bf16`.

Under `torch.autocast`, `F.linear` casts a float32 weight to bfloat16 at every call, and autocast keeps such casts
only for leaf tensors that require grad: a frozen weight is cast again each time it is used. A looped student runs
its block's frozen base weights R times per forward, and the teacher runs every layer once more, so a bf16 step
re-reads and re-writes every frozen weight several times (9% of a bf16 LoRA + KD step of SmolLM2 on a 2-core CPU,
torch.profiler, session 30). Storing those weights in bfloat16 once computes the same numbers (autocast's cast is
the same round-to-nearest) from half the memory, with no cast at all.
"""

from __future__ import annotations

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from torch import nn

from loopfit.train.student import base_model


def frozen_linear_weights(student: nn.Module, teacher: nn.Module | None) -> list[nn.Parameter]:
    """The frozen weights and biases of linear layers that a bf16 run may store in bfloat16, each once.

    They are the base layers of the student's LoRA layers (never trained, never saved: a PEFT model saves its
    adapters) and the teacher's linear layers (never saved). Left out: whatever the student saves (all of its
    parameters when it is not a PEFT model, e.g. in the exit gate's stage, whose folder holds the whole model),
    anything that requires grad, and a weight tied to an input embedding (an embedding lookup is not autocast: a
    bfloat16 table would put the residual stream in bfloat16).
    """
    lora = isinstance(student, PeftModel)
    keep = {id(p) for p in student.parameters() if p.requires_grad or not lora}
    for m in (student, teacher):
        if m is not None and (emb := base_model(m).get_input_embeddings()) is not None:
            keep.add(id(emb.weight))
    layers = []
    if lora:
        layers += [m.get_base_layer() for m in student.modules() if isinstance(m, LoraLayer)]
    if teacher is not None:
        layers += list(teacher.modules())
    out: dict[int, nn.Parameter] = {}
    for layer in layers:
        if type(layer) is not nn.Linear:  # not quantized or otherwise special linear layers
            continue
        for p in (layer.weight, layer.bias):
            if p is not None and id(p) not in keep and not p.requires_grad and p.dtype == torch.float32:
                out[id(p)] = p
    return list(out.values())


def store_frozen_linears(student: nn.Module, teacher: nn.Module | None, dtype: torch.dtype = torch.bfloat16) -> int:
    """Store `frozen_linear_weights(student, teacher)` in `dtype`, in place (the same `Parameter` objects, so a
    weight the student shares with the teacher stays shared); returns the bytes saved, 0 on a second call (only
    float32 weights are picked).

    Only for runs whose every forward is under autocast to `dtype`: outside autocast a float32 input would meet a
    bfloat16 weight (`RuntimeError`: mat1 and mat2 must have the same dtype).
    """
    saved = 0
    with torch.no_grad():
        for p in frozen_linear_weights(student, teacher):
            saved += p.numel() * (p.element_size() - torch.finfo(dtype).bits // 8)
            p.data = p.data.to(dtype)
    return saved
