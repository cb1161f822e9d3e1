"""Student and teacher: loading, LoRA, weight sharing between them, and the loss of one micro-batch."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from loopfit.errors import LoopfitError
from loopfit.train.config import DistillationConfig, LoRAConfig


def is_looped(model: nn.Module) -> bool:
    return getattr(model.config, "model_type", None) == "looped"


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> nn.Module:
    """Wrap `model` in PEFT LoRA; `modules_to_save` are trained fully (and kept out of the LoRA targets)."""
    from peft import LoraConfig, get_peft_model

    lc = LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.target_modules,
        modules_to_save=cfg.modules_to_save,
        exclude_modules=cfg.modules_to_save or None,
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, lc)
    except ValueError as e:
        raise LoopfitError(f"cannot apply LoRA: {str(e).splitlines()[0]}") from None


def base_model(model: nn.Module) -> nn.Module:
    """The HF model inside a PEFT wrapper (LoRA layers injected), or `model` itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _teacher_name(name: str, looped_cfg) -> str:
    """Map a student parameter name to the source (teacher) model's name for the same weight."""
    name = name.replace(".base_layer.", ".")
    if looped_cfg is not None:
        m = re.match(r"^model\.(prelude|block|coda)\.(\d+)\.(.*)$", name)
        if m:
            src = getattr(looped_cfg, f"{m.group(1)}_layers")[int(m.group(2))]
            return f"model.layers.{src}.{m.group(3)}"
    return name


def share_teacher_weights(student: nn.Module, teacher: nn.Module) -> int:
    """Point the student's frozen parameters at the teacher's identical tensors; return the bytes no longer held twice.

    Only parameters that are frozen, have the teacher's shape and dtype and are bit-equal to the teacher's are
    shared: they are the same weights (a looped student's layers are copies of the source layers it came from).
    """
    base = base_model(student)
    looped_cfg = base.config if is_looped(base) else None
    tparams = dict(teacher.named_parameters(remove_duplicate=False))
    saved, seen = 0, set()
    for name, p in list(base.named_parameters(remove_duplicate=False)):
        if p.requires_grad:
            continue
        tp = tparams.get(_teacher_name(name, looped_cfg))
        if tp is None or tp is p or tp.shape != p.shape or tp.dtype != p.dtype or tp.device != p.device:
            continue
        if not torch.equal(tp.data, p.data):
            continue
        mod_path, attr = name.rsplit(".", 1)
        setattr(base.get_submodule(mod_path), attr, tp)
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            saved += p.numel() * p.element_size()
    return saved


class Student(nn.Module):
    """The unit that DDP/FSDP wrap: returns the student's final normed hidden state (no LM head) and loop states."""

    def __init__(self, model: nn.Module, hidden_loss: nn.Module | None = None):
        super().__init__()
        self.model = model  # a PEFT wrapper or the HF model; kept whole so saving works on it directly
        self.hidden_loss = hidden_loss  # held here so DDP also averages its projection's gradients
        self.looped = is_looped(base_model(model))

    def forward(self, input_ids, num_steps=None, output_states: bool = False, fixed_point: bool = False):
        """(final normed hidden state, loop states or None, LM head weight, fixed-point residual or None, MoE
        load-balancing loss or None).

        The head weight is returned from inside `forward` because under FSDP2 parameters are only gathered
        (unsharded) around a forward call; the fused loss then uses it outside the module. With `fixed_point`
        the last element is `||f(s_R) - s_R||^2 / ||s_R||^2` per position, `(batch, seq)` float32: `f` is one more
        loop iteration, the norm in the denominator is detached so the loss cannot shrink by inflating the state.
        """
        base = base_model(self.model)
        if not self.looped:
            return base.base_model(input_ids).last_hidden_state, None, self.head_weight(), None, None
        out = base(input_ids, num_steps=num_steps, return_hidden=True, output_states=output_states or fixed_point,
                   output_next_state=fixed_point)  # fmt: skip
        residual = None
        if fixed_point:
            s, s_next = out.states[-1].float(), out.next_state.float()
            residual = (s_next - s).pow(2).sum(-1) / s.detach().pow(2).sum(-1).clamp_min(1e-6)
        return out.logits, out.states if output_states else None, self.head_weight(), residual, out.aux_loss

    def head_weight(self) -> torch.Tensor:
        return base_model(self.model).get_output_embeddings().weight


@dataclass
class LossParts:
    """Losses of one micro-batch: `total` differentiable, the rest detached floats-as-tensors (normalised by the
    global count of valid tokens, so summing over micro-batches and ranks gives the step's mean)."""

    total: torch.Tensor
    ce: torch.Tensor
    kd: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    fixed_point: torch.Tensor | None = None
    router_aux: torch.Tensor | None = None


