"""nn.Module wrappers that swap into Hugging Face models."""

from swkernels.nn.lora import LoRALinear
from swkernels.nn.norm import RMSNorm
from swkernels.nn.rotary import RotaryEmbedding, replace_rotary

__all__ = ["LoRALinear", "RMSNorm", "RotaryEmbedding", "replace_rotary"]
