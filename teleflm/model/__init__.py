"""The Tele-FLM model (configuration + modeling, self-contained for export) and its checkpoint I/O."""

from teleflm.model.configuration_teleflm import TeleFLMConfig
from teleflm.model.modeling_teleflm import TeleFLMForCausalLM, TeleFLMModel

__all__ = ["TeleFLMConfig", "TeleFLMForCausalLM", "TeleFLMModel"]
