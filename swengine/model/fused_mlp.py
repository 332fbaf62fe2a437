"""A decoder layer's gated MLP with our fused activation: down(act(gate(x)) · up(x)).

The gate/up/down (LoRA) projections are the original module's instances under the same names.
The activation runs as one fused kernel that keeps only gate and up for backward (the activation
is recomputed there, never stored): SwiGLU (Llama, Mistral, Qwen, Phi-3) through
:func:`swkernels.silu_mul`, GELU-tanh (Gemma) through :func:`swkernels.gelu_mul`. Phi-3's fused
``gate_up_proj`` is split as [gate | up], as transformers does.
"""

from __future__ import annotations

import torch
from torch import nn

import swkernels

KERNELS = {"silu": swkernels.silu_mul, "swish": swkernels.silu_mul, "gelu_pytorch_tanh": swkernels.gelu_mul}


class FusedMLP(nn.Module):
    def __init__(self, original: nn.Module, activation: str, fused_gate_up: bool):
        super().__init__()
        self.activation, self.fused_gate_up = activation, fused_gate_up
        self._act_mul = KERNELS[activation]
        names = ("gate_up_proj", "down_proj") if fused_gate_up else ("gate_proj", "up_proj", "down_proj")
        for name in names:
            setattr(self, name, getattr(original, name))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused_gate_up:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(self._act_mul(gate, up))

    def extra_repr(self) -> str:
        return f"activation={self.activation} (swkernels.{self._act_mul.__name__})"
