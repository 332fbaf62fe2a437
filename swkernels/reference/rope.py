"""Pure-torch rotary embedding (HF rotate_half convention): the oracle and the CPU fallback."""

from __future__ import annotations

import torch


def rope_cos_sin(position_ids: torch.Tensor, inv_freq: torch.Tensor, attention_factor: float = 1.0):
    """cos, sin of shape (B, T, rotary_dim) in fp32, times the attention factor."""
    freqs = position_ids[..., None].float() * inv_freq.float().to(position_ids.device)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * attention_factor, emb.sin() * attention_factor


def apply_rope(q: torch.Tensor, k: torch.Tensor, position_ids: torch.Tensor, inv_freq: torch.Tensor,
               attention_factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate the first rotary_dim = 2·len(inv_freq) dims of q (B, Hq, T, D) and k (B, Hkv, T, D);
    the rest passes through. Computed in fp32, returned in the inputs' dtypes."""
    cos, sin = rope_cos_sin(position_ids, inv_freq, attention_factor)
    cos, sin = cos[:, None], sin[:, None]
    rot = cos.shape[-1]

    def rotate(x):
        x32 = x.float()
        xr, rest = x32[..., :rot], x32[..., rot:]
        x1, x2 = xr[..., : rot // 2], xr[..., rot // 2:]
        out = xr * cos + torch.cat((-x2, x1), dim=-1) * sin
        return torch.cat((out, rest), dim=-1).to(x.dtype)

    return rotate(q), rotate(k)
