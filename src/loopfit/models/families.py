"""One architecture spec per decoder family: everything loopfit knows about a source model's code.

The looped model, conversion, optimizer groups, FSDP wrapping and FLOP counting read these specs instead of
assuming names. Adding a Llama-shaped family is one `Family(...)` entry in `FAMILIES` (and one test parameter):

    Family("qwen3", "Qwen3")

Fields name the source's classes (in `transformers.models.<module>.modeling_<module>`) and module paths; families
that scale embeddings or logits say so here, so the loop applies the same scaling as the source model.
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Family:
    """How loopfit reads and rebuilds one HF decoder family.

    Attributes:
        model_type: the source config's `model_type`.
        prefix: class-name prefix in the family's modeling module (`Llama` -> `LlamaDecoderLayer`).
        module: the modeling module's name under `transformers.models` (default: `model_type`).
        layer_class / norm_class / rotary_class: class names, `{prefix}` filled in.
        decoder_attr: attribute of the `*ForCausalLM` holding the decoder stack.
        layers_attr / embed_attr / norm_attr: attributes of the decoder stack (layer list, token embedding,
            final norm).
        norm_eps_attr: config attribute of the norms' epsilon.
        embed_scale: the factor the source multiplies token embeddings by, from its config (Gemma: sqrt(hidden),
            Granite: `embedding_multiplier`), or None.
        logit_scale: the factor the source multiplies logits by (Granite: 1 / `logits_scaling`, Cohere:
            `logit_scale`), or None.
        logit_softcap_attr: config attribute of a final logit soft-cap `c * tanh(logits / c)` (Gemma 2 and 3).
        rotary_per_layer_type: the rotary embedding takes the layer type (Gemma 3's local and global rotary).
        router_class: the mixture-of-experts router whose first output are the router logits, or None.
    """

    model_type: str
    prefix: str
    module: str | None = None
    layer_class: str = "{prefix}DecoderLayer"
    norm_class: str = "{prefix}RMSNorm"
    rotary_class: str = "{prefix}RotaryEmbedding"
    decoder_attr: str = "model"
    layers_attr: str = "layers"
    embed_attr: str = "embed_tokens"
    norm_attr: str = "norm"
    norm_eps_attr: str = "rms_norm_eps"
    embed_scale: Callable[[object], float] | None = None
    logit_scale: Callable[[object], float] | None = None
    logit_softcap_attr: str | None = None
    rotary_per_layer_type: bool = False
    router_class: str | None = None

    @property
    def _modeling(self):
        name = self.module or self.model_type
        return importlib.import_module(f"transformers.models.{name}.modeling_{name}")  # cached by Python

    def __deepcopy__(self, memo):
        return self  # an immutable spec: models that hold it can be deep-copied

    def _class(self, pattern: str) -> type:
        return getattr(self._modeling, pattern.format(prefix=self.prefix))

    @property
    def decoder_layer(self) -> type[nn.Module]:
        """The family's decoder-layer class, built as `cls(config, layer_idx)`."""
        return self._class(self.layer_class)

    @property
    def layer_class_name(self) -> str:
        return self.layer_class.format(prefix=self.prefix)

    def build_norm(self, config) -> nn.Module:
        """The final norm of a source model with `config`."""
        cls = nn.LayerNorm if self.norm_class == "LayerNorm" else self._class(self.norm_class)
        return cls(config.hidden_size, eps=getattr(config, self.norm_eps_attr))

    @property
    def pretrained_class(self) -> type:
        """The family's `PreTrainedModel` subclass (its weight init)."""
        return self._class("{prefix}PreTrainedModel")

    def supports_sdpa(self) -> bool:
        """Whether the family's attention may run on SDPA (Gemma 2's soft-capped attention may not)."""
        return getattr(self.pretrained_class, "_supports_sdpa", True)

    def cache_kwarg(self) -> str:
        """The decoder layer's name for the KV cache: `cache` (transformers >= 5.24), `past_key_values`, or
        `layer_past` (GPT-NeoX)."""
        params = inspect.signature(self.decoder_layer.forward).parameters
        return next(k for k in ("cache", "past_key_values", "layer_past") if k in params)

    def routers(self, module: nn.Module) -> list[nn.Module]:
        """The MoE routers inside `module` (none for a dense family)."""
        if self.router_class is None:
            return []
        cls = self._class(self.router_class)
        return [m for m in module.modules() if isinstance(m, cls)]

    def load_balancing_loss(self, router_logits: tuple, config, attention_mask=None) -> torch.Tensor:
        """The source's load-balancing loss (Switch Transformer, arXiv:2101.03961, eqs. 4-6) over every router call.

        Args:
            router_logits: one `(batch * seq, num_experts)` tensor per router call: in a looped model every
                iteration's block layers count, as the layers that run.
            attention_mask: `(batch, seq)` 0/1, or None.
        """
        fn = self._modeling.load_balancing_loss_func
        return fn(router_logits, config.num_experts, config.num_experts_per_tok, attention_mask)

    def logit_transform(self, config) -> tuple[float | None, float | None]:
        """(logit scale, logit soft-cap) of a source with `config`, each None where the family has none."""
        scale = self.logit_scale(config) if self.logit_scale is not None else None
        cap = getattr(config, self.logit_softcap_attr, None) if self.logit_softcap_attr else None
        return scale, cap or None

    def scale_logits(self, logits: torch.Tensor, config) -> torch.Tensor:
        """The source's logit scaling and soft-capping, applied to `logits` (any shape, last dim = vocab)."""
        scale, cap = self.logit_transform(config)
        if scale is not None:
            logits = logits * scale
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def build_rotary(self, config) -> nn.Module:
        return self._class(self.rotary_class)(config=config)

    def decoder(self, model: nn.Module) -> nn.Module:
        """The decoder stack of a source `*ForCausalLM`."""
        return getattr(model, self.decoder_attr)

    def layers(self, model: nn.Module) -> nn.ModuleList:
        """The decoder layers of a source `*ForCausalLM`."""
        return getattr(self.decoder(model), self.layers_attr)

    def embedding(self, model: nn.Module) -> nn.Embedding:
        return getattr(self.decoder(model), self.embed_attr)

    def final_norm(self, model: nn.Module) -> nn.Module:
        return getattr(self.decoder(model), self.norm_attr)


FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        Family("llama", "Llama"),
        Family("mistral", "Mistral"),
        Family("qwen2", "Qwen2"),
        Family("olmo2", "Olmo2"),
        Family("qwen3", "Qwen3"),
        Family("phi3", "Phi3"),  # fused qkv and gate/up projections: LoRA targets them as they are
        Family("smollm3", "SmolLM3"),  # layers without rotary (`no_rope_layers`) are the layer's own business
        Family(
            "granite",
            "Granite",
            embed_scale=lambda c: c.embedding_multiplier,
            logit_scale=lambda c: 1.0 / c.logits_scaling,
        ),  # residual and attention multipliers: in the layer
        Family(
            "cohere",
            "Cohere",
            norm_class="{prefix}LayerNorm",
            norm_eps_attr="layer_norm_eps",
            logit_scale=lambda c: c.logit_scale,
        ),  # parallel attention + MLP: in the layer
        Family("stablelm", "StableLm", norm_class="LayerNorm", norm_eps_attr="layer_norm_eps"),
        Family(
            "gpt_neox",
            "GPTNeoX",
            layer_class="{prefix}Layer",
            norm_class="LayerNorm",
            norm_eps_attr="layer_norm_eps",
            decoder_attr="gpt_neox",
            embed_attr="embed_in",
            norm_attr="final_layer_norm",
        ),  # parallel residual: in the layer
        Family(
            "gemma2",
            "Gemma2",
            embed_scale=lambda c: math.sqrt(c.hidden_size),
            logit_softcap_attr="final_logit_softcapping",
        ),
        Family(
            "gemma3_text",
            "Gemma3",
            module="gemma3",
            embed_scale=lambda c: math.sqrt(c.hidden_size),
            logit_softcap_attr="final_logit_softcapping",
            rotary_per_layer_type=True,
        ),
        # Mixture of experts: routing happens per layer application, so per iteration; the load-balancing loss
        # counts every iteration's router calls.
        Family("qwen2_moe", "Qwen2Moe", router_class="{prefix}TopKRouter"),
        Family("qwen3_moe", "Qwen3Moe", router_class="{prefix}TopKRouter"),
    )
}
SUPPORTED_ARCHITECTURES = tuple(FAMILIES)


def family_of(config) -> Family:
    """The spec of a source config's family.

    Raises:
        ValueError: the family is not supported (the message lists the supported ones).
    """
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(f"architecture '{model_type}' is not supported; supported: {', '.join(FAMILIES)}")
    return FAMILIES[model_type]


def decoder_layer_class_names() -> tuple[str, ...]:
    """Class names of every supported family's decoder layer (HF's `_no_split_modules`, FSDP wrapping units)."""
    return tuple(f.layer_class_name for f in FAMILIES.values())
