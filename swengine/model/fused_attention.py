"""A decoder layer's attention with our RoPE kernel: swapped in for the transformers module.

q, k, v come from the original's (LoRA) projections — the very module instances, kept under the
same names so adapter paths and state-dict keys do not change — then Qwen3/Gemma 3 q/k norms,
then one :func:`swkernels.apply_rope` launch rotates q and k with cos/sin computed in-kernel from
inv_freq and position_ids (the rotary module hands over :class:`RopeArgs` instead of tables),
then the attention function the model was built with (our SDPA entry, flash-attn, or the
family's eager function, which carries Gemma-2's logit soft-capping), then o_proj.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

import swkernels
from swkernels.nn.rotary import RopeArgs


def _attention_function(original: nn.Module, config):
    """What the original module would call: the registered implementation, or its family's eager one."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    impl = config._attn_implementation
    if impl in (None, "eager"):
        return sys.modules[type(original).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[impl]


class FusedAttention(nn.Module):
    """Drop-in for Llama/Mistral/Qwen2/Qwen3/Phi-3/Gemma/Gemma-2/Gemma-3 attention (no KV cache
    semantics change: a cache, when given, is updated after the rotation as transformers does)."""

    def __init__(self, original: nn.Module, fused_qkv: bool):
        super().__init__()
        config = original.config
        self.config, self.layer_idx = config, original.layer_idx
        self.head_dim = original.head_dim
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = original.num_key_value_groups  # read by the eager / sdpa functions
        self.scaling = original.scaling
        self.attention_dropout = original.attention_dropout
        self.is_causal = getattr(original, "is_causal", True)
        # Mistral and Phi-3 pass the config's window; Qwen2/Gemma keep one per layer (None on full layers)
        self.sliding_window = (original.sliding_window if hasattr(original, "sliding_window")
                               else getattr(config, "sliding_window", None))
        self.softcap = getattr(original, "attn_logit_softcapping", None)
        self.fused_qkv = fused_qkv
        names = ("qkv_proj", "o_proj") if fused_qkv else ("q_proj", "k_proj", "v_proj", "o_proj")
        for name in (*names, "q_norm", "k_norm"):
            if hasattr(original, name):
                setattr(self, name, getattr(original, name))  # the same instances: LoRA and norms stay shared
        self.has_qk_norm = hasattr(original, "q_norm")
        self._attend = _attention_function(original, config)

    def _project(self, hidden_states: torch.Tensor):
        shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        if self.fused_qkv:
            qkv = self.qkv_proj(hidden_states)
            q_end = self.num_heads * self.head_dim
            k_end = q_end + self.num_key_value_heads * self.head_dim
            q, k, v = qkv[..., :q_end], qkv[..., q_end:k_end], qkv[..., k_end:]
        else:
            q, k, v = self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)
        q, k, v = q.view(shape), k.view(shape), v.view(shape)
        if self.has_qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None, **kwargs):
        if not isinstance(position_embeddings, RopeArgs):
            raise RuntimeError("FusedAttention needs RopeArgs from swkernels.nn.RotaryEmbedding (fused=True); "
                               "the model's rotary module was not swapped")
        batch, seq = hidden_states.shape[:2]
        q, k, v = self._project(hidden_states)
        position_ids = position_embeddings.position_ids
        if position_ids.shape[0] != batch:
            position_ids = position_ids.expand(batch, seq)
        q, k = swkernels.apply_rope(q, k, position_ids, position_embeddings.inv_freq,
                                    position_embeddings.attention_factor)
        cache = kwargs.pop("cache", None) or kwargs.pop("past_key_values", None)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        extra = {"softcap": self.softcap} if self.softcap else {}
        out, weights = self._attend(self, q, k, v, attention_mask,
                                    dropout=self.attention_dropout if self.training else 0.0,
                                    scaling=self.scaling, sliding_window=self.sliding_window, **extra, **kwargs)
        return self.o_proj(out.reshape(batch, seq, -1).contiguous()), weights

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, kv_heads={self.num_key_value_heads}, head_dim={self.head_dim}, "
                f"window={self.sliding_window}, softcap={self.softcap}, rope=swkernels.apply_rope")
