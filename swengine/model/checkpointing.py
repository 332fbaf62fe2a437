"""Per-decoder-layer activation checkpointing, across transformers 5.x releases."""

from __future__ import annotations

from torch import nn


def enable_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer in backward (non-reentrant, so frozen inputs still get
    gradients through LoRA). Newer 5.x releases call it ``activation_checkpointing_enable`` and
    deprecate the old name; earlier ones (5.17 seen on a GPU image) only have
    ``gradient_checkpointing_enable``. PEFT wrappers forward either name to the base model."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def set_checkpointing(model: nn.Module, on: bool) -> None:
    """Turn per-layer checkpointing on or off (context-extension phases choose it per length)."""
    if on:
        enable_checkpointing(model)
    elif hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    elif hasattr(model, "gradient_checkpointing_disable"):
        model.gradient_checkpointing_disable()
