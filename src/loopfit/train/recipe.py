"""The training recipe, top to bottom: `setup` (config, models, data, optimizer, resume), `fit` (the step loop),
`validate` (held-out loss at given depths), `save_final` (HF folder + done marker). `train` runs all four.

Nothing is replaced before every input is checked and loaded; what happens to the run folder (start, replace,
resume, the comparison a resume makes) is `resume.py`'s, a run's state and its checkpoints are `state.py`'s.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from loopfit.cache.reader import TeacherCache, TeacherTargetsDataset
from loopfit.data import build_dataset, tokenizer_hash
from loopfit.data.stream import BatchStream
from loopfit.errors import LoopfitError
from loopfit.flops import flop_params, train_flops_per_token
from loopfit.io import atomic_dir, remove_leftovers, write_json
from loopfit.loading import load_model, load_tokenizer, resolve_device
from loopfit.models.compiled import compile_loop, decoder_layers
from loopfit.models.families import FAMILIES
from loopfit.models.layers import enable_activation_checkpointing
from loopfit.models.packed_attention import use_packed_attention
from loopfit.train import checkpoint as ckpt
from loopfit.train.casts import share_input_casts
from loopfit.train.config import TrainConfig
from loopfit.train.distributed import all_reduce_sum, barrier, cleanup, init_distributed, wrap_student
from loopfit.train.frozen import store_frozen_linears
from loopfit.train.metrics import MetricsLogger, measure_matmul_peak, slow_bf16_warning
from loopfit.train.on_policy import build_on_policy, on_policy_step
from loopfit.train.resume import (
    DONE,
    check_same_data,
    config_dict,
    create_run_folder,
    plan,
    record_resume,
    undo_replacement,
)
from loopfit.train.schedules import DepthSchedule, lr_factor
from loopfit.train.state import Run, enter_stage, restore, save_checkpoint, stage_of
from loopfit.train.student import (
    Student,
    apply_lora,
    base_model,
    build_objective,
    exit_gate_stage,
    family_logits,
    objective_loss,
    share_teacher_weights,
)
from loopfit.train.validate import check_inputs


# ----------------------------------------------------------------------------------------------------- setup
def setup(cfg: TrainConfig) -> Run | None:
    """Validate, load student/teacher, apply LoRA, build data and optimizer, restore a checkpoint. None if finished."""
    cfg.validate()
    check_inputs(cfg)  # files, tokenizers, vocabularies, lengths: before anything loads or is written
    if cfg.resume not in (True, False, "auto"):
        raise LoopfitError(f"--resume must be true, false or auto, got {cfg.resume!r}")
    out = Path(cfg.out)
    device = resolve_device(cfg.device)
    d = init_distributed(cfg.parallel, device)
    if device.type == "cuda" and d.enabled:
        device = torch.device("cuda", d.local_rank)
        torch.cuda.set_device(device)
    if d.is_main:
        remove_leftovers(out)
    barrier(d)
    mode, changed = plan(cfg, out, d)
    if mode == "finished":
        if d.is_main:
            print(f"run {out} already finished (step {json.loads((out / DONE).read_text())['step']}); nothing to do")
        return None
    # The newest intact checkpoint, checked before any model is loaded; damaged newer ones are reported and skipped.
    found = ckpt.load_latest(out, report=d.is_main) if mode == "resume" else None
    _seed_everything(cfg.seed)

    tokenizer = load_tokenizer(cfg.model_name)
    model = load_model(cfg.model_name)
    looped = getattr(model.config, "model_type", None) == "looped"
    if not looped and (
        cfg.fixed_num_steps or cfg.mean_recurrence_schedule.turn_on or cfg.backprop_depth_schedule.turn_on
    ):
        raise LoopfitError(f"{cfg.model_name} is not a looped model: recurrence options do not apply to it")
    if cfg.compile:
        try:
            decoder_layers(model)
        except ValueError:
            families = ", ".join(FAMILIES)
            raise LoopfitError(f"--compile: {cfg.model_name} is neither a looped model nor a plain model of a "
                               f"supported family ({families}): no decoder layers to compile") from None  # fmt: skip
    teacher = None
    dc = cfg.distillation
    cache = None
    if dc.enabled and dc.teacher_cache:  # an offline teacher: sparse targets per training row, no live teacher
        cache = TeacherCache(dc.teacher_cache)
        cache.verify()  # every shard's checksum, before anything is written: a damaged cache is refused whole
        sv = model.get_output_embeddings().weight.shape[0]
        if cache.vocab_size != sv:
            raise LoopfitError(f"teacher cache vocabulary ({cache.vocab_size}) differs from the student's ({sv})")
    elif dc.enabled:
        teacher = load_model(dc.teacher_model_name).eval().requires_grad_(False)
        tv, sv = teacher.get_output_embeddings().weight.shape[0], model.get_output_embeddings().weight.shape[0]
        if tv != sv:
            raise LoopfitError(f"teacher vocabulary ({tv}) differs from the student's ({sv}); KD needs the same one")
    if cfg.exit_gate.train:
        exit_gate_stage(model, cfg.exit_gate.width)  # the gate alone trains (added if the model has none)
    elif cfg.lora.enabled:
        model = apply_lora(model, cfg.lora)
    else:
        model.requires_grad_(True)
    info = {"shared_bytes": 0}
    if teacher is not None and dc.share_weights and cfg.lora.enabled:
        info["shared_bytes"] = share_teacher_weights(model, teacher)
    # Packed documents: each attends to itself alone, without a (seq, seq) mask under SDPA. Not with --compile: the
    # per-batch document boundaries are Python lists, which a compiled layer would guard on and recompile for; the
    # compiled loop reads HF's block-diagonal mask instead (a tensor).
    if cfg.position_ids and not cfg.compile:
        for m in (model, teacher):
            if m is not None:
                use_packed_attention(m)
    if cfg.gradient_checkpointing:
        enable_activation_checkpointing(model)
    model.to(device).train()
    if cfg.compile:
        compile_loop(model)  # the decoder layers (a plain model's too), in place (or a warning and eager)
    if teacher is not None:
        teacher.to(device)
    objective = build_objective(dc, model, teacher, cache_estimator=cache.estimator if cache is not None else None,
                                fixed_point_scale=cfg.fixed_point_scale, every_depth=cfg.every_depth,
                                exit_gate=cfg.exit_gate)  # fmt: skip
    hidden_loss = objective.hidden_loss  # its projections (if any) train with the student
    if not any(p.requires_grad for p in model.parameters()):
        raise LoopfitError("nothing to train: the student has no trainable parameters")
    needs_unused = any(r.lr_mult == 0 for r in cfg.param_groups + [r for s in cfg.stages for r in s.param_groups])
    student = wrap_student(Student(model, hidden_loss), d, device, find_unused_parameters=needs_unused)
    # Collected after wrapping: FSDP2 replaces each parameter with a sharded one (same name).
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if hidden_loss is not None:
        trainable += [(f"hidden_loss.{n}", p) for n, p in hidden_loss.named_parameters()]

    data = build_dataset(
        cfg.data, tokenizer, cfg.seq_len, chat=cfg.chat, assistant_only=cfg.assistant_only,
        system_prompt=cfg.system_prompt, val_fraction=cfg.val_fraction, seed=cfg.seed, max_documents=cfg.max_documents,
        position_ids=cfg.position_ids, text_stream=cfg.text_stream,
    )  # fmt: skip
    val_set = data.val if cfg.val_fraction > 0 else None
    if cfg.val_data:
        val_set = build_dataset(
            cfg.val_data,
            tokenizer,
            cfg.seq_len,
            chat=cfg.chat,
            assistant_only=cfg.assistant_only,
            system_prompt=cfg.system_prompt,
            seed=cfg.seed,
            position_ids=cfg.position_ids,
            text_stream=cfg.text_stream,
        ).train
    if len(data.train) < cfg.batch_size * d.world_size:
        raise LoopfitError(f"only {len(data.train)} training rows: fewer than one global batch")
    if mode == "resume":
        check_same_data(out, data.manifest)
    train_set = data.train
    if cache is not None:
        cache.check_compatible(tokenizer_hash(tokenizer), data.data_hash, dc.temperature)
        train_set = TeacherTargetsDataset(data.train, cache)
        info["teacher_cache"] = {"folder": str(dc.teacher_cache), "estimator": cache.estimator}
    stream = BatchStream(train_set, cfg.batch_size, cfg.seed, d.rank, d.world_size)
    depth = DepthSchedule.from_config(cfg, getattr(base_model(model).config, "mean_recurrence", 1))

    run = Run(cfg, out, d, device, model, student, teacher, tokenizer, trainable, stream, val_set, depth,
              logger=None, looped=looped, objective=objective, info=info)  # fmt: skip
    run.on_policy = build_on_policy(run)  # None unless --distillation.on_policy.lmbda > 0
    run.flops_params = flop_params(model, teacher)
    run.peak_flops = measure_matmul_peak(device, torch.bfloat16 if cfg.precision == "bf16" else torch.float32)
    if cfg.precision == "bf16" and d.is_main and (warning := slow_bf16_warning(device)):
        print(warning, file=sys.stderr)
    resume_step = keep_lines = None
    if mode == "resume":
        if found is not None:
            keep_lines = restore(run, *found)
        elif d.is_main:
            print(f"no checkpoint yet in {out}: starting the run from step 0", file=sys.stderr)
        resume_step = run.step
        if d.is_main:
            record_resume(out, run, found[0].name if found else None, changed)
    elif d.is_main:
        # Everything is loaded and checked: only now is the run folder made (and an old one set aside).
        sequences = cfg.batch_size * d.world_size * cfg.gradient_accumulation_steps
        run.aside = create_run_folder(out, cfg, data.manifest, sequences, keep_old=mode == "replace")
    barrier(d)
    try:
        run.logger = MetricsLogger(
            out,
            d.is_main,
            cfg.tensorboard,
            cfg.wandb_project if cfg.wandb else None,
            resume_step,
            config=config_dict(cfg),
            keep_lines=keep_lines,
        )
    except BaseException:
        undo_replacement(run)
        raise
    if d.is_main and run.step == 0:
        n_train = sum(p.numel() for _, p in trainable)
        print(f"training {n_train:,} parameters; teacher weights shared with the student: "
              f"{info['shared_bytes'] / 2**20:.1f} MiB", file=sys.stderr)  # fmt: skip
        # The reference's rule k = min(k, mean) lives in the sampler; said aloud because a flag that does nothing
        # misleads.
        fixed_k = looped and not (cfg.fixed_num_steps or cfg.backprop_depth_schedule.turn_on)
        if fixed_k and cfg.backprop_depth > (mean := run.depth.final_mean):
            print(f"note: --backprop_depth {cfg.backprop_depth} exceeds the mean depth {mean}: at most {mean} "
                  "iterations get gradient (k = min(k, mean), as in arXiv:2511.07384)", file=sys.stderr)  # fmt: skip
    return run


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------------------------------- fit
def depth_at(run: Run, step: int) -> tuple[int, int, tuple[int, int]]:
    """(mean R, backprop depth k, (n_no_grad, k_grad)) for `step`: `run.depth`'s curricula and its seeded draw;
    zeros for a plain student."""
    if not run.looped:
        return 0, 0, (0, 0)
    return run.depth.mean_at(step), run.depth.backprop_depth_at(step), run.depth.draw(step)


def fit(run: Run, until: int | None = None) -> None:
    """Train from `run.step` to the end (or to `until`, which tests use to simulate an interruption)."""
    cfg, d = run.cfg, run.d
    total = cfg.total_steps
    stop = min(total, until) if until is not None else total
    bar = tqdm(total=total, initial=run.step, disable=not (cfg.progress_bar and d.is_main), dynamic_ncols=True)
    params = [p for _, p in run.trainable]
    # Here, not in setup: until training starts the models compute in float32 outside autocast too (a benchmark's
    # loss before the first step). FSDP2 shards a module's parameters as one dtype: left as they are there. Both
    # are no-ops on a later call.
    if cfg.precision == "bf16":
        if d.mode != "fsdp":
            store_frozen_linears(run.model, run.teacher)
        share_input_casts(run.model, run.teacher)
    started = time.perf_counter()
    while run.step < stop:
        enter_stage(run, run.step)
        t0 = time.perf_counter()
        _, start, length = stage_of(cfg, run.step)
        mean, k, num_steps = depth_at(run, run.step)
        metrics = train_step(run, num_steps, params)
        dt = time.perf_counter() - t0
        tokens = cfg.batch_size * cfg.seq_len * cfg.gradient_accumulation_steps * d.world_size
        n, kg = num_steps
        scored = n + kg if cfg.exit_gate.train else cfg.every_depth.k  # the gate's stage scores every depth
        depths = min(max(scored, 1), max(n + kg, 1))  # the loss at every depth's scored depths
        flops_tok = train_flops_per_token(run.flops_params, n, kg, cfg.seq_len, cfg.fixed_point_scale > 0,
                                          teacher=run.teacher is not None, depths=depths,
                                          forward_only=cfg.exit_gate.train)  # fmt: skip
        run.step += 1
        metrics.update(
            step=run.step,
            lr=cfg.optim_config.lr * lr_factor(run.step - 1 - start, length, cfg.lr_schedule),
            num_steps=n + kg,
            num_steps_no_grad=n,
            num_steps_grad=kg,
            mean_recurrence=mean,
            backprop_depth=k,
            tokens_per_s=tokens / dt,
            mfu=flops_tok * tokens / dt / (run.peak_flops * d.world_size),
            stage=run.stage,
        )
        for s in run.schedulers:
            s.step()
        if cfg.eval_every and run.step % cfg.eval_every == 0 and run.val_set is not None:
            metrics["val_loss"] = validate(run, [mean or None])[mean or None]
        if cfg.log_every and (run.step % cfg.log_every == 0 or run.step == total):
            run.logger.log(metrics)
        bar.update(1)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", R=metrics["num_steps"], mean=mean)
        if cfg.save_every and run.step % cfg.save_every == 0 and run.step < total:
            save_checkpoint(run)
        if cfg.max_minutes and _out_of_time(run, started + 60 * cfg.max_minutes):
            if d.is_main:
                print(f"stopping at step {run.step}: --max_minutes {cfg.max_minutes} reached", file=sys.stderr)
            break
    bar.close()


def _out_of_time(run: Run, deadline: float) -> bool:
    """Every rank stops at the same step: rank 0's clock decides."""
    flag = torch.tensor([1.0 if time.perf_counter() > deadline else 0.0], device=run.device)
    if run.d.world_size > 1:
        dist.broadcast(flag, src=0)
    return bool(flag.item())


