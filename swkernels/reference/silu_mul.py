import torch


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """h = silu(gate) * up, computed in fp32 and cast back (differentiable by autograd)."""
    g, u = gate.float(), up.float()
    return (g * torch.sigmoid(g) * u).to(gate.dtype)


def silu_mul_backward(grad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form gradients of :func:`silu_mul` (see swkernels.ops.silu_mul for the derivation)."""
    g, u, dh = gate.float(), up.float(), grad.float()
    s = torch.sigmoid(g)
    d_gate = dh * u * s * (1 + g * (1 - s))
    d_up = dh * g * s
    return d_gate.to(gate.dtype), d_up.to(up.dtype)
