"""Looped causal LM: `e = prelude(embed(x))`, `s = block(adapter([s, e]))` R times, `logits = head(norm(coda(s)))`.

The decoder layers, norms, rotary embedding and attention implementation are the source architecture's own
classes, built from the source config kept in `LoopedConfig.base_config`; nothing of attention is re-implemented.
"""

from __future__ import annotations

import contextlib
import importlib
import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_outputs import CausalLMOutputWithPast

from loopfit.models.configuration_looped import SUPPORTED_ARCHITECTURES, LoopedConfig

_NOISE_BLOCK = 256  # positions per seeded block of eval-mode state noise


def source_classes(base_config) -> tuple[type, type, type]:
    """The (DecoderLayer, RMSNorm, RotaryEmbedding) classes of the source architecture."""
    model_type = base_config.model_type
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"architecture '{model_type}' is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    prefix = {"llama": "Llama", "qwen2": "Qwen2", "olmo2": "Olmo2", "mistral": "Mistral"}[model_type]
    return (
        getattr(module, f"{prefix}DecoderLayer"),
        getattr(module, f"{prefix}RMSNorm"),
        getattr(module, f"{prefix}RotaryEmbedding"),
    )


def parse_num_steps(num_steps) -> tuple[int, int]:
    """Normalise `num_steps` (an int R, or a pair `(n_no_grad, k_grad)`) to the pair form."""
    if isinstance(num_steps, torch.Tensor):
        num_steps = num_steps.tolist()
    if isinstance(num_steps, (list, tuple)):
        if len(num_steps) != 2:
            raise ValueError(f"num_steps must be an int or a pair (n_no_grad, k_grad), got {num_steps!r}")
        n, k = int(num_steps[0]), int(num_steps[1])
    else:
        n, k = 0, int(num_steps)
    if n < 0 or k < 0 or n + k < 1:
        raise ValueError(f"num_steps must give at least one iteration (R >= 1), got {num_steps!r}")
    return n, k


def sample_num_steps(
    mean: float, backprop_depth: int, generator: torch.Generator | None = None, min_steps: int = 1
) -> tuple[int, int]:
    """Draw (n_no_grad, k_grad) from the Poisson-lognormal depth sampler of arXiv:2502.05171 / 2511.07384.

    `rate ~ LogNormal(log(mean) - sigma^2 / 2, sigma = 0.5)`, `R = max(Poisson(rate) + 1, min_steps)`; the last
    `min(k, R)` iterations keep gradients, with `k = min(backprop_depth, mean)`.
    """
    sigma = 0.5
    mu = math.log(max(mean, 1e-6)) - sigma**2 / 2
    rate = torch.exp(mu + sigma * torch.randn((), generator=generator, dtype=torch.float64))
    r = max(int(torch.poisson(rate.reshape(1), generator=generator).item()) + 1, min_steps)
    k = min(backprop_depth, max(1, math.ceil(mean)), r)
    return r - k, k


class LoopAdapter(nn.Linear):
    """`Linear(2h -> h)` that merges the recurrent state with the prelude output: input is `concat[s, e]`."""

    def __init__(self, hidden_size: int):
        super().__init__(2 * hidden_size, hidden_size, bias=False)


class _CacheSlot:
    """Routes a decoder layer's KV-cache writes to slot `slot` of a shared cache.

    The same layer module runs once per loop iteration, and its attention writes to `self.layer_idx`; this view
    gives each (iteration, layer) pair its own slot (full mode) or makes later iterations overwrite the entries the
    first one wrote for the current tokens (compress mode).
    """

    def __init__(self, cache: Cache, slot: int, overwrite: bool):
        self.cache, self.slot, self.overwrite = cache, slot, overwrite

    def update(self, key_states, value_states, layer_idx=None, *args, **kwargs):
        if self.overwrite:
            layer = self.cache.layers[self.slot]
            q = key_states.shape[-2]
            layer.keys, layer.values = layer.keys[..., :-q, :], layer.values[..., :-q, :]
        return self.cache.update(key_states, value_states, self.slot, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.cache, name)


