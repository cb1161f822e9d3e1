"""Looped causal LM: `e = prelude(embed(x))`, `s = block(adapter([s, e]))` R times, `logits = head(norm(coda(s)))`.

The decoder layers, norms, rotary embedding and attention implementation are the source architecture's own
classes, built from the source config kept in `LoopedConfig.base_config`; nothing of attention is re-implemented.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from loopfit.models.configuration_looped import LoopedConfig
from loopfit.models.depth import parse_num_steps, sample_num_steps
from loopfit.models.exit_gate import ExitGate
from loopfit.models.families import decoder_layer_class_names, family_of
from loopfit.models.layers import _MASK_CACHE_KW, LoopAdapter, _pop_cache, attention_types, cache_slot
from loopfit.models.outputs import CACHE_FIELD, LoopContext, LoopedCausalLMOutput, LoopedModelOutput
from loopfit.models.relaxed import LowRankDeltas, Relaxation, RelaxHook, RestoreIteration, VectorTable

_NOISE_BLOCK = 256  # positions per seeded block of eval-mode state noise


class LoopedPreTrainedModel(PreTrainedModel):
    config_class = LoopedConfig
    config: LoopedConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = list(decoder_layer_class_names())
    _skip_keys_device_placement = ["past_key_values", "cache"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    @classmethod
    def _can_set_experts_implementation(cls) -> bool:
        # transformers decides by searching the model's module source for its experts decorator; the block's layers
        # are the source family's own, which dispatch through that interface, so the looped model runs the experts
        # kernel its source runs (`grouped_mm` by default) instead of falling back to eager with a warning.
        return True

    def _init_weights(self, module):
        if "RotaryEmbedding" in type(module).__name__:
            # Rotary buffers are computed, not loaded, and only the source family's own init knows them all (Gemma 3's
            # per-layer-type frequencies; transformers' knows one `inv_freq`): copy a fresh rotary's of the config.
            fresh = family_of(self.config.base_config).build_rotary(self.config.base_config)
            for name, buf in fresh.named_buffers():
                init.copy_(module.get_buffer(name), buf)
            return
        if isinstance(module, ExitGate):
            return module.reset_parameters()
        if isinstance(module, (LowRankDeltas, VectorTable)):
            for p in module.parameters(recurse=False) if isinstance(module, LowRankDeltas) else module.table.values():
                init.zeros_(p)  # placeholders: conversion (`Relaxation.init_from`) or loading sets them
            return
        super()._init_weights(module)
        if isinstance(module, LoopAdapter):
            h = module.out_features
            if self.config.adapter_init == "identity":
                init.copy_(module.weight, torch.cat([torch.zeros(h, h), torch.eye(h)], dim=1))
            elif self.config.adapter_init == "state":
                init.copy_(module.weight, torch.cat([torch.eye(h), torch.zeros(h, h)], dim=1))
            elif self.config.adapter_init == "average":
                init.copy_(module.weight, torch.cat([torch.eye(h), torch.eye(h)], dim=1) / 2)
            else:  # drawn on the CPU from the config's seed, so a conversion is reproducible on any device
                std = self.config.adapter_init_std
                g = torch.Generator().manual_seed(self.config.seed)
                w = torch.nn.init.trunc_normal_(
                    torch.empty(module.weight.shape), std=std, a=-3 * std, b=3 * std, generator=g
                )
                init.copy_(module.weight, w)

    def _set_gradient_checkpointing(self, enable: bool = True, gradient_checkpointing_func=None, **kwargs):
        if gradient_checkpointing_func is not None:
            kwargs["gradient_checkpointing_func"] = gradient_checkpointing_func
        super()._set_gradient_checkpointing(enable, **kwargs)
        for m in self.modules():
            if getattr(m, "relaxation", None) is not None and enable:
                for layer in m.block:  # the iteration index must be the same in the backward recomputation
                    layer._gradient_checkpointing_func = RestoreIteration(m, layer._gradient_checkpointing_func)


class LoopedModel(LoopedPreTrainedModel):
    """The looped decoder stack without the LM head.

    Its pieces are public so that adaptive decoding, depth evaluation and training run the same loop:
    `ctx = prepare(x)`, `e = run_prelude(x, ctx)`, `s = initial_state(e, ctx.position_ids)`,
    `s = iterate(s, e, i, ctx)` for i = 0..R-1, `h = run_coda(s, ctx)`. `forward` is exactly that sequence.
    """

    def __init__(self, config: LoopedConfig):
        super().__init__(config)
        base = config.base_config
        if base._attn_implementation is None:
            # transformers resolves the default (sdpa) on the top config only; the source layers read the base one.
            base._attn_implementation = config._attn_implementation
        if getattr(base, "_experts_implementation", None) is None:  # the same for a mixture of experts' kernels
            base._experts_implementation = config._experts_implementation
        self.family = family = family_of(base)
        if base._attn_implementation == "sdpa" and not family.supports_sdpa():
            base._attn_implementation = "eager"  # e.g. Gemma 2's soft-capped attention, as its own model does
        layer_cls = family.decoder_layer
        self.attention_types = attention_types(base)
        self._cache_kw = family.cache_kwarg()  # `cache` from transformers 5.24 on, `past_key_values` before
        self.embed_tokens = nn.Embedding(base.vocab_size, base.hidden_size, getattr(base, "pad_token_id", None))
        # Each layer keeps its source index: per-layer config entries (e.g. Qwen2's sliding layers) stay right.
        self.prelude = nn.ModuleList(layer_cls(base, i) for i in config.prelude_layers)
        self.adapter = LoopAdapter(base.hidden_size)
        self.block = nn.ModuleList(layer_cls(base, i) for i in config.block_layers)
        self.coda = nn.ModuleList(layer_cls(base, i) for i in config.coda_layers)
        self.norm = family.build_norm(base)
        self.rotary_emb = family.build_rotary(base)
        self.exit_gate = ExitGate.from_config(config)  # None unless the config asks for one (models/exit_gate.py)
        self.gradient_checkpointing, self._noise_cache = False, {}
        # Relaxed recursion (models/relaxed.py): per-iteration deltas, reached through `loop_iteration`.
        self.loop_iteration: int | None = None
        self.num_relaxed = config.num_relaxed
        self.relaxation = None
        if config.relaxation_rank != 0:
            self.relaxation = Relaxation(self.block, self.num_relaxed, config.relaxation_rank)
            for key, module in Relaxation.targets(self.block):
                module.register_forward_hook(RelaxHook(self, key))
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def embed(self, input_ids: torch.LongTensor) -> torch.Tensor:
        """Token embeddings `(batch, seq, hidden)`, scaled as the source family does (Gemma, Granite)."""
        x = self.embed_tokens(input_ids)
        if self.family.embed_scale is not None:
            # In the embedding's dtype, as the source does (Gemma's sqrt(3072) is 55.5 in bf16, not 55.4256).
            x = x * torch.tensor(self.family.embed_scale(self.config.base_config), dtype=x.dtype)
        return x

    # --- KV-cache slot rule: prelude layers 0..p-1, coda layers p..p+q-1, then the block's slots ---------------

    def prelude_slot(self, j: int) -> int:
        """Cache slot of prelude layer j."""
        return j

    def coda_slot(self, j: int) -> int:
        """Cache slot of coda layer j."""
        return len(self.config.prelude_layers) + j

    def block_slots(self, i: int) -> list[int]:
        """Cache slots of the block's layers at iteration i (0-based).

        `full`: one slot per (iteration, block layer), so cached decoding equals uncached at any depth. `compress`:
        one slot per block layer, which every iteration overwrites for the current tokens (Huginn's constant-memory
        cache, arXiv:2502.05171).
        """
        c = self.config
        p, b, q = len(c.prelude_layers), len(c.block_layers), len(c.coda_layers)
        offset = i * b if c.cache_mode == "full" else 0
        return [p + q + offset + j for j in range(b)]

    # --- the pieces -------------------------------------------------------------------------------------------

    def prepare(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | dict | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        **layer_kwargs,
    ) -> LoopContext:
        """Masks, positions and rotary embeddings shared by every layer of one call.

        Args:
            inputs_embeds: `(batch, seq, hidden)` (only its shape, dtype and device are read).
            attention_mask: `(batch, past + seq)` 0/1 padding mask, an already built dict of masks per attention
                type, or None.
            position_ids: `(batch or 1, seq)`; default: the cache's length + 0..seq-1.
            cache: the KV cache the layers read and write, or None.
            layer_kwargs: passed to every decoder layer (e.g. `use_cache`).
        """
        if position_ids is None:
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device).unsqueeze(0) + past
        if isinstance(attention_mask, dict):
            masks = attention_mask
        else:
            kwargs = {
                "config": self.config.base_config,
                "inputs_embeds": inputs_embeds,
                "attention_mask": attention_mask,
                _MASK_CACHE_KW: cache,
                "position_ids": position_ids,
            }
            masks = {}
            for kind in set(self.attention_types):
                build = create_sliding_window_causal_mask if kind == "sliding_attention" else create_causal_mask
                masks[kind] = build(**kwargs)
        if self.family.rotary_per_layer_type:
            rotary = {t: self.rotary_emb(inputs_embeds, position_ids, t) for t in set(self.attention_types)}
        else:
            rotary = self.rotary_emb(inputs_embeds, position_ids)
        return LoopContext(masks, rotary, position_ids, cache, layer_kwargs)

    def _layer(self, layer, src: int, h: torch.Tensor, ctx: LoopContext, slot, overwrite: bool = False):
        kv = cache_slot(layer, ctx.cache, slot, overwrite) if ctx.cache is not None and slot is not None else None
        kind = self.attention_types[src]
        rotary = ctx.position_embeddings
        return layer(
            h,
            attention_mask=ctx.masks[kind],
            position_embeddings=rotary[kind] if isinstance(rotary, dict) else rotary,
            position_ids=ctx.position_ids,
            **{self._cache_kw: kv},
            **ctx.layer_kwargs,
        )

    def run_prelude(self, x: torch.Tensor, ctx: LoopContext, hidden: list | None = None) -> torch.Tensor:
        """The prelude's layers: token embeddings `(batch, seq, hidden)` -> `e`, same shape (appended to `hidden`)."""
        for j, (layer, src) in enumerate(zip(self.prelude, self.config.prelude_layers)):
            x = self._layer(layer, src, x, ctx, self.prelude_slot(j))
            if hidden is not None:
                hidden.append(x)
        return x

    def iterate(self, s: torch.Tensor, e: torch.Tensor, i: int, ctx: LoopContext, write_cache: bool = True):
        """Loop iteration i (0-based): `block_i(adapter(concat[s, e]))`, all `(batch, seq, hidden)`.

        The block's layers read and write the cache slots `block_slots(i)`; with `write_cache=False` they use no
        cache (the fixed-point residual's extra iteration). A relaxed model's block carries iteration
        `min(i, L - 1)`'s deltas (models/relaxed.py); otherwise `block_i` is the one shared block.
        """
        x = self.adapter(torch.cat([s, e], dim=-1))
        slots = self.block_slots(i) if write_cache else [None] * len(self.block)
        overwrite = i > 0 and self.config.cache_mode == "compress"
        prev, self.loop_iteration = self.loop_iteration, i
        try:
            for layer, src, slot in zip(self.block, self.config.block_layers, slots):
                x = self._layer(layer, src, x, ctx, slot, overwrite)
        finally:
            self.loop_iteration = prev
        return x

    def run_coda(self, s: torch.Tensor, ctx: LoopContext, hidden: list | None = None) -> torch.Tensor:
        """The coda's layers and the final norm: state `(batch, seq, hidden)` -> normed hidden state, same shape.

        Each coda layer's (un-normed) output is appended to `hidden`.
        """
        for j, (layer, src) in enumerate(zip(self.coda, self.config.coda_layers)):
            s = self._layer(layer, src, s, ctx, self.coda_slot(j))
            if hidden is not None:
                hidden.append(s)
        return self.norm(s)

    def initial_state(self, e: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """`s0` for prelude output `e` (batch, seq, hidden).

        In training mode `normal` draws fresh noise from the global RNG; in eval mode it is a function of the
        position alone (seeded blocks of positions), so identical calls, and cached vs uncached decoding, agree.
        """
        mode, std = self.config.state_init, self.config.state_init_std
        if mode == "zeros":
            return torch.zeros_like(e)
        if mode == "embed":
            return e
        if self.training:
            return nn.init.trunc_normal_(torch.empty_like(e), std=std, a=-3 * std, b=3 * std)
        pos = position_ids.expand(e.shape[0], -1).to("cpu")
        blocks = {b: self._noise_block(b, e.shape[-1]) for b in torch.unique(pos // _NOISE_BLOCK).tolist()}
        keys = sorted(blocks)
        table = torch.stack([blocks[b] for b in keys])  # (num_blocks, _NOISE_BLOCK, hidden)
        noise = table[torch.searchsorted(torch.tensor(keys), pos // _NOISE_BLOCK), pos % _NOISE_BLOCK]
        return noise.to(device=e.device, dtype=e.dtype)

    def _noise_block(self, block: int, hidden: int) -> torch.Tensor:
        """Eval-mode state noise of positions `[block * 256, (block + 1) * 256)`, memoised (decoding asks each step)."""
        key = (block, hidden, self.config.seed, self.config.state_init_std)
        if key not in self._noise_cache:
            if len(self._noise_cache) > 256:
                self._noise_cache.clear()
            std = self.config.state_init_std
            g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + block)
            t = torch.empty(_NOISE_BLOCK, hidden)
            self._noise_cache[key] = nn.init.trunc_normal_(t, std=std, a=-3 * std, b=3 * std, generator=g)
        return self._noise_cache[key]

    def default_num_steps(self) -> int | tuple[int, int]:
        """The depth used when none is given: drawn (Poisson-lognormal) in training mode, the mean in eval mode."""
        c = self.config
        return sample_num_steps(c.mean_recurrence, c.backprop_depth) if self.training else c.mean_recurrence

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        num_steps: int | tuple[int, int] | None = None,
        output_states: bool = False,
        output_hidden_states: bool | None = None,
        output_next_state: bool = False,
        output_router_logits: bool | None = None,
        **kwargs,
    ) -> LoopedModelOutput:
        """Run prelude, R loop iterations and coda; see `LoopedForCausalLM.forward` for the arguments."""
        cache = _pop_cache(cache, kwargs)
        if output_router_logits is None:
            output_router_logits = bool(getattr(self.config.base_config, "output_router_logits", False))
        routers = self.family.routers(self) if output_router_logits else []
        router_logits: list[torch.Tensor] = []
        hooks = [r.register_forward_hook(lambda _m, _a, out: router_logits.append(out[0])) for r in routers]
        try:
            out = self._forward(input_ids, attention_mask, position_ids, cache, inputs_embeds, use_cache, num_steps,
                                output_states, output_hidden_states, output_next_state, **kwargs)  # fmt: skip
        finally:
            for h in hooks:
                h.remove()
        out.router_logits = tuple(router_logits) if routers else None
        return out

    def _forward(
        self,
        input_ids,
        attention_mask,
        position_ids,
        cache,
        inputs_embeds,
        use_cache,
        num_steps,
        output_states,
        output_hidden_states,
        output_next_state,
        **kwargs,
    ) -> LoopedModelOutput:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        n_no_grad, k_grad = parse_num_steps(self.default_num_steps() if num_steps is None else num_steps)
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids)
        if use_cache and cache is None:
            cache = DynamicCache()
        if isinstance(cache, DynamicCache) and cache.layer_class_to_replicate is None:
            # A cache built from the config (as `generate` does) has one slot per distinct layer; the loop needs
            # one per (iteration, block layer), so let it grow lazily as a config-less DynamicCache does.
            cache.layer_class_to_replicate = DynamicLayer
        if output_next_state and cache is not None:
            raise ValueError("output_next_state is a training signal; it cannot be combined with a KV cache")
        ctx = self.prepare(inputs_embeds, attention_mask, position_ids, cache, use_cache=use_cache, **kwargs)
        hidden = [inputs_embeds] if output_hidden_states else None

        e = self.run_prelude(inputs_embeds, ctx, hidden)
        s = self.initial_state(e, ctx.position_ids)
        states = []
        for i in range(n_no_grad + k_grad):
            no_grad = i < n_no_grad and torch.is_grad_enabled()
            with torch.no_grad() if no_grad else contextlib.nullcontext():
                s = self.iterate(s, e, i, ctx)
            if output_states:
                states.append(s)
        next_state = self.iterate(s, e, n_no_grad + k_grad, ctx, write_cache=False) if output_next_state else None
        if hidden is not None:
            hidden.append(s)
        h = self.run_coda(s, ctx, hidden)
        return LoopedModelOutput(
            last_hidden_state=h,
            hidden_states=tuple(hidden) if hidden is not None else None,
            states=tuple(states) if output_states else None,
            num_steps=(n_no_grad, k_grad),
            next_state=next_state,
            **{CACHE_FIELD: cache if use_cache else None},
        )


class LoopedForCausalLM(LoopedPreTrainedModel, GenerationMixin):
    """Looped causal LM. `num_steps` is a forward (and `generate`) argument: one model runs at any depth."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: LoopedConfig):
        super().__init__(config)
        self.model = LoopedModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def get_output_embeddings(self):
        return self.lm_head

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        num_steps: int | tuple[int, int] | None = None,
        output_states: bool = False,
        output_hidden_states: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        return_hidden: bool = False,
        output_next_state: bool = False,
        output_router_logits: bool | None = None,
        **kwargs,
    ) -> LoopedCausalLMOutput:
        """Run the looped model.

        Args:
            input_ids: `(batch, seq)` token ids (or `inputs_embeds`, `(batch, seq, hidden)`).
            attention_mask: `(batch, past + seq)` 0/1 padding mask.
            cache: a KV cache (`past_key_values` is accepted too, the name before transformers 5.24).
            num_steps: loop iterations R, or a pair `(n_no_grad, k_grad)` whose first n iterations run without
                gradient (truncated backprop). Default: sampled in training mode, `config.mean_recurrence` in eval.
            output_states: also return the state after every iteration (`.states`).
            output_next_state: also return `.next_state`, one further iteration of the final state (training only).
            return_hidden: skip the LM head and return the final normed hidden state in `.logits` (for fused
                losses that apply the head chunk by chunk).
            labels: if given, `.loss` is the next-token cross-entropy (labels are shifted inside, -100 ignored),
                plus `router_aux_loss_coef * aux_loss` for a mixture-of-experts source with router logits on.
            output_router_logits: MoE sources: collect every router call's logits and compute `aux_loss` (default:
                the source config's `output_router_logits`).

        Returns:
            `LoopedCausalLMOutput`: `logits (batch, seq, vocab)` (the last `logits_to_keep` positions if set),
            `loss`, the cache, `states`, `next_state`, `num_steps`.

        Raises:
            ValueError: both or neither of `input_ids` / `inputs_embeds`; a bad `num_steps`; `output_next_state`
                with a cache.
        """
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=_pop_cache(cache, kwargs),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            num_steps=num_steps,
            output_states=output_states,
            output_hidden_states=output_hidden_states,
            output_next_state=output_next_state,
            output_router_logits=output_router_logits,
            **kwargs,
        )
        h = out.last_hidden_state
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        h = h[:, slice_indices, :]
        loss = None
        if return_hidden:
            logits = h
        else:
            logits = self.logits_from_hidden(h)
            if labels is not None:
                loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        aux_loss = None
        if out.router_logits:
            base = self.config.base_config
            aux_loss = self.model.family.load_balancing_loss(out.router_logits, base, attention_mask)
            if loss is not None:
                loss = loss + base.router_aux_loss_coef * aux_loss
        return LoopedCausalLMOutput(
            loss=loss,
            aux_loss=aux_loss,
            router_logits=out.router_logits,
            logits=logits,
            hidden_states=out.hidden_states,
            states=out.states,
            next_state=out.next_state,
            num_steps=out.num_steps,
            **{CACHE_FIELD: getattr(out, CACHE_FIELD)},
        )

    def logits_from_hidden(self, h: torch.Tensor) -> torch.Tensor:
        """LM head plus the source family's logit scaling / soft-capping: `(..., hidden)` -> `(..., vocab)`."""
        return self.model.family.scale_logits(self.lm_head(h), self.config.base_config)

    def generate(self, *args, num_steps: int | tuple[int, int] | None = None, **kwargs):
        """`GenerationMixin.generate` at one depth for the whole call.

        Without `num_steps`, eval mode runs `generation_config.num_steps` (else `config.mean_recurrence`); training
        mode draws one depth for the call
        (never one per decoding step: the KV cache's per-iteration slots must match from token to token, and
        on-policy trainers sample in training mode).
        """
        if num_steps is None and self.training:
            num_steps = self.model.default_num_steps()
        if num_steps is not None:
            kwargs["num_steps"] = num_steps
        return super().generate(*args, **kwargs)

    def _prepare_generation_config(self, *args, **kwargs):
        # `num_steps` is an attribute of a looped folder's generation config (its default depth); a `num_steps`
        # argument overrides it and goes to every forward call. It is kept out of transformers' merging, which would
        # file it in the config and warn that a `generation_config` came with generation arguments (TRL's trainers
        # pass one, and `generate` adds the depth it drew in training mode).
        num_steps = kwargs.pop("num_steps", None)
        generation_config, model_kwargs = super()._prepare_generation_config(*args, **kwargs)
        if num_steps is None:
            num_steps = getattr(generation_config, "num_steps", None)
        if num_steps is not None:
            model_kwargs["num_steps"] = num_steps
        return generation_config, model_kwargs
