"""4-bit NF4 base weights through bitsandbytes (QLoRA): swap nn.Linear for bnb Linear4bit.

:func:`nf4_linear` builds one ``Linear4bit`` from a weight tensor; :func:`quantize_nf4_` swaps a
loaded model's linears in place and :mod:`swengine.model.stream_load` quantises each weight as it
streams from the checkpoint, both through it, so the two paths give the same layout bit for bit."""

from __future__ import annotations

import torch
from torch import nn

BLOCKSIZE = 64  # bitsandbytes' default NF4 block (what swkernels' NF4 path and PEFT expect)


def nf4_linear(weight: torch.Tensor, bias: torch.Tensor | None, *, double_quant: bool = True,
               compute_dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = None) -> nn.Module:
    """A bitsandbytes NF4 ``Linear4bit`` holding ``weight`` (out, in) quantised on ``device``
    (default: the weight's own), blocksize 64, ``double_quant``: nested (uint8) absmax. The weight
    is cast to ``compute_dtype`` first (as a model loaded in that dtype holds it); the bias stays
    a frozen ``compute_dtype`` parameter."""
    import bitsandbytes as bnb

    device = weight.device if device is None else torch.device(device)
    out_features, in_features = weight.shape
    q = bnb.nn.Linear4bit(in_features, out_features, bias=bias is not None, compute_dtype=compute_dtype,
                          compress_statistics=double_quant, quant_type="nf4", device="meta")
    param = bnb.nn.Params4bit(weight.data.to(compute_dtype), requires_grad=False, blocksize=BLOCKSIZE,
                              compress_statistics=double_quant, quant_type="nf4", module=q)
    q.weight = param._quantize(device)
    if bias is not None:
        q.bias = nn.Parameter(bias.data.to(device=device, dtype=compute_dtype), requires_grad=False)
    return q


def quantize_nf4_(model: nn.Module, targets: tuple[str, ...], *, double_quant: bool = True,
                  compute_dtype: torch.dtype = torch.bfloat16) -> int:
    """Replace every nn.Linear named in ``targets`` (``("all-linear",)``: every one but the LM
    head) by a bitsandbytes NF4
    ``Linear4bit`` (blocksize 64), quantising its current weight in place. Embeddings, norms
    and the LM head stay in ``compute_dtype``, as transformers' bitsandbytes integration does.
    Works on real tensors (CPU or CUDA) and on fake tensors (for memory planning).
    Returns the number of layers replaced."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    every = tuple(targets) == ("all-linear",)
    replaced = 0
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is not nn.Linear or child is head or not (every or child_name in targets):
                continue
            setattr(module, child_name, nf4_linear(child.weight, child.bias, double_quant=double_quant,
                                                   compute_dtype=compute_dtype))
            replaced += 1
    return replaced