def train_step(run: Run, num_steps: tuple[int, int], params: list) -> dict:
    """One optimizer step over `gradient_accumulation_steps` micro-batches; returns its (rank-reduced) metrics."""
    cfg, d = run.cfg, run.d
    sampled = on_policy_step(run, num_steps)  # None: an off-policy step (always, without --distillation.on_policy)
    if sampled is None:
        objective, extra = run.objective, {}
        batches = [
            {k: v.to(run.device) for k, v in run.stream.next().items()} for _ in range(cfg.gradient_accumulation_steps)
        ]
    else:
        batches, objective, extra = sampled
    local_items = sum((b["labels"][:, 1:] != -100).sum() for b in batches)
    num_items = all_reduce_sum(local_items.float(), d).clamp_min(1.0)
    names = run.objective.term_names  # ce, kd, hidden, fixed_point, router_aux, then ce_R-1, kd_R-1, ...
    sums = torch.zeros(1 + len(names), dtype=torch.float64, device=run.device)  # the total, then each term
    present: set[str] = set()
    depth_arg = num_steps if run.looped else None
    for i, batch in enumerate(batches):
        sync = i == len(batches) - 1 or not hasattr(run.student, "no_sync")
        with contextlib.nullcontext() if sync else run.student.no_sync(), run.autocast:
            parts = objective_loss(objective, run.student, run.teacher, batch, depth_arg, num_items)
        # DDP averages gradients over ranks; the loss is already a share of the global mean, so undo the average.
        (parts.total * d.world_size).backward()
        terms = parts.named()
        present |= set(terms)
        zero = parts.ce * 0
        sums += torch.stack([parts.total.detach().double()] + [terms.get(n, zero).double() for n in names])
    sums = all_reduce_sum(sums, d)
    with_grad = [p for p in params if p.grad is not None]
    grad_norm = torch.nn.utils.clip_grad_norm_(with_grad, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
    finite = bool(torch.isfinite(sums[0])) and bool(torch.isfinite(grad_norm))
    if not finite and cfg.nan_policy == "stop":
        raise LoopfitError(f"non-finite loss or gradient at step {run.step + 1} (loss {sums[0].item()}, grad norm "
                           f"{grad_norm.item()}); lower the lr or use --nan_policy=skip")  # fmt: skip
    if finite:
        for o in run.optimizers:
            o.step()
    elif d.is_main:
        print(f"step {run.step + 1}: non-finite loss or gradient, update skipped", file=sys.stderr)
    for o in run.optimizers:
        o.zero_grad(set_to_none=True)
    total, *values = (float(x) for x in sums)
    term = dict(zip(names, values))
    kd_on = cfg.distillation.enabled
    m = {"loss": total, "ce_loss": term["ce"], "kd_loss": term["kd"] if kd_on else None,
         "grad_norm": float(grad_norm), "num_items": int(num_items.item()), "skipped": not finite}  # fmt: skip
    if run.on_policy is not None:
        m.update(on_policy=sampled is not None, **extra)
    for name in names[2:]:  # logged when the objective has them (a per-depth term: when the step ran that deep)
        if name in present:
            m[f"{name}_loss"] = term[name]
    return m


# -------------------------------------------------------------------------------------------------- validate
@torch.no_grad()
def validate(run: Run, depths: list[int | None]) -> dict:
    """Mean next-token CE over the validation split (this rank's share, reduced), at each depth R."""
    if run.val_set is None:
        return {}
    cfg = run.cfg
    student = run.student  # called through any DDP/FSDP wrapper: FSDP2 gathers the weights around forward
    was_training = student.training
    student.eval()
    n = len(run.val_set)
    if cfg.eval_batches:
        n = min(n, cfg.eval_batches * cfg.batch_size * run.d.world_size)
    idx = list(range(run.d.rank, n, run.d.world_size))
    results = {}
    for r in depths:
        acc = torch.zeros(2, dtype=torch.float64, device=run.device)
        for j in range(0, len(idx), cfg.batch_size):
            rows = [run.val_set[i] for i in idx[j : j + cfg.batch_size]]
            ids = torch.stack([x["input_ids"] for x in rows]).to(run.device)
            labels = torch.stack([x["labels"] for x in rows]).to(run.device)
            pos = torch.stack([x["position_ids"] for x in rows]).to(run.device) if cfg.position_ids else None
            with run.autocast:
                h, _, head, *_ = student(ids, num_steps=r if run.looped else None, position_ids=pos)
            logits = family_logits(h[:, :-1], head, base_model(run.model).config).float()
            y = labels[:, 1:]
            acc[0] += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum")
            acc[1] += (y != -100).sum()
        acc = all_reduce_sum(acc, run.d)
        results[r] = float(acc[0] / acc[1].clamp_min(1))
    student.train(was_training)
    return results


# ------------------------------------------------------------------------------------------------------ save
def save_final(run: Run, val: dict) -> None:
    """Final checkpoint, the final validation line, the HF folder `final/` (LoRA adapter or full model, with
    tokenizer) and `done.json`, in that order: the checkpoint counts the metrics lines before the validation line,
    so a kill after it and a resume validate again and log that line exactly once."""
    if run.saved_step != run.step:  # not when resumed from the final checkpoint itself
        save_checkpoint(run)
    if val and run.d.is_main:
        run.logger.log({"step": run.step, **{f"val_loss_r{k}" if k else "val_loss": v for k, v in val.items()}})
    if run.d.is_main:
        model = run.model
        if run.d.mode == "fsdp":
            model = _unsharded_copy(run)
        # replace_unmarked: final/ inside loopfit's own run is replaced even if a kill or damage left it unmarked.
        with atomic_dir(run.out / "final", overwrite=True, kind="model", replace_unmarked=True) as tmp:
            model.save_pretrained(tmp)
            run.tokenizer.save_pretrained(tmp)
        write_json(run.out / DONE, {"step": run.step, "val_loss": {str(k): v for k, v in val.items()}, **run.info})
    barrier(run.d)


def _unsharded_copy(run: Run) -> nn.Module:
    """Under FSDP2 the student's tensors are shards: rebuild it whole on rank 0 from the last checkpoint's weights."""
    model = load_model(run.cfg.model_name)
    if run.cfg.lora.enabled:
        model = apply_lora(model, run.cfg.lora)
    weights, _ = ckpt.load_checkpoint(ckpt.latest_checkpoint(run.out), advice="rerun with --resume=true")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, w in weights.items():
            if n in params:
                params[n].copy_(w)
    return model


def train(cfg: TrainConfig) -> dict | None:
    """Set up, fit, validate at the final mean and `eval_num_steps`, save. Returns the validation losses."""
    run = setup(cfg)
    if run is None:
        return None
    try:
        fit(run)
        depths: list[int | None] = [None]
        if run.looped:
            depths = sorted({run.depth.final_mean, *cfg.eval_num_steps})
        val = validate(run, depths)
        save_final(run, val)
        if val and run.d.is_main:
            print("validation loss: " + ", ".join(f"R={k}: {v:.4f}" if k else f"{v:.4f}" for k, v in val.items()))
        return val
    except BaseException:
        run.logger.close()
        undo_replacement(run)
        raise
    finally:
        run.logger.close()
        cleanup(run.d)
