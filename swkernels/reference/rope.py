"""Pure-torch rotary embedding (HF rotate_half convention): the oracle and the CPU fallback."""

from __future__ import annotations

import torch


def rope_cos_sin(position_ids: torch.Tensor, inv_freq: torch.Tensor, attention_factor: float = 1.0):
    """cos, sin of shape (B, T, rotary_dim) in fp32, times the attention factor: the tables
    transformers' rotary modules return (both halves repeat the same angles)."""
    freqs = position_ids[..., None].float() * inv_freq.float().to(position_ids.device)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * attention_factor, emb.sin() * attention_factor


def apply_rope(q: torch.Tensor, k: torch.Tensor, position_ids: torch.Tensor, inv_freq: torch.Tensor,
               attention_factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate the first rotary_dim = 2·len(inv_freq) dims of q (B, Hq, T, D) and k (B, Hkv, T, D)
    (any head counts) by position_ids (B, T), or (1, T) broadcast over the batch; the rest passes through. With (x1, x2) the two rotary halves and a = position·inv_freq:
    out = f·(x1·cos a − x2·sin a, x2·cos a + x1·sin a, rest). Computed in fp32 (angles and
    products as transformers forms them), returned in the inputs' dtypes; differentiable by
    autograd, which only keeps the half-width cos/sin tables for the backward."""
    angles = position_ids[:, None, :, None].float() * inv_freq.float().to(position_ids.device)  # (B, 1, T, d/2)
    cos, sin = angles.cos() * attention_factor, angles.sin() * attention_factor
    half = cos.shape[-1]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x1, x2, rest = x.float().split((half, half, x.shape[-1] - 2 * half), dim=-1)  # one grad buffer
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest), dim=-1).to(x.dtype)

    return rotate(q), rotate(k)
