"""Pure-torch RMSNorm with transformers' exact casting: the oracle and the CPU fallback."""

from __future__ import annotations

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, gemma: bool = False) -> torch.Tensor:
    """RMSNorm over the last dim, cast as transformers casts it (differentiable by autograd).

    With x̂ = x32 · rsqrt(mean(x32², -1) + eps) in fp32:
    * llama style (LlamaRMSNorm, Qwen2/3, Mistral, Phi-3): ``weight * x̂.to(x.dtype)`` — x̂ is
      rounded to the input dtype *before* the multiply; the result has dtype
      ``promote_types(weight.dtype, x.dtype)``;
    * gemma style (Gemma, Gemma 2/3): ``(x̂ * (1 + weight.float())).to(x.dtype)`` — all fp32,
      one rounding at the end.
    """
    x32 = x.float()
    xh = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    if gemma:
        return (xh * (1.0 + weight.float())).to(x.dtype)
    return weight * xh.to(x.dtype)


def rms_norm_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6,
                      gemma: bool = False, weight_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Closed-form gradients of :func:`rms_norm` (derivation in swkernels.ops.rms_norm), in fp32:
    with r = rsqrt(mean(x²) + eps), x̂ = x·r, g = dy ⊙ w_eff (w_eff = w, or 1 + w for gemma),
    ``dx = r·(g − x̂·mean(g ⊙ x̂))`` and ``dw = Σ_rows dy ⊙ x̂`` (x̂ rounded to x's dtype for llama,
    as the forward multiplies w by the rounded x̂). Returns (dx in x's dtype, dw in w's dtype or
    None when ``weight_grad`` is False)."""
    x32, dy = x.float(), grad.float()
    r = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    xh = x32 * r
    g = dy * (weight.float() + (1.0 if gemma else 0.0))
    dx = r * (g - xh * (g * xh).mean(-1, keepdim=True))
    dw = None
    if weight_grad:
        xw = xh if gemma else xh.to(x.dtype).float()
        dw = (dy * xw).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
    return dx.to(x.dtype), dw
