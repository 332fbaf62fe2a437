"""nn.Module wrappers that swap into Hugging Face models."""

from swkernels.nn.lora import LoRALinear

__all__ = ["LoRALinear"]