@dataclass
class LoopedCausalLMOutput(CausalLMOutputWithPast):
    """`CausalLMOutputWithPast` plus the loop's states and the depth that was run.

    states: with `output_states=True`, the recurrent state after each iteration, each `(batch, seq, hidden)`.
    num_steps: the `(n_no_grad, k_grad)` pair that was run.
    next_state: with `output_next_state=True`, one more iteration applied (with gradient) to the final state, which
        the coda does not read: `next_state - state` measures how far the loop is from a fixed point.
    """

    states: tuple[torch.Tensor, ...] | None = None
    next_state: torch.Tensor | None = None
    num_steps: tuple[int, int] | None = None


class LoopedPreTrainedModel(PreTrainedModel):
    config_class = LoopedConfig
    config: LoopedConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LlamaDecoderLayer", "Qwen2DecoderLayer", "Olmo2DecoderLayer", "MistralDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, LoopAdapter):
            h = module.out_features
            if self.config.adapter_init == "identity":
                init.copy_(module.weight, torch.cat([torch.zeros(h, h), torch.eye(h)], dim=1))
            elif self.config.adapter_init == "average":
                init.copy_(module.weight, torch.cat([torch.eye(h), torch.eye(h)], dim=1) / 2)
            else:
                std = self.config.adapter_init_std
                init.trunc_normal_(module.weight, std=std, a=-3 * std, b=3 * std)


