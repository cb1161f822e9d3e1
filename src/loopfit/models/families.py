"""One architecture spec per decoder family: everything loopfit knows about a source model's code.

The looped model, conversion, optimizer groups, FSDP wrapping and FLOP counting read these specs instead of
assuming names. Adding a Llama-shaped family is one `Family(...)` entry in `FAMILIES` (and one test parameter):

    Family("qwen3", "Qwen3")

Fields name the source's classes (in `transformers.models.<module>.modeling_<module>`) and module paths; families
that scale embeddings or logits say so here, so the loop applies the same scaling as the source model.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from functools import cached_property

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

    @cached_property
    def _modeling(self):
        name = self.module or self.model_type
        return importlib.import_module(f"transformers.models.{name}.modeling_{name}")

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
        return self._class(self.norm_class)(config.hidden_size, eps=getattr(config, self.norm_eps_attr))

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
