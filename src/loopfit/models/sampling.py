"""Batched ancestral sampling with a preallocated KV cache: the student's completions in on-policy distillation.

`sample` decodes a left-padded batch token by token through the model's own forward (for a looped model: prelude,
R iterations of the block, coda, at one depth for the whole call), one forward per new token with the KV cache, and
draws each token from `softmax(logits / temperature)`, restricted to the top-p nucleus. It does what HF `generate`
does for `do_sample=True, top_k=0` (same positions, masks, padding of finished rows and stop when every row has
ended), without its per-step machinery, and differs in two places, both for speed on CPU decoding:

- A looped model's cache keeps every slot in one buffer allocated for the whole call (`PreallocatedLayer`); the
  default `DynamicLayer` copies a slot's whole past at every token (`torch.cat`): keys and values of 32 slots per
  token step for a 4-6-4 loop at R = 4.
- The draw is by inverse CDF, one uniform number per row from the caller's `torch.Generator`, over a float64
  cumulative sum of the probabilities; `torch.multinomial` (what `generate` calls) draws one exponential number per
  vocabulary entry, 4.5 ms per token step for 4 rows x 49152 on a 2-core CPU. Same distribution, other random
  numbers: the tokens are not `generate`'s for the same seed; greedy decoding (`do_sample=False`) gives `generate`'s.
The model's `generation_config` is not read (no repetition penalty, min-p, suppressed tokens: the draw is from the
model's own distribution, what on-policy distillation takes its divergence on).

It also decodes under `torch.inference_mode` (~7% less per token step than `no_grad` here). On a 2-core AVX2 EPYC
(SmolLM2 4-6-4 loop, R = 4, LoRA merged, weights prepacked, batch 4, 64 new tokens), interleaved runs: a token step
took 86 ms against 100 ms through `generate` before inference mode, and ~62 ms with it and with the q/k/v and gate/up
weights packed as one each (`models.prepacked`); see `benchmarks/on_policy.py` and docs/benchmarks.md.
"""

from __future__ import annotations

from functools import partial

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from loopfit.models.outputs import CACHE_FIELD


class PreallocatedLayer(DynamicLayer):
    """A `DynamicLayer` whose keys and values live in one buffer of `capacity` positions, written in place.

    `keys` / `values` are always views of the buffer's filled prefix, `(batch, kv_heads, length, head_dim)`, so every
    `DynamicLayer` method (mask sizes, `crop`, batch selection) reads them as it reads its own. An update that finds
    them replaced by something else (`batch_select_indices`, `reorder_cache`), or that would pass the capacity, first
    moves them into a new buffer: the result is always what `DynamicLayer.update` returns, `cat([past, new], -2)`.
    Returned views share the buffer: an entry overwritten later in place (compress mode's current token) changes in
    them too, as the loop expects.
    """

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        past = self.get_seq_length()
        batch, heads, new, dim = key_states.shape
        bufs = self._buffers
        ours = bufs is not None and (past == 0 or self.keys.data_ptr() == bufs[0].data_ptr())
        fits = bufs is not None and bufs[0].shape[0] == batch and past + new <= bufs[0].shape[2]
        if not (ours and fits):
            size = max(self.capacity, past + new)
            k = key_states.new_empty(batch, heads, size, dim)
            v = value_states.new_empty(batch, heads, size, value_states.shape[-1])
            if past:
                k[:, :, :past].copy_(self.keys)
                v[:, :, :past].copy_(self.values)
            self._buffers = bufs = (k, v)
        k, v = bufs
        k[:, :, past : past + new].copy_(key_states)
        v[:, :, past : past + new].copy_(value_states)
        self.keys, self.values = k[:, :, : past + new], v[:, :, : past + new]
        return self.keys, self.values

    def reset(self) -> None:
        super().reset()
        self._buffers = None


def preallocated_cache(capacity: int) -> DynamicCache:
    """An empty config-less `DynamicCache` whose slots, created as the model first writes them, are
    `PreallocatedLayer`s of `capacity` positions (a looped model's slots: one per prelude / coda layer and per
    (iteration, block layer))."""
    cache = DynamicCache()
    cache.layer_class_to_replicate = partial(PreallocatedLayer, capacity)
    return cache


