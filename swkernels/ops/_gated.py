"""Plumbing shared by the gated activations ``h = act(gate) · up`` (SwiGLU, GeGLU-tanh): one
elementwise forward kernel ``(g, u) → h`` and one backward kernel ``(dh, g, u) → (dg, du)``
become the custom ops ``swkernels::<name>`` and ``swkernels::<name>_backward`` with fake
implementations, autograd that saves only gate and up (the activation is recomputed in backward,
never stored), health-registry entries, and the public function with its backend choice.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton

from swkernels._backend import select_backend
from swkernels.registry import KernelSpec, register

BLOCK = 1024
NUM_WARPS = 4
_FWD_SIG = {"g_ptr": "*{dtype}", "u_ptr": "*{dtype}", "h_ptr": "*{dtype}", "n": "i64", "BLOCK": "constexpr"}
_BWD_SIG = {"dh_ptr": "*{dtype}", "g_ptr": "*{dtype}", "u_ptr": "*{dtype}", "dg_ptr": "*{dtype}",
            "du_ptr": "*{dtype}", "n": "i64", "BLOCK": "constexpr"}


@dataclass(frozen=True)
class GatedOp:
    forward_op: Callable  # swkernels::<name>
    backward_op: Callable  # swkernels::<name>_backward
    public: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _grid(n: int) -> tuple[int]:
    return (triton.cdiv(n, BLOCK),)


def _check(name: str, gate: torch.Tensor, up: torch.Tensor) -> None:
    if gate.shape != up.shape:
        raise ValueError(f"{name}: gate {tuple(gate.shape)} and up {tuple(up.shape)} must have the same shape")
    if gate.dtype != up.dtype or gate.device != up.device:
        raise ValueError(f"{name}: gate and up must share dtype and device, got {gate.dtype}/{up.dtype}, "
                         f"{gate.device}/{up.device}")


def define_gated_op(name: str, fwd_kernel, bwd_kernel, reference_fn, doc: str) -> GatedOp:
    """Register ``swkernels::<name>`` (+ backward) around the two kernels; ``reference_fn`` is the
    torch fallback. Returns the ops (for opcheck tests) and the public function."""
    register(KernelSpec(name, fwd_kernel, _FWD_SIG, {"BLOCK": BLOCK}, num_warps=NUM_WARPS),
             KernelSpec(name, bwd_kernel, _BWD_SIG, {"BLOCK": BLOCK}, num_warps=NUM_WARPS))

    def forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        g, u = gate.contiguous(), up.contiguous()
        h = torch.empty_like(g)
        if g.numel():
            fwd_kernel[_grid(g.numel())](g, u, h, g.numel(), BLOCK=BLOCK, num_warps=NUM_WARPS)
        return h

    def backward(grad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dh, g, u = grad.contiguous(), gate.contiguous(), up.contiguous()
        dg, du = torch.empty_like(g), torch.empty_like(u)
        if g.numel():
            bwd_kernel[_grid(g.numel())](dh, g, u, dg, du, g.numel(), BLOCK=BLOCK, num_warps=NUM_WARPS)
        return dg, du

    forward_op = torch.library.custom_op(f"swkernels::{name}", mutates_args=())(forward)
    backward_op = torch.library.custom_op(f"swkernels::{name}_backward", mutates_args=())(backward)

    @forward_op.register_fake
    def _(gate, up):
        return torch.empty_like(gate, memory_format=torch.contiguous_format)

    @backward_op.register_fake
    def _(grad, gate, up):
        fmt = torch.contiguous_format
        return torch.empty_like(gate, memory_format=fmt), torch.empty_like(up, memory_format=fmt)

    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(*inputs)  # gate and up: the activation is recomputed in backward

    def autograd_backward(ctx, grad):
        return backward_op(grad, *ctx.saved_tensors)

    forward_op.register_autograd(autograd_backward, setup_context=setup_context)

    def public(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        _check(name, gate, up)
        if select_backend(name, gate) == "torch":
            return reference_fn(gate, up)
        return forward_op(gate, up)

    public.__name__ = public.__qualname__ = name
    public.__doc__ = doc
    return GatedOp(forward_op, backward_op, public)
