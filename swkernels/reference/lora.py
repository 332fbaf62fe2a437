"""Pure-torch LoRA linear (and NF4 dequantisation): the oracle and the CPU fallback."""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F


def lora_linear(x: torch.Tensor, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float,
                bias: torch.Tensor | None = None, dropout_p: float = 0.0,
                keep_scale: torch.Tensor | None = None) -> torch.Tensor:
    """x·Wᵀ + s·(drop(x)·Aᵀ)·Bᵀ + bias in fp32, cast to x's dtype. ``keep_scale`` (mask/(1−p))
    replaces random dropout when given, to reproduce a kernel's exact mask.

    As the fused kernel does, the low-rank term is accumulated into the base output in place
    (``addmm_``) instead of as a second full-size tensor: one M×N buffer, not three as in
    ``base(x) + lora_B(lora_A(x)) * s``; autograd differentiates it the same way."""
    # fp32 even inside autocast (which would run F.linear in bf16 and break the fp32 addmm_)
    device = x.device.type
    off = torch.autocast(device, enabled=False) if torch.amp.is_autocast_available(device) else nullcontext()
    with off:
        x32 = x.float()
        if keep_scale is not None:
            d = x32 * keep_scale
        else:
            d = F.dropout(x32, dropout_p, training=dropout_p > 0)
        y = F.linear(x32, w.float(), None if bias is None else bias.float())
        y.addmm_(F.linear(d, a.float()), b.float().t(), alpha=scaling)
    return y.to(x.dtype)


def nf4_dequantize(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, shape: tuple[int, int],
                   blocksize: int = 64) -> torch.Tensor:
    """bitsandbytes NF4 → fp32 (N, K): byte i//2 holds element i, even elements in the high nibble;
    value = code[nibble]·absmax[i // blocksize]. ``absmax`` is already fp32 (nested quant undone)."""
    flat = packed.reshape(-1)
    nibbles = torch.stack([flat >> 4, flat & 0xF], dim=1).reshape(-1).long()
    n = shape[0] * shape[1]
    values = code.float()[nibbles[:n]]
    scales = absmax.float().repeat_interleave(blocksize)[:n]
    return (values * scales).reshape(shape)


def nf4_absmax(qabsmax: torch.Tensor, code2: torch.Tensor, absmax2: torch.Tensor, offset: torch.Tensor,
               blocksize2: int = 256) -> torch.Tensor:
    """Undo bitsandbytes' double quantisation of the NF4 scales: absmax[b] = code2[q[b]] ·
    absmax2[b // blocksize2] + offset (fp32; q uint8, code2 the 256-entry dynamic map)."""
    q = qabsmax.reshape(-1).long()
    scales = absmax2.float().repeat_interleave(blocksize2)[: q.numel()]
    return code2.float()[q] * scales + offset.float().reshape(-1)[0]