def teacher_forward(
    teacher: nn.Module, input_ids: torch.Tensor, layers: Sequence[int] = ()
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """The teacher's final normed hidden state `(B, S, H)` and `{l: (B, S, H)}`, the residual stream after each
    decoder layer `l` in `layers` (0-based source-layer indices), before the final norm; no grad.

    HF's `output_hidden_states` ends with the *normed* output of the last layer, which is no residual stream; so
    the outputs are read by forward hooks on the decoder layers asked for, and only those are kept.

    Raises:
        LoopfitError: `layers` is not empty and the teacher's decoder layers cannot be found, or an index
            is out of their range.
    """
    captured: dict[int, torch.Tensor] = {}
    handles = []
    if layers:
        from loopfit.models.families import FAMILIES

        family = FAMILIES.get(getattr(getattr(teacher, "config", None), "model_type", None))
        stack = getattr(teacher, "base_model", None)
        decoder_layers = family.layers(teacher) if family is not None else getattr(stack, "layers", None)
        if not isinstance(decoder_layers, nn.ModuleList):
            raise LoopfitError(f"hidden-state alignment needs the teacher's decoder layers; "
                               f"{type(teacher).__name__} is of no known family and has no .layers")  # fmt: skip
        bad = sorted({i for i in layers if not 0 <= i < len(decoder_layers)})
        if bad:
            raise LoopfitError(f"teacher layers {bad} out of range for a teacher with {len(decoder_layers)} layers")

        def keep(index: int):
            def hook(_module, _args, output):
                captured[index] = output[0] if isinstance(output, tuple) else output

            return hook

        handles = [decoder_layers[i].register_forward_hook(keep(i)) for i in sorted(set(layers))]
    try:
        with torch.no_grad():
            out = teacher.base_model(input_ids)  # the decoder stack: `.model` or, e.g. GPT-NeoX, `.gpt_neox`
    finally:
        for handle in handles:
            handle.remove()
    return out.last_hidden_state, captured


def micro_batch_loss(
    student: nn.Module,
    teacher: nn.Module | None,
    batch: dict,
    num_steps,
    dcfg: DistillationConfig,
    num_items: torch.Tensor,
    hidden_loss: nn.Module | None = None,
    block_span: tuple[int, int] | None = None,
    estimator: str | None = None,
    fixed_point_scale: float = 0.0,
) -> LossParts:
    """CE (+ KD, + hidden-state alignment, + fixed-point residual) of one micro-batch; labels are unshifted.

    Every term scores the same positions: t in 0..S-2 where `labels[:, t + 1] != -100` (the state at t predicts
    token t + 1), and each is a sum over them divided by `num_items`, so summing micro-batches gives the step mean.
    The teacher is `teacher` (run live, no grad) or, when the batch carries `teacher_ids` / `teacher_values`
    (from `loopfit.cache.TeacherTargetsDataset`), the cached sparse targets scored with `estimator`.
    """
    from loopfit.losses import fused_kd_loss, kd_divergence

    input_ids, labels = batch["input_ids"], batch["labels"]
    hidden, states, head_weight, residual, aux_loss = student(
        input_ids, num_steps=num_steps, output_states=hidden_loss is not None, fixed_point=fixed_point_scale > 0
    )
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    y = labels[:, 1:].reshape(-1)
    # (B, S): the token losses' positions; the last position has no next token.
    scored = F.pad(labels[:, 1:] != -100, (0, 1), value=False)
    cached = "teacher_ids" in batch
    kd_on = dcfg.enabled and (teacher is not None or cached)
    teacher_layers: list[int] = []
    if hidden_loss is not None:
        if not kd_on or cached:
            raise LoopfitError("--distillation.hidden_scale needs a live teacher (a teacher cache holds no states)")
        states = list(states)
        if dcfg.hidden_map == "last":
            states = states[-1:]
        teacher_layers = _loop_teacher_layers(len(states), block_span)
    th = t_states = None
    sparse = {}
    if cached and kd_on:
        w = batch["teacher_ids"].shape[-1]
        sparse = dict(teacher_ids=batch["teacher_ids"][:, :-1].reshape(-1, w),
                      teacher_values=batch["teacher_values"][:, :-1].reshape(-1, w), estimator=estimator)  # fmt: skip
        if "teacher_tail" in batch:
            sparse["teacher_tail"] = batch["teacher_tail"][:, :-1].reshape(-1)
    elif kd_on:
        th_full, t_states = teacher_forward(teacher, input_ids, teacher_layers)
        th = th_full[:, :-1].reshape(-1, th_full.shape[-1])
    ce_scale = dcfg.ce_scale if dcfg.ce_scale is not None else (dcfg.alpha if kd_on else 1.0)
    kd_scale = dcfg.kd_scale if dcfg.kd_scale is not None else 1.0 - dcfg.alpha
    if not kd_on:
        ce_scale, kd_scale = 1.0, 0.0
    tw = teacher.get_output_embeddings().weight if kd_on and not cached else None
    # The source families' logit scaling (Granite, Cohere) folds into the hidden state exactly; a soft-cap (Gemma 2
    # and 3) does not, so those take the unfused path.
    s_scale, s_cap = logit_transform(base_model(getattr(student, "module", student).model).config)  # DDP or not
    t_scale, t_cap = logit_transform(teacher.config) if tw is not None else (None, None)
    h = h * s_scale if s_scale is not None else h
    th = th * t_scale if t_scale is not None and th is not None else th
    if s_cap and cached:
        raise LoopfitError("a soft-capped student (Gemma 2 / 3) cannot train from a teacher cache yet; use a live "
                           "teacher (--distillation.teacher_model_name)")  # fmt: skip
    if (dcfg.fused or not kd_on or cached) and not (s_cap or t_cap):
        out = fused_kd_loss(
            h, head_weight, y, teacher_hidden=th, teacher_weight=tw, kind=dcfg.kind, temperature=dcfg.temperature,
            ce_scale=ce_scale, kd_scale=kd_scale, chunk_size=dcfg.chunk_size, num_items=num_items, **sparse,
            **dcfg.kind_params,
        )  # fmt: skip
        parts = LossParts(out.total, out.ce, out.kd)
    else:
        logits = _softcap(F.linear(h, head_weight), s_cap)
        ce = F.cross_entropy(logits.float(), y, ignore_index=-100, reduction="sum") / num_items
        if kd_on:
            with torch.no_grad():
                t_logits = _softcap(F.linear(th, tw), t_cap)
            kd = kd_divergence(logits, t_logits, y, dcfg.kind, dcfg.temperature, num_items=num_items,
                               **dcfg.kind_params)  # fmt: skip
            parts = LossParts(ce_scale * ce + kd_scale * kd, ce.detach(), kd.detach())
        else:
            parts = LossParts(ce, ce.detach())
    if hidden_loss is not None:
        hl = hidden_loss(states, [t_states[i] for i in teacher_layers], scored)
        # HiddenStateLoss averages over this micro-batch's positions; re-weight it to the global token count.
        hl = hl * scored.sum() / num_items
        parts.total = parts.total + dcfg.hidden_scale * hl
        parts.hidden = hl.detach()
    if residual is not None:
        fp = residual[scored].sum() / num_items
        parts.total = parts.total + fixed_point_scale * fp
        parts.fixed_point = fp.detach()
    if aux_loss is not None:
        # The source's load-balancing loss is a mean over this micro-batch's tokens: weighted like the other terms
        # so that accumulation sums to the step's value; its coefficient is the source config's.
        coef = base_model(getattr(student, "module", student).model).config.base_config.router_aux_loss_coef
        aux = aux_loss * scored.sum() / num_items
        parts.total = parts.total + coef * aux
        parts.router_aux = aux.detach()
    return parts


def logit_transform(config) -> tuple[float | None, float | None]:
    """(logit scale, logit soft-cap) of a model's source family, each None where the family has none.

    A looped model reads its source family from `base_config`; a family loopfit does not know has neither.
    """
    from loopfit.models.families import FAMILIES

    base = getattr(config, "base_config", config)
    family = FAMILIES.get(getattr(base, "model_type", None))
    if family is None:
        return None, None
    scale = family.logit_scale(base) if family.logit_scale is not None else None
    cap = getattr(base, family.logit_softcap_attr, None) if family.logit_softcap_attr else None
    return scale, cap or None


def family_logits(h: torch.Tensor, head_weight: torch.Tensor, config) -> torch.Tensor:
    """`(..., hidden)` -> `(..., vocab)`: the head plus the model family's logit scaling and soft-cap."""
    scale, cap = logit_transform(config)
    return _softcap(F.linear(h * scale if scale is not None else h, head_weight), cap)


def _softcap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    return torch.tanh(logits / cap) * cap if cap else logits


def _loop_teacher_layers(num_iterations: int, block_span: tuple[int, int] | None) -> list[int]:
    from loopfit.losses import loop_layer_map

    if block_span is None:
        raise LoopfitError("--distillation.hidden_scale needs a looped student (states per loop iteration)")
    return loop_layer_map(num_iterations, block_span)