class LoopedModel(LoopedPreTrainedModel):
    """The looped decoder stack without the LM head; returns the final (normed) hidden states."""

    def __init__(self, config: LoopedConfig):
        super().__init__(config)
        base = config.base_config
        if base._attn_implementation is None:
            # transformers resolves the default (sdpa) on the top config only; the source layers read the base one.
            base._attn_implementation = config._attn_implementation
        layer_cls, norm_cls, rotary_cls = source_classes(base)
        self.embed_tokens = nn.Embedding(base.vocab_size, base.hidden_size, getattr(base, "pad_token_id", None))
        # Each layer keeps its source index: per-layer config entries (e.g. Qwen2's sliding layers) stay right.
        self.prelude = nn.ModuleList(layer_cls(base, i) for i in config.prelude_layers)
        self.adapter = LoopAdapter(base.hidden_size)
        self.block = nn.ModuleList(layer_cls(base, i) for i in config.block_layers)
        self.coda = nn.ModuleList(layer_cls(base, i) for i in config.coda_layers)
        self.norm = norm_cls(base.hidden_size, eps=base.rms_norm_eps)
        self.rotary_emb = rotary_cls(config=base)
        self.gradient_checkpointing = False
        self._noise_cache: dict[tuple, torch.Tensor] = {}
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def _layer_type(self, src_idx: int) -> str:
        types = getattr(self.config.base_config, "layer_types", None)
        return types[src_idx] if types else "full_attention"

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

    def _masks(self, inputs_embeds, attention_mask, past_key_values, position_ids) -> dict:
        if isinstance(attention_mask, dict):
            return attention_mask
        kwargs = dict(
            config=self.config.base_config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            position_ids=position_ids,
        )
        masks = {"full_attention": create_causal_mask(**kwargs)}
        if any(self._layer_type(i) == "sliding_attention" for i in self._all_layers()):
            masks["sliding_attention"] = create_sliding_window_causal_mask(**kwargs)
        return masks

    def _all_layers(self) -> list[int]:
        c = self.config
        return c.prelude_layers + c.block_layers + c.coda_layers

    def _run(self, layers, src_indices, h, masks, slots, cache, overwrite=False, **kw):
        for layer, src, slot in zip(layers, src_indices, slots):
            kv = _CacheSlot(cache, slot, overwrite) if cache is not None else None
            h = layer(h, attention_mask=masks[self._layer_type(src)], past_key_values=kv, **kw)
        return h

    def _iterate(self, s, e, masks, slots, cache, overwrite=False, **kw):
        """One loop iteration: `block(adapter(concat[s, e]))`, the block's layers writing to cache `slots`."""
        x = self.adapter(torch.cat([s, e], dim=-1))
        return self._run(self.block, self.config.block_layers, x, masks, slots, cache, overwrite, **kw)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        num_steps: int | tuple[int, int] | None = None,
        output_states: bool = False,
        output_hidden_states: bool | None = None,
        output_next_state: bool = False,
        **kwargs,
    ):
        c = self.config
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if num_steps is None:
            if self.training:
                num_steps = sample_num_steps(c.mean_recurrence, c.backprop_depth)
            else:
                num_steps = c.mean_recurrence
        n_no_grad, k_grad = parse_num_steps(num_steps)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        if isinstance(past_key_values, DynamicCache) and past_key_values.layer_class_to_replicate is None:
            # A cache built from the config (as `generate` does) has one slot per distinct layer; the loop needs
            # one per (iteration, block layer), so let it grow lazily as a config-less DynamicCache does.
            past_key_values.layer_class_to_replicate = DynamicLayer
        if position_ids is None:
            past = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device).unsqueeze(0) + past
        cache = past_key_values if use_cache or past_key_values is not None else None
        masks = self._masks(inputs_embeds, attention_mask, cache, position_ids)
        kw = dict(
            position_embeddings=self.rotary_emb(inputs_embeds, position_ids),
            position_ids=position_ids,
            use_cache=use_cache,
            **kwargs,
        )
        hidden = [inputs_embeds] if output_hidden_states else None

        p, b, q = len(c.prelude_layers), len(c.block_layers), len(c.coda_layers)
        e = inputs_embeds
        for i, layer in enumerate(self.prelude):
            e = self._run([layer], [c.prelude_layers[i]], e, masks, [i], cache, **kw)
            if hidden is not None:
                hidden.append(e)
        s = self.initial_state(e, position_ids)
        states = []
        for it in range(n_no_grad + k_grad):
            grad_ctx = torch.no_grad() if it < n_no_grad and torch.is_grad_enabled() else contextlib.nullcontext()
            with grad_ctx:
                if c.cache_mode == "full":
                    slots = [p + q + it * b + j for j in range(b)]
                else:
                    slots = [p + q + j for j in range(b)]
                s = self._iterate(s, e, masks, slots, cache, overwrite=it > 0 and c.cache_mode == "compress", **kw)
            if output_states:
                states.append(s)
        next_state = None
        if output_next_state:
            if cache is not None:
                raise ValueError("output_next_state is a training signal; it cannot be combined with a KV cache")
            next_state = self._iterate(s, e, masks, [None] * b, None, **kw)
        if hidden is not None:
            hidden.append(s)
        h = s
        for i, layer in enumerate(self.coda):
            h = self._run([layer], [c.coda_layers[i]], h, masks, [p + i], cache, **kw)
            if hidden is not None:
                hidden.append(h)
        return LoopedCausalLMOutput(
            logits=self.norm(h),  # the final hidden state; LoopedForCausalLM applies the head
            past_key_values=past_key_values if use_cache else None,
            hidden_states=tuple(hidden) if hidden is not None else None,
            states=tuple(states) if output_states else None,
            num_steps=(n_no_grad, k_grad),
            next_state=next_state,
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
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        num_steps: int | tuple[int, int] | None = None,
        output_states: bool = False,
        output_hidden_states: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        return_hidden: bool = False,
        output_next_state: bool = False,
        **kwargs,
    ) -> LoopedCausalLMOutput:
        """Run the looped model.

        Args:
            num_steps: loop iterations R, or a pair `(n_no_grad, k_grad)` whose first n iterations run without
                gradient (truncated backprop). Default: sampled in training mode, `config.mean_recurrence` in eval.
            output_states: also return the state after every iteration (`.states`).
            output_next_state: also return `.next_state`, one further iteration of the final state (training only).
            return_hidden: skip the LM head and return the final normed hidden state in `.logits` (for fused
                losses that apply the head chunk by chunk).
            labels: if given, `.loss` is the next-token cross-entropy (labels are shifted inside, -100 ignored).
        """
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            num_steps=num_steps,
            output_states=output_states,
            output_hidden_states=output_hidden_states,
            output_next_state=output_next_state,
            **kwargs,
        )
        h = out.logits
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        h = h[:, slice_indices, :]
        if return_hidden:
            return out
        logits = self.lm_head(h)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        out.logits, out.loss = logits, loss
        return out
