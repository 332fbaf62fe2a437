"""LoRALinear: a frozen base layer (nn.Linear, or bitsandbytes NF4 Linear4bit) plus trainable
low-rank A, B, run by the fused kernels. Parameter names and layouts follow PEFT: the module's
state dict holds ``base_layer.weight``, ``lora_A.weight`` (r×in) and ``lora_B.weight`` (out×r),
so adapters convert to PEFT's saved format by a key rename."""

from __future__ import annotations

import math

import torch
from torch import nn

from swkernels.ops._nf4 import nf4_state
from swkernels.ops.lora_linear import lora_linear
from swkernels.ops.nf4_lora_linear import nf4_lora_linear


def is_nf4(layer: nn.Module) -> bool:
    return getattr(getattr(layer, "weight", None), "quant_state", None) is not None


class LoRALinear(nn.Module):
    """y = base(x) + scaling · B(A(dropout(x))), fused: one GEMM with the low-rank term in its epilogue."""

    def __init__(self, base_layer: nn.Module, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                 use_rslora: bool = False, adapter_dtype: torch.dtype = torch.float32):
        super().__init__()
        if r < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {r}")
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout}")
        self.base_layer = base_layer
        base_layer.requires_grad_(False)
        in_f, out_f = base_layer.in_features, base_layer.out_features
        device = base_layer.weight.device
        self.lora_A = nn.Linear(in_f, r, bias=False, device=device, dtype=adapter_dtype)
        self.lora_B = nn.Linear(r, out_f, bias=False, device=device, dtype=adapter_dtype)
        self.r, self.lora_alpha, self.lora_dropout, self.use_rslora = r, lora_alpha, lora_dropout, use_rslora
        # the base's NF4 quantisation state when its packed bytes are a plain tensor (see detach_nf4_state)
        self.nf4_quant_state = None
        self.scaling = lora_alpha / (math.sqrt(r) if use_rslora else r)
        self.reset_lora_parameters()

    @classmethod
    def from_linear(cls, linear: nn.Module, *, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                    use_rslora: bool = False) -> LoRALinear:
        return cls(linear, r, lora_alpha, lora_dropout, use_rslora)

    def reset_lora_parameters(self) -> None:
        """PEFT's default: A Kaiming-uniform (a=√5), B zero — so the adapter starts as a no-op."""
        if self.lora_A.weight.device.type == "meta":
            return
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def nf4(self) -> bool:
        return self.nf4_quant_state is not None or is_nf4(self.base_layer)

    def detach_nf4_state(self) -> None:
        """Hold the NF4 base weight as a plain uint8 parameter of its packed bytes, its quantisation
        state here: a sharding wrapper (FSDP2) can then split and gather the bytes like any tensor."""
        weight = self.base_layer.weight
        if self.nf4_quant_state is None and is_nf4(self.base_layer):
            self.nf4_quant_state = weight.quant_state
            self.base_layer.weight = nn.Parameter(weight.data, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.lora_dropout if self.training else 0.0
        bias = self.base_layer.bias
        if self.nf4:
            return nf4_lora_linear(x, self.base_layer.weight, self.lora_A.weight, self.lora_B.weight, self.scaling,
                                   bias, p, quant_state=self.nf4_quant_state)
        return lora_linear(x, self.base_layer.weight, self.lora_A.weight, self.lora_B.weight, self.scaling, bias, p)

    def base_weight(self) -> torch.Tensor:
        """The base weight in full precision (dequantised for NF4)."""
        if self.nf4:
            # our reader, not bitsandbytes' CPU dequantize: in bnb 0.50.2 that one is wrong when
            # in_features % 64 != 0 but is even (blocks straddling rows, e.g. 40×96)
            return nf4_state(self.base_layer.weight, self.nf4_quant_state).dequantize()
        return self.base_layer.weight.float()

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """W + scaling · B·A in fp32 (what a merged model's layer holds)."""
        return self.base_weight() + self.scaling * (self.lora_B.weight.float() @ self.lora_A.weight.float())

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, r={self.r}, alpha={self.lora_alpha}, "
                f"dropout={self.lora_dropout}, rslora={self.use_rslora}, nf4={self.nf4}")
