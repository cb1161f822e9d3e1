"""Adaptive exit: per generated token, stop looping once the recurrence has converged (Huginn, arXiv:2502.05171).

Criteria, checked after iteration `it` when `it >= min_num_steps` and `it % check_every == 0`:
- `kl`: KL(p_prev || p_it) between the next-token distributions of successive checks (the first check compares
  against the uniform distribution) below the threshold (default 1e-3);
- `state`: relative state change `|s_it - s_(it-1)| / |s_it|` below the threshold (default 0.03);
- `argmax`: the predicted token unchanged over `threshold` successive checks (default 5);
- `gate`: the model's learned exit gate (`loopfit.models.exit_gate`): its cumulative exit probability reaches the
  threshold q in [0, 1] (default 0.5; Ouro's Q-exit, arXiv:2510.25741); the gate is read after every iteration;
- `none`: always run `max_num_steps` iterations.

The prompt (prefill) always runs `max_num_steps` iterations. Sequences are decoded in batches (left padding, an
attention mask, positions counting real tokens) with depth-wise batching: at loop iteration i the block runs only
on the rows still iterating, gathered with their cached keys/values, and each row stops at its own exit; the
one-sequence decoder is the batch of one. The `kl` and `argmax` checks need the coda and head at every checked
iteration; a row that exits at a check keeps that pass (its logits and coda cache entries), the others get one coda
pass on their final state. In `full` cache mode a token that exits after `u` iterations still gives the slots of the
skipped iterations `u+1..max_num_steps` an entry (a copy of iteration `u`'s keys and values), so that later tokens
that loop longer find every position at every iteration; `compress` mode keeps one slot per block layer, which
holds each row's last iteration.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
from transformers.cache_utils import DynamicCache

from loopfit.data.chat import format_prompt
from loopfit.data.packing import left_pad
from loopfit.errors import LoopfitError
from loopfit.models.depth import generation_depth
from loopfit.models.exit_gate import gate_exit
from loopfit.models.sampling import draw, padded_positions

CRITERIA = ("kl", "state", "argmax", "gate", "none")
DEFAULT_THRESHOLDS = {"kl": 1e-3, "state": 0.03, "argmax": 5, "gate": 0.5, "none": 0.0}


@dataclass
class ExitConfig:
    """When to stop looping for a token."""

    criterion: str = "kl"
    """`kl`, `state`, `argmax`, `gate` or `none`."""
    threshold: float | None = None
    """Exit threshold (for `argmax`: the number of checks the argmax must stay unchanged); default per criterion."""
    min_num_steps: int = 1
    """Never exit before this many iterations."""
    check_every: int = 1
    """Check the criterion every this many iterations."""
    max_num_steps: int | None = None
    """Iterations of the prompt, and the most per token (default: `generation_depth`, as `generate`)."""

    def __post_init__(self):
        if self.criterion not in CRITERIA:
            raise LoopfitError(f"--exit_criterion must be one of {', '.join(CRITERIA)}, got '{self.criterion}'")
        if self.threshold is None:
            self.threshold = DEFAULT_THRESHOLDS[self.criterion]
        thr = self.threshold
        bad = (self.criterion == "argmax" and (thr < 1 or thr != int(thr))) or (self.criterion == "gate" and thr > 1)
        if thr < 0 or bad:
            raise LoopfitError(f"bad --exit_threshold {thr} for --exit_criterion {self.criterion}")
        if min(1 if self.max_num_steps is None else self.max_num_steps, self.min_num_steps, self.check_every) < 1:
            raise LoopfitError("--num_steps, --min_num_steps and --check_every must be >= 1")

    def resolved(self, model) -> ExitConfig:
        """A copy with `max_num_steps` filled in from the model."""
        max_num_steps = self.max_num_steps if self.max_num_steps is not None else generation_depth(model)
        return ExitConfig(self.criterion, self.threshold, self.min_num_steps, self.check_every, max_num_steps)


class _StagedCache:
    """One decoding step's view of the KV cache, for the batch rows still iterating (`rows`; None: all of them).

    `update(k, v, slot)` returns those rows' past entries plus the new ones, and stages the new entries as the slot's
    entry of the current token for those rows: a later write for the same row and slot replaces it (compress mode's
    overwrite; a `kl` check's coda pass superseded by a later one). `commit` appends every slot's staged entries,
    each `(batch, kv_heads, 1, head_dim)`, at the end of the step. Gathering the rows' past costs one copy of their
    keys/values per layer call, small next to the layer's weights at decoding's batch sizes; the new entries are
    never scattered into the cache until the step ends, so the cache is appended to once per slot per token.
    """

    def __init__(self, cache: DynamicCache, batch: int):
        self.cache, self.batch, self.rows = cache, batch, None
        self.staged: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        layer = self.cache.layers[layer_idx]
        past_k, past_v = layer.keys, layer.values
        if self.rows is None:
            self.staged[layer_idx] = (key_states, value_states)
        else:
            past_k, past_v = past_k.index_select(0, self.rows), past_v.index_select(0, self.rows)
            k, v = self.staged.get(layer_idx) or (
                key_states.new_zeros(self.batch, *key_states.shape[1:]),
                value_states.new_zeros(self.batch, *value_states.shape[1:]),
            )
            self.staged[layer_idx] = (k.index_copy(0, self.rows, key_states), v.index_copy(0, self.rows, value_states))
        return torch.cat([past_k, key_states], dim=-2), torch.cat([past_v, value_states], dim=-2)

    # Compress mode's overwrite (models/layers.py): a write already replaces the staged entry of the current token.
    replace_current = update

    def carry(self, src: list[int], dst: list[int]) -> None:
        """Stage slots `src`'s entries in slots `dst` (rows that iterate further overwrite theirs)."""
        for a, b in zip(src, dst):
            self.staged[b] = self.staged[a]

    def commit(self) -> None:
        for slot, (k, v) in self.staged.items():
            self.cache.update(k, v, slot)

    def __getattr__(self, name):
        return getattr(self.cache, name)


class _RowExit:
    """The exit test of one decoding step, vectorised over the rows still iterating; remembers each row's last check.

    Every row checks at the same iterations, so the rows at a check have all been through the same earlier checks.
    """

    def __init__(self, exit: ExitConfig, batch: int):
        self.x, self.batch = exit, batch
        self.prev: torch.Tensor | None = None  # (batch, vocab) log-probabilities of each row's last check
        self.stable: torch.Tensor | None = None  # (batch,) argmax: checks the prediction has stayed the same

    def __call__(self, rows: torch.Tensor, s: torch.Tensor, s_old: torch.Tensor, logits: torch.Tensor | None):
        """`done` (len(rows),) bool for states `s`, `s_old` (len(rows), 1, hidden) and check logits (len(rows), V)."""
        x = self.x
        if x.criterion == "state":
            change = (s - s_old).flatten(1).norm(dim=1) / s.flatten(1).norm(dim=1).clamp_min(1e-12)
            return change < x.threshold
        logp = logits.log_softmax(-1)
        first = self.prev is None
        if first:
            self.prev = torch.full((self.batch, logp.shape[-1]), -math.log(logp.shape[-1]), device=logp.device)
            self.stable = torch.zeros(self.batch, dtype=torch.long, device=logp.device)
        prev = self.prev.index_select(0, rows)
        self.prev.index_copy_(0, rows, logp)
        if x.criterion == "kl":
            kl = (prev.exp() * (prev - logp)).sum(-1)
            return kl.clamp_min(0.0) < x.threshold  # rounding can make an exact 0 slightly negative
        same = (logp.argmax(-1) == prev.argmax(-1)) & (not first)
        stable = torch.where(same, self.stable.index_select(0, rows) + 1, 0)
        self.stable.index_copy_(0, rows, stable)
        return stable >= x.threshold


@dataclass
class AdaptiveOutput:
    tokens: list[int]
    """Generated (or scored) token ids."""
    iterations: list[int]
    """Loop iterations used for each token's forward pass."""
    logprobs: list[float] = field(default_factory=list)
    """With `score_adaptive`: log p(token) of each scored token."""

    @property
    def mean_iterations(self) -> float:
        return sum(self.iterations) / max(1, len(self.iterations))


class AdaptiveDecoder:
    """Step-by-step decoding of a batch of sequences with a per-row, per-token adaptive loop depth.

    Depth-wise batching: at iteration i the block runs only on the rows still iterating (their states, masks,
    positions and cached keys/values gathered), rows that meet the criterion stop, and every cache slot gets one
    entry per row per token (`_StagedCache`). Batch size 1 is the one-sequence decoder.
    """

    def __init__(self, model, exit: ExitConfig):
        if model.config.model_type != "looped":
            raise LoopfitError("adaptive exit needs a looped model")
        if exit.criterion == "gate" and model.model.exit_gate is None:
            raise LoopfitError("--exit_criterion gate needs a model with an exit gate (train one: --exit_gate.train)")
        self.model, self.exit = model.eval(), exit.resolved(model)
        self.cache = DynamicCache()
        self.mask: torch.Tensor | None = None  # (batch, past) 0/1, left padding
        self.positions: torch.Tensor | None = None  # (batch,) position of each row's next token

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Run the prompts `(batch, T)` (left-padded, `attention_mask` 0 on padding) at `max_num_steps`.

        Returns the last position's next-token logits `(batch, vocab)`, float32.
        """
        device = self.model.device
        input_ids = input_ids.to(device)
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device).long()
        pos = padded_positions(mask)  # a padded row sees the positions (and state noise) it has alone
        out = self.model(input_ids, attention_mask=mask, position_ids=pos, cache=self.cache, use_cache=True,
                         num_steps=self.exit.max_num_steps, logits_to_keep=1)  # fmt: skip
        self.mask, self.positions = mask, pos[:, -1] + 1
        return out.logits[:, -1].float()

    def keep(self, rows: torch.Tensor) -> None:
        """Drop every row but `rows` (1-D index; finished sequences) from the batch and its cache."""
        rows = rows.to(self.mask.device)
        self.cache.batch_select_indices(rows)
        self.mask, self.positions = self.mask[rows], self.positions[rows]

    def _coda_logits(self, s, ctx) -> torch.Tensor:
        return self.model.logits_from_hidden(self.model.model.run_coda(s, ctx))[:, -1].float()

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed one token per row, `tokens` `(batch,)`.

        Returns the next-token logits `(batch, vocab)` (float32) and the iterations each row used `(batch,)`.
        A `kl`/`argmax` row that exits at a check keeps that check's coda pass (its logits and coda cache entries);
        the others get one coda pass on their final state.
        """
        dec, x, R = self.model.model, self.exit, self.exit.max_num_steps
        full = self.model.config.cache_mode == "full"
        tokens = tokens.to(self.mask.device)
        batch = tokens.shape[0]
        self.mask = torch.cat([self.mask, self.mask.new_ones(batch, 1)], dim=1)
        pos = self.positions[:, None]
        x_emb = dec.embed(tokens[:, None])
        staged = _StagedCache(self.cache, batch)
        ctx = replace(dec.prepare(x_emb, self.mask, pos, self.cache, use_cache=True), cache=staged)
        e = dec.run_prelude(x_emb, ctx)
        s = dec.initial_state(e, pos)
        check = _RowExit(x, batch)
        used = torch.full((batch,), R, dtype=torch.long, device=tokens.device)
        s_out, logits = torch.empty_like(s), None
        have = torch.zeros(batch, dtype=torch.bool, device=tokens.device)
        active, sub, e_act = torch.arange(batch, device=tokens.device), ctx, e
        survival = None  # gate: (active,) log survival of each row still iterating
        for it in range(R):
            if full and it:
                staged.carry(dec.block_slots(it - 1), dec.block_slots(it))  # for rows that stopped before it
            staged.rows = None if len(active) == batch else active
            s_old, s = s, dec.iterate(s, e_act, it, sub)
            n = it + 1
            if x.criterion == "gate":  # every iteration's hazard enters the survival, checked or not
                gate_done, survival = gate_exit(dec.exit_gate, s, survival, x.threshold)
            if x.criterion == "none" or n >= R or n < x.min_num_steps or n % x.check_every:
                continue
            step_logits = self._coda_logits(s, sub) if x.criterion in ("kl", "argmax") else None
            done = gate_done if x.criterion == "gate" else check(active, s, s_old, step_logits)
            if not bool(done.any()):
                continue
            rows = active[done]
            used[rows], s_out[rows] = n, s[done]
            if step_logits is not None:
                logits = step_logits.new_empty(batch, step_logits.shape[-1]) if logits is None else logits
                logits[rows], have[rows] = step_logits[done], True
            active, s, e_act = active[~done], s[~done], e_act[~done]
            survival = survival[~done] if survival is not None else None
            if not len(active):
                break
            sub = ctx.select_rows(active, staged)
        s_out[active] = s
        if full:
            # Later tokens attend to every iteration's slot: those no row reached get the last computed entry.
            for it in range(int(used.max()), R):
                staged.carry(dec.block_slots(it - 1), dec.block_slots(it))
        rest = (~have).nonzero().squeeze(1)
        if len(rest):
            staged.rows = None if len(rest) == batch else rest
            final = self._coda_logits(s_out[rest], ctx if len(rest) == batch else ctx.select_rows(rest, staged))
            logits = final.new_empty(batch, final.shape[-1]) if logits is None else logits
            logits[rest] = final
        staged.commit()
        self.positions = self.positions + 1
        return logits, used


def _next_tokens(logits: torch.Tensor, do_sample: bool, temperature: float) -> torch.Tensor:
    return draw(logits, temperature=temperature) if do_sample else logits.argmax(-1)  # the global RNG's draws


def generate_adaptive_batch(
    model,
    prompts: list[list[int]],
    exit: ExitConfig,
    max_new_tokens: int = 64,
    eos_token_id: int | list[int] | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    pad_token_id: int = 0,
) -> list[AdaptiveOutput]:
    """Decode up to `max_new_tokens` after each prompt (token id lists), all in one left-padded batch.

    A row that produces an EOS token, or reaches `max_new_tokens`, leaves the batch. Greedy decoding gives each
    sequence the tokens and depths it gets alone (up to float rounding of padded vs unpadded attention).
    """
    if not prompts or not all(prompts):
        raise LoopfitError("adaptive decoding needs at least one sequence and no empty one")
    eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or [])
    ids, mask = left_pad(prompts, pad_token_id)
    decoder = AdaptiveDecoder(model, exit)
    logits = decoder.prefill(ids, mask)
    outs = [AdaptiveOutput([], []) for _ in prompts]
    live = list(range(len(prompts)))  # output index of each row of the batch
    while True:
        tokens = _next_tokens(logits, do_sample, temperature)
        keep = []
        for r, t in enumerate(tokens.tolist()):
            outs[live[r]].tokens.append(t)
            if t not in eos and len(outs[live[r]].tokens) < max_new_tokens:
                keep.append(r)
        if not keep:
            return outs
        if len(keep) < len(live):
            rows = torch.tensor(keep)
            decoder.keep(rows)
            tokens, live = tokens[rows.to(tokens.device)], [live[r] for r in keep]
        logits, used = decoder.step(tokens)
        for r, u in enumerate(used.tolist()):
            outs[live[r]].iterations.append(u)


