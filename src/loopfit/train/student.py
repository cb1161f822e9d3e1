"""Student and teacher: LoRA, weight sharing between them, running them on a micro-batch, and the run's objective:
built once from the distillation settings and the models (`build_objective`), scored per micro-batch
(`objective_loss`)."""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import Linear as LoraLinear
from torch import nn

from loopfit.errors import LoopfitError
from loopfit.losses import HiddenStateLoss
from loopfit.losses.objective import LogitTransform, Objective, ObjectiveWeights, Terms
from loopfit.models.exit_gate import ExitGate, exit_log_probs
from loopfit.models.families import FAMILIES
from loopfit.models.packed_attention import packed_kwargs
from loopfit.train.config import DistillationConfig, EveryDepthConfig, ExitGateConfig, LoRAConfig


def is_looped(model: nn.Module) -> bool:
    return getattr(model.config, "model_type", None) == "looped"


@contextmanager
def peft_quiet() -> Iterator[None]:
    """Within the block, the FutureWarning that peft's wrapping triggers by reading `model.is_gradient_checkpointing`
    (deprecated in transformers 5.x) is not shown: it is about peft's code, printed on every run, and the user cannot
    act on it. Every other warning passes."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> nn.Module:
    """Wrap `model` in PEFT LoRA; `modules_to_save` (and a relaxed loop's `relaxation`) are trained fully (and kept
    out of the LoRA targets)."""
    save = list(cfg.modules_to_save or [])
    if getattr(getattr(model, "model", None), "relaxation", None) is not None and "relaxation" not in save:
        # A relaxed loop's per-iteration deltas (models/relaxed.py) are no PEFT adapter: trained and saved whole.
        save.append("relaxation")
    lc = LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.target_modules,
        modules_to_save=save or None,
        exclude_modules=save or None,
        task_type="CAUSAL_LM",
    )
    try:
        with peft_quiet():
            return get_peft_model(model, lc)
    except ValueError as e:
        raise LoopfitError(f"cannot apply LoRA: {str(e).splitlines()[0]}") from None


@contextmanager
def lora_merged(model: nn.Module) -> Iterator[int]:
    """Within the block, every plain LoRA linear layer of `model` runs as one matmul with `W + s * B @ A` (its
    adapters' updates added to a temporary copy of its weight) instead of three; yields how many layers it merged.

    For decoding, which is weight-read bound: at batch 4 of SmolLM2's 4-6-4 loop on a 2-core CPU, sampling 128
    tokens took 16.3 s merged against 19.2 s unmerged. The model computes the same function up to float rounding
    (`W x + s B (A x)` against `(W + s B A) x`), so a sampled token can differ where two tokens nearly tie.

    Unlike PEFT's `merge_adapter` / `unmerge_adapter`, the base weights are never written: adding and later
    subtracting the update in place rounds them a little each time, and the frozen base (also the teacher, when the
    student shares its weights) would drift over thousands of on-policy steps. The cost is one copy of each merged
    weight while the block runs (~200 MB for SmolLM2's 14 distinct layers in fp32). Layers that are not PEFT's
    `lora.Linear` over an `nn.Linear` (quantized bases), use a LoRA variant (DoRA) or a bias in B (`lora_bias`), have
    their adapters disabled or already merged are left as they are. A merged layer's parent module calls its base
    layer directly (PEFT's wrapper is left out of the call: ~3% of a decoding step), unless the wrapper reaches it
    through another adapter layer or has hooks or a patched forward of its own. Everything is restored on exit, also
    after an exception. No gradients: for inference only.
    """
    swapped, unwrapped = [], []
    try:
        with torch.no_grad():
            for name, m in list(model.named_modules()):
                if type(m) is not LoraLinear or m.disable_adapters or m.merged:
                    continue
                base = m.get_base_layer()
                names = [a for a in m.active_adapters if a in m.lora_A]
                if (not names or type(base) is not nn.Linear or m.fan_in_fan_out
                        or any(a in m.lora_variant or m.lora_B[a].bias is not None for a in names)):  # fmt: skip
                    continue  # (a `lora_bias` adapter's B has a bias the W + s B A merge would leave out)
                weight = merged = base.weight
                for a in names:  # W + s * B @ A (PEFT's vanilla delta), one new tensor per layer
                    b, a_ = m.lora_B[a].weight, m.lora_A[a].weight
                    merged = torch.addmm(merged, b.to(merged.dtype), a_.to(merged.dtype), alpha=m.scaling[a])
                base.weight = nn.Parameter(merged, requires_grad=False)
                m.merged_adapters = list(names)  # PEFT's forward then runs the base layer alone
                swapped.append((m, base, weight))
                # Its parent calls the base layer directly: PEFT's wrapper costs ~10 us a call, 2-3 ms of a decoding
                # step of SmolLM2's loop. Only where the wrapper holds the base layer itself (not through another
                # adapter layer, as in PEFT's mixed models) and has no hooks or patched forward that would be skipped.
                plain = m.base_layer is base and "forward" not in m.__dict__
                if plain and not (m._forward_hooks or m._forward_pre_hooks) and "." in name:
                    parent_name, child = name.rsplit(".", 1)
                    parent = model.get_submodule(parent_name)
                    if parent._modules.get(child) is m:
                        parent._modules[child] = base
                        unwrapped.append((parent, child, m))
        yield len(swapped)
    finally:
        for parent, child, m in reversed(unwrapped):
            parent._modules[child] = m
        for m, base, weight in reversed(swapped):
            base.weight = weight
            m.merged_adapters = []


def exit_gate_stage(model: nn.Module, width: int = 0) -> ExitGate:
    """Prepare a looped model for the exit gate's stage: give it a gate if it has none (`width` 0: linear; the config
    then says `exit_gate: true`, so the saved folder carries it), freeze everything else. Returns the gate.

    Raises:
        LoopfitError: a plain (not looped) model.
    """
    if not is_looped(model):
        raise LoopfitError("--exit_gate.train needs a looped student (the gate reads the loop's state)")
    dec = model.model
    if dec.exit_gate is None:
        c = model.config
        c.exit_gate, c.exit_gate_width = True, width
        dec.exit_gate = ExitGate.from_config(c).to(model.device)
    model.requires_grad_(False)
    return dec.exit_gate.requires_grad_(True)


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
    shared: they are the same weights (a looped student's layers are copies of the source layers it came from, a
    pruned student's renumbered ones). The teacher's tensor is found by name (a looped student's through its
    layout) or else by content, so a pruned student's layer 4 finds the source's layer 20.
    """
    base = base_model(student)
    looped_cfg = base.config if is_looped(base) else None
    tparams = dict(teacher.named_parameters(remove_duplicate=False))
    by_content: dict[tuple, list[torch.Tensor]] | None = None
    saved, seen = 0, set()
    for name, p in list(base.named_parameters(remove_duplicate=False)):
        if p.requires_grad:
            continue
        tp = tparams.get(_teacher_name(name, looped_cfg))
        if tp is p:
            continue
        if tp is None or not _same_tensor(tp, p):
            if by_content is None:  # built once, only when a name does not lead to the same weight
                by_content = {}
                for t in dict.fromkeys(tparams.values()):
                    by_content.setdefault(_fingerprint(t), []).append(t)
            tp = next((t for t in by_content.get(_fingerprint(p), []) if _same_tensor(t, p)), None)
            if tp is None or tp is p:
                continue
        mod_path, attr = name.rsplit(".", 1)
        setattr(base.get_submodule(mod_path), attr, tp)
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            saved += p.numel() * p.element_size()
    return saved


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a.data, b.data)


def _fingerprint(t: torch.Tensor) -> tuple:
    """Shape, dtype, device and 16 sampled values: equal tensors have equal fingerprints, others rarely."""
    flat = t.detach().reshape(-1)
    sample = flat[:: max(1, flat.numel() // 16)][:16].float().cpu().tolist() if flat.numel() else []
    return tuple(t.shape), t.dtype, t.device, tuple(sample)


class Student(nn.Module):
    """The unit that DDP/FSDP wrap: returns the student's final normed hidden state (no LM head) and loop states."""

    def __init__(self, model: nn.Module, hidden_loss: nn.Module | None = None):
        super().__init__()
        self.model = model  # a PEFT wrapper or the HF model; kept whole so saving works on it directly
        self.hidden_loss = hidden_loss  # held here so DDP also averages its projection's gradients
        self.looped = is_looped(base_model(model))

    def forward(self, input_ids, num_steps=None, output_states: bool = False, fixed_point: bool = False,
                every_depth: int = 1, exit_gate: bool = False, position_ids=None):  # fmt: skip
        """(final normed hidden state, loop states or None, LM head weight, fixed-point residual or None, MoE
        load-balancing loss or None, earlier depths' normed hidden states, exit log-probabilities or None).

        The head weight is returned from inside `forward` because under FSDP2 parameters are only gathered
        (unsharded) around a forward call; the fused loss then uses it outside the module. With `fixed_point`
        the fourth element is `||f(s_R) - s_R||^2 / ||s_R||^2` per position, `(batch, seq)` float32: `f` is one more
        loop iteration, the norm in the denominator is detached so the loss cannot shrink by inflating the state.
        With `every_depth` = k > 1 the last element holds the coda's normed output (`run_coda`) on the states after
        iterations R - k + 1 .. R - 1 (those that exist), shallowest first; otherwise `()`. With `exit_gate` (the
        gate's stage) every depth's (k = R) and the last element is the gate's `(batch, seq, R)` log exit
        distribution (`models.exit_gate.exit_log_probs`), computed here so that DDP sees the gate used in forward.
        `position_ids` `(batch, seq)` restarting at each packed document keep the documents apart (HF's
        packed-sequence masks); None: positions 0..seq-1, one causal mask over the row.
        """
        base = base_model(self.model)
        pos = packed_kwargs(base, position_ids)
        if not self.looped:
            return base.base_model(input_ids, **pos).last_hidden_state, None, self.head_weight(), None, None, (), None
        keep = output_states or fixed_point or every_depth > 1 or exit_gate
        out = base(input_ids, num_steps=num_steps, return_hidden=True, output_states=keep,
                   output_next_state=fixed_point, **pos)  # fmt: skip
        residual = None
        if fixed_point:
            s, s_next = out.states[-1].float(), out.next_state.float()
            residual = (s_next - s).pow(2).sum(-1) / s.detach().pow(2).sum(-1).clamp_min(1e-6)
        depths, log_p = (), None
        if exit_gate:
            every_depth = len(out.states)
            log_p = exit_log_probs(torch.stack([base.model.exit_gate(s.detach()) for s in out.states], dim=-1))
        if every_depth > 1:
            # The loop's own context (masks, rotary) for the coda, as `forward` built it: no padding mask or cache
            # in training, the same positions; the embeddings only give it their shape and dtype.
            dec = base.model
            with torch.no_grad():
                ctx = dec.prepare(dec.embed(input_ids), **pos)
            depths = tuple(dec.run_coda(s, ctx) for s in out.states[-every_depth:-1])
        states = out.states if output_states else None
        return out.logits, states, self.head_weight(), residual, out.aux_loss, depths, log_p

    def head_weight(self) -> torch.Tensor:
        return base_model(self.model).get_output_embeddings().weight


LossParts = Terms
"""Losses of one micro-batch (`loopfit.losses.objective.Terms`): `total` differentiable, the rest detached,
normalised by the global count of valid tokens, so summing over micro-batches and ranks gives the step's mean."""


def teacher_forward(
    teacher: nn.Module, input_ids: torch.Tensor, layers: Sequence[int] = (), position_ids: torch.Tensor | None = None
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """The teacher's final normed hidden state `(B, S, H)` and `{l: (B, S, H)}`, the residual stream after each
    decoder layer `l` in `layers` (0-based source-layer indices), before the final norm; no grad. `position_ids`
    `(B, S)`: as the student's (per-document positions and masks for packed documents), None for 0..S-1.

    HF's `output_hidden_states` ends with the *normed* output of the last layer, which is no residual stream; so
    the outputs are read by forward hooks on the decoder layers asked for, and only those are kept.

    Raises:
        LoopfitError: `layers` is not empty and the teacher's decoder layers cannot be found, or an index
            is out of their range.
    """
    captured: dict[int, torch.Tensor] = {}
    handles = []
    if layers:
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
            # the decoder stack: `.model` or, e.g. GPT-NeoX, `.gpt_neox`
            out = teacher.base_model(input_ids, **packed_kwargs(teacher, position_ids))
    finally:
        for handle in handles:
            handle.remove()
    return out.last_hidden_state, captured


def build_objective(
    dcfg: DistillationConfig,
    model: nn.Module,
    teacher: nn.Module | None = None,
    *,
    cache_estimator: str | None = None,
    fixed_point_scale: float = 0.0,
    hidden_loss: nn.Module | None = None,
    block_span: tuple[int, int] | None = None,
    every_depth: EveryDepthConfig | None = None,
    exit_gate: ExitGateConfig | None = None,
) -> Objective:
    """The run's whole loss, decided once from the distillation settings and the models (`loopfit train`'s setup and
    `loopfit.hf.DistillationTrainer` both build it here).

    Args:
        dcfg: the distillation settings (weights, divergence, temperature, hidden-state alignment, fused path).
        model: the student (PEFT-wrapped or not): its family's logit transform, its loop layout, its router weight.
        teacher: the live teacher, or None with `cache_estimator` (targets read from the batch) or without KD.
        fixed_point_scale: weight of the fixed-point residual (a looped student's).
        hidden_loss, block_span: an alignment loss already built (its projections trained elsewhere) and the span
            its loop replaced; by default built here from `dcfg.hidden_scale`, the model's widths and layout.
        every_depth: the loss at every depth (`--every_depth.k`, `.weighting`); default: the final depth only.
        exit_gate: with `.train`, the exit gate's stage (`Objective.exit_gate_entropy`); the model must already be
            prepared by `exit_gate_stage`.

    Raises:
        LoopfitError: a setting the models cannot serve (alignment without a looped student or a live teacher, or a
            fixed-point term or the loss at every depth on a plain model).
    """
    every_depth = every_depth or EveryDepthConfig()
    base = base_model(model)
    if every_depth.k > 1 and not is_looped(base):
        raise LoopfitError("--every_depth.k > 1 needs a looped student (a plain model has one depth)")
    source = None
    if dcfg.enabled and cache_estimator is not None:
        source = "cache"
    elif dcfg.enabled and teacher is not None:
        source = "live"
    if source is not None:
        ce_scale, kd_scale = dcfg.ce_scale, dcfg.kd_scale
    else:
        ce_scale, kd_scale = 1.0, 0.0
    if fixed_point_scale > 0 and not is_looped(base):
        raise LoopfitError("--fixed_point_scale needs a looped student (a plain model has no loop to converge)")
    if hidden_loss is None and dcfg.enabled and dcfg.hidden_scale:
        if not is_looped(base):
            raise LoopfitError("--distillation.hidden_scale needs a looped student (states per loop iteration)")
        if source != "live":
            raise LoopfitError("--distillation.hidden_scale needs a live teacher (a teacher cache holds no states)")
        c = base.config
        block_span = (c.prelude_layers[-1] + 1 if c.prelude_layers else 0, c.block_layers[-1])
        hidden_loss = HiddenStateLoss(c.hidden_size, teacher.config.hidden_size, kind=dcfg.hidden_kind)
        device = next(model.parameters()).device
        hidden_loss.to(device)
    if hidden_loss is not None:
        if source != "live":
            raise LoopfitError("--distillation.hidden_scale needs a live teacher (a teacher cache holds no states)")
        if block_span is None:
            raise LoopfitError("--distillation.hidden_scale needs a looped student (states per loop iteration)")
    # A looped MoE student adds its source's load-balancing loss with the source's coefficient (when its config asks
    # for router logits; the student then returns the loss).
    router_coef = getattr(getattr(base.config, "base_config", None), "router_aux_loss_coef", None) or 0.0
    weights = ObjectiveWeights(ce_scale=ce_scale, kd_scale=kd_scale, hidden_scale=dcfg.hidden_scale,
                               fixed_point_scale=fixed_point_scale, router_aux_scale=router_coef)  # fmt: skip
    try:
        return Objective(
            weights, teacher=source, divergence=dcfg.kind, divergence_params=dcfg.kind_params,
            temperature=dcfg.temperature, estimator=cache_estimator if source == "cache" else None,
            hidden_loss=hidden_loss, hidden_map=dcfg.hidden_map, block_span=block_span,
            student_logits=LogitTransform(*logit_transform(base.config)),
            teacher_logits=LogitTransform(*logit_transform(teacher.config)) if source == "live" else LogitTransform(),
            fused=dcfg.fused, chunk_size=dcfg.chunk_size, every_depth=max(every_depth.k, 1),
            depth_weighting=every_depth.weighting,
            exit_gate_entropy=exit_gate.entropy_scale if exit_gate is not None and exit_gate.train else None,
        )  # fmt: skip
    except ValueError as e:
        raise LoopfitError(f"--distillation: {e}") from None


def objective_loss(
    objective: Objective, student: nn.Module, teacher: nn.Module | None, batch: dict, num_steps, num_items
) -> LossParts:
    """Run the student (and a live teacher) on one micro-batch and score it with `objective`; labels unshifted.

    Args:
        student: a `Student` (maybe DDP/FSDP-wrapped). teacher: the live teacher when `objective.teacher == "live"`.
        batch: `input_ids`, `labels` `(B, S)`, maybe `position_ids` `(B, S)` (packed documents kept apart, for
            student and teacher alike), and for a cache objective `teacher_ids`, `teacher_values` (and
            `teacher_tail`) from `loopfit.cache.TeacherTargetsDataset`.
        num_steps: loop depth (int or `(n_no_grad, k_grad)`) of a looped student, None otherwise.
        num_items: the step's global count of scored positions.
    """
    input_ids, labels, position_ids = batch["input_ids"], batch["labels"], batch.get("position_ids")
    align = objective.hidden_loss is not None
    hidden, states, head_weight, residual, aux_loss, depths, log_p = student(
        input_ids,
        **({"position_ids": position_ids} if position_ids is not None else {}),  # only then: older stubs lack it
        num_steps=num_steps,
        output_states=align,
        fixed_point=objective.weights.fixed_point_scale > 0,
        every_depth=objective.every_depth,
        **({"exit_gate": True} if objective.exit_gate_entropy is not None else {}),  # only then: older stubs lack it
    )
    kw = {}
    if objective.teacher == "live":
        if teacher is None:
            raise LoopfitError("the objective distills from a live teacher but none was given")
        layers = objective.teacher_layers(len(states)) if align else []
        th, t_states = teacher_forward(teacher, input_ids, layers, position_ids)
        kw = dict(teacher_hidden=th, teacher_weight=teacher.get_output_embeddings().weight, teacher_states=t_states)
    elif objective.teacher == "cache":
        if "teacher_ids" not in batch:
            raise LoopfitError("the objective reads a teacher cache but this batch carries no cached targets "
                               "(teacher_ids): wrap the data in loopfit.cache.TeacherTargetsDataset")  # fmt: skip
        kw = dict(teacher_targets={k: v for k, v in batch.items() if k.startswith("teacher_")})
    return objective(labels, hidden, head_weight, num_items, states=states, residual=residual, router_aux=aux_loss,
                     depth_hidden=depths, exit_log_probs=log_p, **kw)  # fmt: skip


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
    """CE (+ KD, + hidden-state alignment, + fixed-point residual, + router loss) of one micro-batch, building the
    objective for this call: `build_objective` then `objective_loss` (for callers that keep no objective; a training
    loop builds it once).

    The teacher is `teacher` (run live, no grad) or, when the batch carries `teacher_ids` / `teacher_values`
    (from `loopfit.cache.TeacherTargetsDataset`), the cached sparse targets read with `estimator`.
    """
    model = getattr(student, "module", student).model  # DDP-wrapped or not
    cached = "teacher_ids" in batch
    objective = build_objective(
        dcfg, model, None if cached else teacher, cache_estimator=(estimator or "topk") if cached else None,
        fixed_point_scale=fixed_point_scale, hidden_loss=hidden_loss, block_span=block_span,
    )  # fmt: skip
    if hidden_loss is None and objective.hidden_loss is not None and list(objective.hidden_loss.parameters()):
        # A projection between widths made afresh at every call would never learn.
        raise LoopfitError("--distillation.hidden_scale between different widths needs a trained projection: build "
                           "the objective once (build_objective) or pass the hidden_loss that trains")  # fmt: skip
    return objective_loss(objective, student, teacher, batch, num_steps, num_items)


def logit_transform(config) -> tuple[float | None, float | None]:
    """(logit scale, logit soft-cap) of a model's source family, each None where the family has none.

    A looped model reads its source family from `base_config`; a family loopfit does not know has neither.
    """
    base = getattr(config, "base_config", config)
    family = FAMILIES.get(getattr(base, "model_type", None))
    return family.logit_transform(base) if family is not None else (None, None)


def family_logits(h: torch.Tensor, head_weight: torch.Tensor, config) -> torch.Tensor:
    """`(..., hidden)` -> `(..., vocab)`: the head plus the model family's logit scaling and soft-cap."""
    return LogitTransform(*logit_transform(config)).logits(h, head_weight)
