"""Adaptive exit: per generated token, stop looping once the recurrence has converged (Huginn, arXiv:2502.05171).

Criteria, checked after iteration `it` when `it >= min_num_steps` and `it % check_every == 0`:
- `kl`: KL(p_prev || p_it) between the next-token distributions of successive checks (the first check compares
  against the uniform distribution) below the threshold (default 1e-3);
- `state`: relative state change `|s_it - s_(it-1)| / |s_it|` below the threshold (default 0.03);
- `argmax`: the predicted token unchanged over `threshold` successive checks (default 5);
- `gate`: the model's learned exit gate (`loopfit.models.exit_gate`): its cumulative exit probability reaches the
  threshold q in [0, 1] (default 0.5; Ouro's Q-exit, arXiv:2510.25741); the gate is read after every iteration;
- `none`: always run `max_num_steps` iterations.

The prompt (prefill) always runs `max_num_steps` iterations. The `kl` and `argmax` checks need the coda and head at
every checked iteration: they read the coda's cached keys/values through a throwaway view that writes nothing, so
only the final state's coda pass enters the cache. In `full` cache mode a token that exits after `u` iterations
still gives the slots of the skipped iterations `u+1..max_num_steps` an entry (a copy of iteration `u`'s keys and
values), so that later tokens that loop longer find every position at every iteration; `compress` mode keeps one
slot per block layer and needs nothing. Decoding is one sequence at a time (the exit is per token).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
from transformers.cache_utils import DynamicCache

from loopfit.data.chat import format_prompt
from loopfit.errors import LoopfitError
from loopfit.models.exit_gate import gate_exit

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
    """Iterations of the prompt, and the most per token (default: the model's mean_recurrence)."""

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
        max_num_steps = self.max_num_steps if self.max_num_steps is not None else model.config.mean_recurrence
        return ExitConfig(self.criterion, self.threshold, self.min_num_steps, self.check_every, max_num_steps)


class _ReadOnlyCache:
    """A view of a cache whose `update` returns past + new keys/values without storing anything."""

    def __init__(self, cache: DynamicCache):
        self.cache = cache

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        layer = self.cache.layers[layer_idx]
        return torch.cat([layer.keys, key_states], dim=-2), torch.cat([layer.values, value_states], dim=-2)

    def __getattr__(self, name):
        return getattr(self.cache, name)


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
    """Step-by-step decoding of one sequence with a per-token adaptive loop depth."""

    def __init__(self, model, exit: ExitConfig):
        if model.config.model_type != "looped":
            raise LoopfitError("adaptive exit needs a looped model")
        if exit.criterion == "gate" and model.model.exit_gate is None:
            raise LoopfitError("--exit_criterion gate needs a model with an exit gate (train one: --exit_gate.train)")
        self.model, self.exit = model.eval(), exit.resolved(model)
        self.cache = DynamicCache()
        self.length = 0

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Run the prompt (1, T) at `max_num_steps`; returns the last position's logits (1, vocab)."""
        if input_ids.shape[0] != 1:
            raise LoopfitError("adaptive exit decodes one sequence at a time (batch size 1)")
        out = self.model(input_ids, cache=self.cache, use_cache=True, num_steps=self.exit.max_num_steps)
        self.length = input_ids.shape[1]
        return out.logits[:, -1]

    def _coda_logits(self, s, ctx) -> torch.Tensor:
        return self.model.logits_from_hidden(self.model.model.run_coda(s, ctx))[:, -1].float()

    @torch.inference_mode()
    def step(self, token: int) -> tuple[torch.Tensor, int]:
        """Feed one token; returns the next-token logits (1, vocab) and the iterations used."""
        dec, x = self.model.model, self.exit
        full = self.model.config.cache_mode == "full"
        pos = torch.tensor([[self.length]])
        x_emb = dec.embed(torch.tensor([[token]]))
        ctx = dec.prepare(x_emb, None, pos, self.cache, use_cache=True)
        e = dec.run_prelude(x_emb, ctx)
        s = dec.initial_state(e, pos)
        peek = replace(ctx, cache=_ReadOnlyCache(self.cache))
        prev_logp = survival = None
        stable = 0
        used = x.max_num_steps
        for it in range(x.max_num_steps):
            s_old = s
            s = dec.iterate(s, e, it, ctx)
            n = it + 1
            if x.criterion == "gate":  # every iteration's hazard enters the survival, checked or not
                gate_done, survival = gate_exit(dec.exit_gate, s, survival, x.threshold)
            if x.criterion == "none" or n >= x.max_num_steps or n < x.min_num_steps or n % x.check_every:
                continue
            if x.criterion == "gate":
                done = bool(gate_done.all())
            elif x.criterion == "state":
                done = ((s - s_old).norm() / s.norm().clamp_min(1e-12)).item() < x.threshold
            else:
                logp = self._coda_logits(s, peek).log_softmax(-1)
                if x.criterion == "kl":
                    if prev_logp is None:
                        prev_logp = torch.full_like(logp, -math.log(logp.shape[-1]))
                    kl = (prev_logp.exp() * (prev_logp - logp)).sum().item()
                    done = max(kl, 0.0) < x.threshold  # rounding can make an exact 0 slightly negative
                else:
                    same = prev_logp is not None and bool(logp.argmax() == prev_logp.argmax())
                    stable = stable + 1 if same else 0
                    done = stable >= x.threshold
                prev_logp = logp
            if done:
                used = n
                break
        if full:
            # Later tokens attend to every iteration's slot: the skipped ones get a copy of the last one's entry.
            last_slots = dec.block_slots(used - 1)
            for it in range(used, x.max_num_steps):
                for src, dst in zip(last_slots, dec.block_slots(it)):
                    last = self.cache.layers[src]
                    self.cache.update(last.keys[..., -1:, :], last.values[..., -1:, :], dst)
        logits = self._coda_logits(s, ctx)
        self.length += 1
        return logits, used


def generate_adaptive(
    model,
    input_ids: torch.Tensor,
    exit: ExitConfig,
    max_new_tokens: int = 64,
    eos_token_id: int | list[int] | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
) -> AdaptiveOutput:
    """Decode up to `max_new_tokens` after the prompt `input_ids` (1, T), greedily or by sampling."""
    eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or [])
    decoder = AdaptiveDecoder(model, exit)
    logits = decoder.prefill(input_ids)
    out = AdaptiveOutput([], [])
    for _ in range(max_new_tokens):
        if do_sample:
            token = int(torch.multinomial((logits.float() / temperature).softmax(-1)[0], 1))
        else:
            token = int(logits.argmax(-1))
        out.tokens.append(token)
        if token in eos or len(out.tokens) == max_new_tokens:
            break
        logits, used = decoder.step(token)
        out.iterations.append(used)
    return out


