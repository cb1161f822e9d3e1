"""loopfit: give a pretrained language model a loop.

Importing the package registers the looped model type (`model_type="looped"`) with transformers' Auto classes,
so `AutoModelForCausalLM.from_pretrained(folder)` loads a converted model without `trust_remote_code`.
"""

from loopfit.models import LoopedConfig, LoopedForCausalLM, LoopedModel

__version__ = "0.1.0"
__all__ = ["LoopedConfig", "LoopedForCausalLM", "LoopedModel", "__version__"]
