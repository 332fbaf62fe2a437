"""RotaryEmbedding: a drop-in replacement for a transformers rotary module (LlamaRotaryEmbedding
and its siblings) computing inverse frequencies with :mod:`swkernels.rope_scaling`.

It returns ``(cos, sin)`` with the shapes and dtype transformers' attention expects, so an
unmodified model keeps working after :func:`replace_rotary`; ``inv_freq_for(seq_len)`` and
``attention_factor`` feed the fused :func:`swkernels.apply_rope` kernel (``inv_freq`` itself stays
the length-independent table, as built at init).

Dynamic NTK is a pure function of the current sequence length here: it grows when the sequence
grows past ``max_position_embeddings`` and is exactly the original below it. (transformers keeps
the frequencies of the longest sequence seen until a sequence shorter than the original length
arrives, so a 5K-token batch after a 9K one is rotated with the 9K frequencies.)
"""

from __future__ import annotations

import torch
from torch import nn

from swkernels.reference.rope import rope_cos_sin
from swkernels.rope_scaling import RopeSpec, inv_freq_and_factor, rope_spec


class RotaryEmbedding(nn.Module):
    def __init__(self, config, device=None):
        super().__init__()
        self.config = config
        self.spec: RopeSpec = rope_spec(config)
        self.rope_type = self.spec.rope_type
        inv_freq, self.attention_scaling = inv_freq_and_factor(self.spec)
        self.register_buffer("inv_freq", inv_freq.to(device), persistent=False)
        self.register_buffer("original_inv_freq", inv_freq.clone().to(device), persistent=False)
        self.max_seq_len_cached = self.original_max_seq_len = self.spec.max_position_embeddings
        self._by_length: dict[int, tuple[torch.Tensor, float]] = {}

    @property
    def attention_factor(self) -> float:
        """The cos/sin scale (YaRN, LongRoPE; 1 otherwise): pass it to :func:`swkernels.apply_rope`.
        ``attention_scaling`` is the same number under transformers' name."""
        return self.attention_scaling

    @property
    def depends_on_length(self) -> bool:
        return self.rope_type in ("dynamic", "longrope")

    def inv_freq_for(self, seq_len: int | None) -> tuple[torch.Tensor, float]:
        """(inv_freq on this module's device, attention factor) for a sequence of ``seq_len`` tokens."""
        if not self.depends_on_length or seq_len is None:
            return self.inv_freq, self.attention_scaling
        if self.rope_type == "dynamic" and seq_len <= self.spec.max_position_embeddings:
            return self.original_inv_freq, self.attention_scaling  # the original frequencies, exactly
        if self.rope_type == "longrope":  # only two sets exist: short (≤ L0) and long
            seq_len = self.spec.original_max_position_embeddings + (seq_len > self.spec.original_max_position_embeddings)
        if seq_len not in self._by_length:
            if len(self._by_length) > 16:
                self._by_length.clear()
            inv, factor = inv_freq_and_factor(self.spec, seq_len)
            self._by_length[seq_len] = (inv.to(self.inv_freq.device), factor)
        return self._by_length[seq_len]

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, layer_type: str | None = None):
        if layer_type is not None:
            raise ValueError("swkernels RotaryEmbedding does not support per-layer-type RoPE")
        seq_len = int(position_ids.max()) + 1 if self.depends_on_length else None
        inv_freq, factor = self.inv_freq_for(seq_len)
        cos, sin = rope_cos_sin(position_ids, inv_freq.to(x.device), factor)
        return cos.to(x.dtype), sin.to(x.dtype)

    def extra_repr(self) -> str:
        return f"rope_type={self.rope_type}, dim={self.spec.dim}, theta={self.spec.theta}"


def _is_rotary(module: nn.Module) -> bool:
    return type(module).__name__.endswith("RotaryEmbedding") and hasattr(module, "inv_freq") \
        and not isinstance(module, RotaryEmbedding)


def replace_rotary(model: nn.Module) -> int:
    """Swap every transformers rotary module in ``model`` for a :class:`RotaryEmbedding` built
    from the same config (a module swap; nothing in transformers is reassigned). Returns how many."""
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if _is_rotary(child):
                config = getattr(child, "config", None)
                if config is None:
                    raise ValueError(f"{type(child).__name__} has no config to rebuild from")
                setattr(parent, name, RotaryEmbedding(config, device=child.inv_freq.device))
                replaced += 1
    return replaced
