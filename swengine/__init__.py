"""swengine: a lean LoRA/QLoRA fine-tuning engine for one consumer GPU."""

__version__ = "0.1.0"
