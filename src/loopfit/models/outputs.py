"""What one forward call of the looped model shares between its layers, and what it returns."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

# transformers 5.24 renamed the output field (and the KV-cache argument) from `past_key_values` to `cache`; older
# releases in our range only know the old name. Resolved once, from the installed version's API.
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


@dataclass
class LoopContext:
    """What every decoder layer of one forward call shares; built by `LoopedModel.prepare`.

    masks: attention mask per attention type (`full_attention`, `sliding_attention`), as the source model builds them.
    position_embeddings: the rotary `(cos, sin)` pair, each `(batch, seq, head_dim)` (a dict of pairs by attention
        type where the family's rotary depends on it).
    position_ids: `(batch or 1, seq)` absolute positions of the current tokens.
    cache: the KV cache the layers write to (slot rule: `LoopedModel.prelude_slot` / `block_slots` / `coda_slot`),
        or None.
    layer_kwargs: further keyword arguments every layer gets (`use_cache`, attention kwargs).
    """

    masks: dict
    position_embeddings: tuple
    position_ids: torch.Tensor
    cache: Cache | None = None
    layer_kwargs: dict = field(default_factory=dict)

    def select_rows(self, rows: torch.Tensor, cache=None) -> LoopContext:
        """The context of batch rows `rows` (1-D index) only, reading and writing `cache`.

        Masks, rotary pairs and positions are indexed along the batch; one with a batch dimension of 1 is shared by
        every row and kept. Raises `ValueError` for a mask that is not a tensor (e.g. flex attention's BlockMask).
        """

        def pick(t):
            if t is None:
                return t
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"cannot select batch rows of a {type(t).__name__} attention mask")
            return t if t.shape[0] == 1 else t.index_select(0, rows)

        rotary = self.position_embeddings
        if isinstance(rotary, dict):
            rotary = {k: tuple(pick(t) for t in pair) for k, pair in rotary.items()}
        else:
            rotary = tuple(pick(t) for t in rotary)
        masks = {k: pick(m) for k, m in self.masks.items()}
        return LoopContext(masks, rotary, pick(self.position_ids), cache, self.layer_kwargs)


@dataclass
class LoopedModelOutput(BaseModelOutputWithPast):
    """`BaseModelOutputWithPast` plus the loop's states and the depth that was run.

    last_hidden_state: `(batch, seq, hidden)`, the coda's output after the final norm.
    states: with `output_states=True`, the recurrent state after each iteration, each `(batch, seq, hidden)`.
    num_steps: the `(n_no_grad, k_grad)` pair that was run.
    next_state: with `output_next_state=True`, one more iteration applied (with gradient) to the final state, which
        the coda does not read: `next_state - state` measures how far the loop is from a fixed point.
    """

    states: tuple[torch.Tensor, ...] | None = None
    next_state: torch.Tensor | None = None
    num_steps: tuple[int, int] | None = None
    router_logits: tuple[torch.Tensor, ...] | None = None


@dataclass
class LoopedCausalLMOutput(CausalLMOutputWithPast):
    """`CausalLMOutputWithPast` plus `states`, `next_state` and `num_steps` (see `LoopedModelOutput`).

    With `return_hidden=True`, `logits` holds the final normed hidden state `(batch, seq, hidden)` instead.
    For a mixture-of-experts source with `output_router_logits`: `router_logits`, one `(batch * seq, num_experts)`
    tensor per router call (every iteration's), and `aux_loss`, the source's load-balancing loss over all of them.
    """

    states: tuple[torch.Tensor, ...] | None = None
    next_state: torch.Tensor | None = None
    num_steps: tuple[int, int] | None = None
    router_logits: tuple[torch.Tensor, ...] | None = None
    aux_loss: torch.Tensor | None = None