def score_adaptive(model, input_ids: torch.Tensor, prefix_len: int, exit: ExitConfig) -> AdaptiveOutput:
    """Teacher-forced log-probabilities of `input_ids[0, prefix_len:]` with adaptive exit on each token fed.

    The first scored token comes from the prefill (always `max_num_steps`); each later one from a step whose depth
    the criterion chose. Comparing the mean NLL with `criterion="none"` gives the loss cost of exiting early.
    """
    if not 1 <= prefix_len < input_ids.shape[1]:
        raise LoopfitError("score_adaptive needs a prefix of at least one token and something after it")
    decoder = AdaptiveDecoder(model, exit)
    ids = input_ids[0].tolist()
    logits = decoder.prefill(input_ids[:, :prefix_len])
    out = AdaptiveOutput([], [])
    for t in range(prefix_len, len(ids)):
        out.tokens.append(ids[t])
        out.logprobs.append(logits.float().log_softmax(-1)[0, ids[t]].item())
        if t + 1 < len(ids):
            logits, used = decoder.step(ids[t])
            out.iterations.append(used)
    return out


def print_adaptive_generations(
    model,
    tokenizer,
    prompts: list[str],
    exit: ExitConfig,
    max_new_tokens: int,
    chat: bool,
    system: str | None,
    do_sample: bool,
    temperature: float,
) -> None:
    """`loopfit generate --exit_criterion ...`: decode each prompt alone and print the iterations it used."""
    eos = [t for t in {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")} if isinstance(t, int)]
    exit = exit.resolved(model)
    for p in prompts:
        ids = tokenizer(format_prompt(tokenizer, p, chat, system), return_tensors="pt", add_special_tokens=not chat)
        out = generate_adaptive(model, ids["input_ids"], exit, max_new_tokens, eos, do_sample, temperature)
        text = tokenizer.decode(out.tokens, skip_special_tokens=True)
        print(
            f"[{exit.criterion}<{exit.threshold:g}, mean {out.mean_iterations:.2f} of {exit.max_num_steps} iterations] "
            f"{p!r} -> {text.strip()!r}"
        )