def generate_adaptive(
    model,
    input_ids: torch.Tensor,
    exit: ExitConfig,
    max_new_tokens: int = 64,
    eos_token_id: int | list[int] | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
) -> AdaptiveOutput:
    """Decode up to `max_new_tokens` after the prompt `input_ids` (1, T): `generate_adaptive_batch` of one."""
    if input_ids.shape[0] != 1:
        raise LoopfitError("generate_adaptive takes one prompt (1, T); use generate_adaptive_batch for several")
    out = generate_adaptive_batch(model, [input_ids[0].tolist()], exit, max_new_tokens, eos_token_id, do_sample,
                                  temperature)  # fmt: skip
    return out[0]


def score_adaptive_batch(model, input_ids: torch.Tensor, prefix_len: int, exit: ExitConfig) -> list[AdaptiveOutput]:
    """Teacher-forced log-probabilities of `input_ids[:, prefix_len:]` `(batch, T)` with adaptive exit on each token.

    The first scored token of each row comes from the prefill (always `max_num_steps`); each later one from a step
    whose depth the criterion chose for that row. Comparing the mean NLL with `criterion="none"` gives the loss cost
    of exiting early. Raises `LoopfitError` without a prefix of at least one token and something after it.
    """
    if not 1 <= prefix_len < input_ids.shape[1]:
        raise LoopfitError("score_adaptive needs a prefix of at least one token and something after it")
    decoder = AdaptiveDecoder(model, exit)
    logits = decoder.prefill(input_ids[:, :prefix_len])
    outs = [AdaptiveOutput([], []) for _ in range(input_ids.shape[0])]
    for t in range(prefix_len, input_ids.shape[1]):
        target = input_ids[:, t].to(logits.device)
        logp = logits.log_softmax(-1).gather(1, target[:, None])[:, 0].tolist()
        for out, tok, lp in zip(outs, target.tolist(), logp):
            out.tokens.append(tok)
            out.logprobs.append(lp)
        if t + 1 < input_ids.shape[1]:
            logits, used = decoder.step(target)
            for out, u in zip(outs, used.tolist()):
                out.iterations.append(u)
    return outs


