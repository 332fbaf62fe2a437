"""Attach LoRA adapters to a causal LM."""

from __future__ import annotations

from torch import nn


def apply_peft_lora(model: nn.Module, *, rank: int, alpha: float, targets: tuple[str, ...],
                    dropout: float = 0.0, use_rslora: bool = False) -> nn.Module:
    """The standard PEFT path (fp32 adapters over a bf16/fp16 or NF4 base); returns the PeftModel."""
    from peft import LoraConfig, get_peft_model

    target_modules = "all-linear" if tuple(targets) == ("all-linear",) else list(targets)
    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                     use_rslora=use_rslora, bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, cfg, autocast_adapter_dtype=True)
