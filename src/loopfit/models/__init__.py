"""The looped model, registered with transformers' Auto classes on import."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from loopfit.models.configuration_looped import LoopedConfig
from loopfit.models.modeling_looped import (
    LoopAdapter,
    LoopedCausalLMOutput,
    LoopedForCausalLM,
    LoopedModel,
    parse_num_steps,
    sample_num_steps,
)

AutoConfig.register(LoopedConfig.model_type, LoopedConfig, exist_ok=True)
AutoModel.register(LoopedConfig, LoopedModel, exist_ok=True)
AutoModelForCausalLM.register(LoopedConfig, LoopedForCausalLM, exist_ok=True)

__all__ = [
    "LoopAdapter",
    "LoopedCausalLMOutput",
    "LoopedConfig",
    "LoopedForCausalLM",
    "LoopedModel",
    "parse_num_steps",
    "sample_num_steps",
]
