import math

import torch

_K = math.sqrt(2.0 / math.pi)  # √(2/π)
_C = 0.044715


def _up(t: torch.Tensor) -> torch.Tensor:
    """fp32 for fp32/fp16/bf16; float64 stays float64 (the closed-form check runs in float64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def gelu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """h = gelu_tanh(gate) * up, computed in fp32 and cast back (differentiable by autograd).

    gelu_tanh(g) = 0.5·g·(1 + tanh(√(2/π)·(g + 0.044715·g³))), i.e.
    ``F.gelu(g, approximate="tanh")`` (Gemma's ``gelu_pytorch_tanh``), written out as the textbook
    formula so that it is an independent oracle for the kernel (which uses the sigmoid form).
    Like torch's own fp32 gelu, this form loses relative (not absolute, ≲1e-6) precision for
    gate ≲ −4, where 1 + tanh(z) cancels; the kernel's σ(2z) form does not.
    """
    g, u = _up(gate), _up(up)
    z = _K * (g + _C * g * g * g)
    return (0.5 * g * (1 + torch.tanh(z)) * u).to(gate.dtype)


def gelu_mul_backward(grad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form gradients of :func:`gelu_mul` (see swkernels.ops.gelu_mul for the derivation):
    with t = tanh(z), z' = √(2/π)·(1 + 3·0.044715·g²),
    d_gate = dh·u·(0.5·(1 + t) + 0.5·g·(1 − t²)·z'),  d_up = dh·0.5·g·(1 + t)."""
    g, u, dh = _up(gate), _up(up), _up(grad)
    z = _K * (g + _C * g * g * g)
    t = torch.tanh(z)
    dz = _K * (1 + 3 * _C * g * g)
    d_gate = dh * u * (0.5 * (1 + t) + 0.5 * g * (1 - t * t) * dz)
    d_up = dh * 0.5 * g * (1 + t)
    return d_gate.to(gate.dtype), d_up.to(up.dtype)
