"""RMSNorm: a drop-in replacement for transformers' RMSNorm modules, run by the fused
``swkernels::rms_norm`` kernels with transformers' exact casting.

Two styles exist in transformers (see :func:`swkernels.rms_norm`): "llama" (weight * x̂.to(dtype),
weight initialised to ones, epsilon in ``variance_epsilon``) and "gemma" (((1 + weight) * x̂) in
fp32, cast once; weight initialised to zeros, epsilon in ``eps``). Only the classes listed here,
whose forward was checked against transformers' source, are recognised: other RMSNorm variants
(Olmo2's ``(w * x̂).to(dtype)``, Llama 4's, gated ones, ...) round differently and are left alone.
"""

from __future__ import annotations

import torch
from torch import nn

from swkernels.ops.rms_norm import rms_norm

LLAMA_STYLE = frozenset({
    "LlamaRMSNorm", "MistralRMSNorm", "MixtralRMSNorm", "MinistralRMSNorm", "Qwen2RMSNorm", "Qwen2MoeRMSNorm",
    "Qwen3RMSNorm", "Qwen3MoeRMSNorm", "Phi3RMSNorm", "GraniteRMSNorm", "SmolLM3RMSNorm",
})
GEMMA_STYLE = frozenset({"GemmaRMSNorm", "Gemma2RMSNorm", "Gemma3RMSNorm", "Qwen3NextRMSNorm"})
_EPS_ATTR = {"llama": "variance_epsilon", "gemma": "eps"}


def is_hf_rms_norm(module: nn.Module) -> str | None:
    """"llama" or "gemma" when ``module`` is a transformers RMSNorm this module can replace
    (a known class with a 1-D weight Parameter and a float epsilon), else None."""
    name = type(module).__name__
    style = "llama" if name in LLAMA_STYLE else "gemma" if name in GEMMA_STYLE else None
    if style is None:
        return None
    weight = getattr(module, "weight", None)
    eps = getattr(module, _EPS_ATTR[style], None)
    if not isinstance(weight, nn.Parameter) or weight.dim() != 1 or not isinstance(eps, (int, float)):
        return None
    return style


class RMSNorm(nn.Module):
    """RMSNorm over the last dim: ``weight * x̂.to(dtype)`` (llama) or ``((1 + weight) * x̂).to(dtype)``
    (``gemma=True``). The state dict holds ``weight`` as transformers' modules do."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, gemma: bool = False, device=None, dtype=None):
        super().__init__()
        init = torch.zeros if gemma else torch.ones  # both start as the identity scale
        self.weight = nn.Parameter(init(hidden_size, device=device, dtype=dtype))
        self.eps = float(eps)
        self.gemma = bool(gemma)

    @classmethod
    def from_hf(cls, module: nn.Module) -> RMSNorm:
        """Build from a transformers RMSNorm, sharing its weight Parameter (no copy)."""
        style = is_hf_rms_norm(module)
        if style is None:
            raise TypeError(f"RMSNorm.from_hf: {type(module).__name__} is not a recognised transformers RMSNorm")
        norm = cls(module.weight.shape[0], getattr(module, _EPS_ATTR[style]), style == "gemma", device="meta")
        norm.weight = module.weight
        return norm

    @property
    def style(self) -> str:
        return "gemma" if self.gemma else "llama"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, self.gemma)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}, style={self.style}"