def score_adaptive(model, input_ids: torch.Tensor, prefix_len: int, exit: ExitConfig) -> AdaptiveOutput:
    """`score_adaptive_batch` of one sequence `(1, T)`."""
    if input_ids.shape[0] != 1:
        raise LoopfitError("score_adaptive takes one sequence (1, T); use score_adaptive_batch for several")
    return score_adaptive_batch(model, input_ids, prefix_len, exit)[0]


def adaptive_generation_lines(
    model,
    tokenizer,
    prompts: list[str],
    exit: ExitConfig,
    max_new_tokens: int,
    chat: bool,
    system: str | None,
    do_sample: bool,
    temperature: float,
) -> list[str]:
    """`loopfit generate --exit_criterion ...` for one batch of prompts: each prompt's continuation and the mean
    iterations it used, one line per prompt (the command chunks the prompts by `--batch_size`)."""
    eos = [t for t in {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")} if isinstance(t, int)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    exit = exit.resolved(model)
    texts = [format_prompt(tokenizer, p, chat, system) for p in prompts]
    ids = [tokenizer(t, add_special_tokens=not chat)["input_ids"] for t in texts]
    outs = generate_adaptive_batch(model, ids, exit, max_new_tokens, eos, do_sample, temperature, pad)
    return [
        f"[{exit.criterion}<{exit.threshold:g}, mean {out.mean_iterations:.2f} of {exit.max_num_steps} "
        f"iterations] {p!r} -> {tokenizer.decode(out.tokens, skip_special_tokens=True).strip()!r}"
        for p, out in zip(prompts, outs)
    ]