def draw(logits: torch.Tensor, generator: torch.Generator | None = None, temperature: float = 1.0,
         top_p: float = 1.0) -> torch.Tensor:  # fmt: skip
    """One token per row of `logits` `(batch, vocab)` from `softmax(logits / temperature)`; `top_p < 1` keeps the
    smallest set of most probable tokens holding at least `top_p` of the probability (nucleus sampling, Holtzman
    et al. 2019, arXiv:1904.09751), the most probable always. Inverse CDF: the first token whose cumulative
    probability (float64) exceeds `u * total`, `u ~ U[0, 1)` from `generator`, one per row; a token of probability 0
    is never drawn. Returns `(batch,)` long.

    Raises:
        ValueError: a row's probabilities are not finite (NaN or infinite logits); `temperature <= 0`, or `top_p`
            outside (0, 1].
    """
    _check_settings(temperature, top_p)
    probs = (logits.float() / temperature).softmax(-1)
    order = None
    if top_p < 1:
        probs, order = probs.sort(-1, descending=True)
        above = probs.cumsum(-1) - probs  # probability of the tokens ranked above each one
        probs = probs.masked_fill(above >= top_p, 0.0)
    cdf = probs.double().cumsum(-1)
    total = cdf[:, -1:]
    if not bool(torch.isfinite(total).all()):
        raise ValueError("sampling: the model's next-token probabilities are not finite (NaN or infinite logits)")
    u = torch.rand(total.shape, generator=generator, device=total.device, dtype=torch.float64) * total
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))  # `u * total` may round up to `total`
    index = torch.searchsorted(cdf, u, right=True)
    return (index if order is None else order.gather(-1, index)).squeeze(-1)


def padded_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids `(batch, seq)` of a left-padded batch: counting real tokens only (as `generate` computes them), so
    a padded row sees the positions it has alone; padding gets 1."""
    return (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)


def _check_settings(temperature: float, top_p: float) -> None:
    if not temperature > 0 or not 0 < top_p <= 1:
        raise ValueError(f"temperature must be > 0 and top_p in (0, 1], got {temperature} and {top_p}")


def sample(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    eos_token_ids: list[int],
    pad_token_id: int,
    generator: torch.Generator | None = None,
    temperature: float = 1.0,
    top_p: float = 1.0,
    num_steps: int | None = None,
    do_sample: bool = True,
) -> torch.Tensor:
    """Continue each row of a left-padded batch by up to `max_new_tokens` tokens, in eval mode (restored after).

    Args:
        model: a causal LM (a looped one, a plain HF one or either wrapped by PEFT).
        input_ids, attention_mask: `(batch, prompt)`, left-padded, the mask 0 on padding.
        eos_token_ids: ids that end a row; a row's tokens after its first EOS are `pad_token_id`.
        generator: the source of the draws (on the model's device); None: the global RNG.
        temperature, top_p: as `draw`. num_steps: loop iterations R of a looped model (None: its default; must be
            None for a plain model). do_sample: False takes the argmax (greedy: `generate`'s tokens).

    Returns:
        `(batch, T)` long, `T <= max_new_tokens` (shorter when every row ended early).

    Raises:
        ValueError: `max_new_tokens` below 1; `temperature` / `top_p` out of range or non-finite probabilities
            (`draw`).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if do_sample:  # before any work, not at the first token's draw
        _check_settings(temperature, top_p)
    looped = getattr(getattr(model, "config", None), "model_type", None) == "looped"
    batch, width = input_ids.shape
    # A looped model's slots (one per (iteration, block layer)) grow from a config-less cache; a plain model keeps
    # the cache its own config asks for (sliding-window layers).
    cache = preallocated_cache(width + max_new_tokens) if looped else DynamicCache(config=model.config)
    extra = {} if num_steps is None else {"num_steps": num_steps}
    extra[CACHE_FIELD] = cache  # the installed transformers' name of the cache, for arguments as for outputs
    mask = attention_mask.new_zeros(batch, width + max_new_tokens)
    mask[:, :width] = attention_mask
    positions = padded_positions(attention_mask)
    eos = torch.tensor(eos_token_ids, dtype=torch.long, device=input_ids.device)
    tokens = input_ids.new_full((batch, max_new_tokens), pad_token_id)
    ended = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    was_training = model.training
    model.eval()
    try:
        # Inference mode: cheaper per op than no_grad (no version counters, no view tracking), and decoding is
        # thousands of small ops per token. The tensors made here stay inside; what is returned is a plain copy.
        with torch.inference_mode():
            out = model(input_ids=input_ids, attention_mask=mask[:, :width], position_ids=positions, use_cache=True,
                        logits_to_keep=1, **extra)  # fmt: skip
            positions = positions[:, -1:] + 1
            for t in range(max_new_tokens):
                logits = out.logits[:, -1]
                tok = draw(logits, generator, temperature, top_p) if do_sample else logits.argmax(-1)
                tok = tok.masked_fill(ended, pad_token_id)
                tokens[:, t] = tok
                ended |= torch.isin(tok, eos)
                if t + 1 == max_new_tokens or bool(ended.all()):
                    break
                mask[:, width + t] = 1
                out = model(input_ids=tok[:, None], attention_mask=mask[:, : width + t + 1], position_ids=positions,
                            use_cache=True, logits_to_keep=1, **extra)  # fmt: skip
                positions = positions + 1
    finally:
        model.train(was_training)
    return tokens[:, : t + 1].clone()
