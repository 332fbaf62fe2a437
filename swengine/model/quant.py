"""4-bit NF4 base weights through bitsandbytes (QLoRA): swap nn.Linear for bnb Linear4bit."""

from __future__ import annotations

import torch
from torch import nn


def quantize_nf4_(model: nn.Module, targets: tuple[str, ...], *, double_quant: bool = True,
                  compute_dtype: torch.dtype = torch.bfloat16) -> int:
    """Replace every nn.Linear named in ``targets`` (``("all-linear",)``: every one but the LM
    head) by a bitsandbytes NF4
    ``Linear4bit`` (blocksize 64), quantising its current weight in place. Embeddings, norms
    and the LM head stay in ``compute_dtype``, as transformers' bitsandbytes integration does.
    Works on real tensors (CPU or CUDA) and on fake tensors (for memory planning).
    Returns the number of layers replaced."""
    import bitsandbytes as bnb

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    every = tuple(targets) == ("all-linear",)
    replaced = 0
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is not nn.Linear or child is head or not (every or child_name in targets):
                continue
            q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                  compute_dtype=compute_dtype, compress_statistics=double_quant,
                                  quant_type="nf4", device="meta")
            weight = bnb.nn.Params4bit(child.weight.data.to(compute_dtype), requires_grad=False, blocksize=64,
                                       compress_statistics=double_quant, quant_type="nf4", module=q)
            q.weight = weight._quantize(child.weight.device)
            if child.bias is not None:
                q.bias = nn.Parameter(child.bias.data.to(compute_dtype), requires_grad=False)
            setattr(module, child_name, q)
            replaced += 1
    return replaced
