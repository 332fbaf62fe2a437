"""The one function that builds a model for training: load (or build from a config) → NF4 →
LoRA (our patched model, or PEFT) → per-layer checkpointing. The trainer, the planner's
measuring harness and bench/ all call it, so what is planned and benchmarked is what trains.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from swengine.model.checkpointing import enable_checkpointing
from swengine.model.patch import LoraSpec, PatchHandle, patch, resolve_targets

QUANTS = ("none", "nf4", "nf4-dq")


@dataclass
class TrainingModel:
    model: nn.Module  # the model to call (a PeftModel on the PEFT path)
    handle: PatchHandle | None  # our patch (None on the PEFT path)
    params: list[nn.Parameter]  # what the optimizer trains


def build_training_model(config, lora: LoraSpec, *, dtype: torch.dtype, device: str | torch.device,
                         weights: str | None = None, quant: str = "none", impl: str = "swkernels",
                         attention: str = "sdpa", checkpointing: bool = False,
                         strict_kernels: bool = False) -> TrainingModel:
    """``weights``: a model directory / hub id to load, or None for random weights from ``config``
    (the planner builds on the meta device and materialises fake tensors itself).
    ``quant``: none | nf4 | nf4-dq (NF4 with double quantisation). ``impl``: swkernels (LoRA
    kernels and every fused op swapped in by :func:`patch`) or peft (the reference stack)."""
    from swengine.model.attention import implementation_for
    from swengine.model.load import load_model
    from swengine.model.quant import quantize_nf4_

    if quant not in QUANTS:
        raise ValueError(f"quant must be one of {QUANTS}, got {quant!r}")
    if weights is not None:
        model = load_model(weights, config, dtype, torch.device(device), attention, quant != "none",
                           quant == "nf4-dq", tuple(lora.targets))
    else:
        from transformers import AutoModelForCausalLM

        config = config.__class__.from_dict(config.to_dict())
        config.use_cache = False
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype,
                                                     attn_implementation=implementation_for(config, attention))
            if quant != "none":
                if str(device) == "meta":
                    raise NotImplementedError("fake tensors cannot hold NF4 weights (bitsandbytes' Params4bit cannot "
                                              "wrap a fake tensor); build NF4 models on real tensors")
                quantize_nf4_(model, resolve_targets(model, lora.targets), double_quant=quant == "nf4-dq",
                              compute_dtype=dtype)
    with torch.device(device):  # adapters are created where the base lives (meta for the planner)
        if impl == "swkernels":
            handle = patch(model, lora, strict=strict_kernels)
            params = handle.trainable_parameters()
        elif impl == "peft":
            from swengine.model.lora import apply_peft_lora

            model.requires_grad_(False)
            model = apply_peft_lora(model, rank=lora.rank, alpha=lora.alpha, targets=resolve_targets(model, lora.targets),
                                    dropout=lora.dropout, use_rslora=lora.use_rslora)
            handle, params = None, [p for p in model.parameters() if p.requires_grad]
        else:
            raise ValueError(f"impl must be 'swkernels' or 'peft', got {impl!r}")
    if checkpointing:
        enable_checkpointing(model)
    model.train()
    return TrainingModel(model, handle, params)
