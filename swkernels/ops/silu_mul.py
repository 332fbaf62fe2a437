"""SwiGLU activation ``h = silu(g) * u`` (the gated MLP of Llama/Mistral/Qwen), fused.

Maths, with s = sigmoid(g) and upstream gradient dh:
    h      = g · s · u
    ∂h/∂u  = g · s                          → du = dh · g · s
    ∂h/∂g  = u · (s + g · s · (1 − s))      → dg = dh · u · s · (1 + g · (1 − s))
using ds/dg = s(1 − s). One read of (g, u) and one write of h forward; backward reads
(dh, g, u) once and writes (dg, du) once; s is recomputed, never stored. All arithmetic in
fp32 (the Triton interpreter also miscomputes bf16 arithmetic, so never skip the upcast).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from swkernels import reference
from swkernels._backend import select_backend
from swkernels.registry import KernelSpec, register

BLOCK = 1024
NUM_WARPS = 4


@triton.jit
def _silu_mul_fwd_kernel(
    g_ptr, u_ptr, h_ptr,  # (n,) contiguous, same dtype
    n,  # number of elements (not constexpr: no recompiles per shape)
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    h = g * tl.sigmoid(g) * u
    tl.store(h_ptr + offs, h.to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _silu_mul_bwd_kernel(
    dh_ptr, g_ptr, u_ptr, dg_ptr, du_ptr,  # (n,) contiguous
    n,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dh = tl.load(dh_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    dg = dh * u * s * (1.0 + g * (1.0 - s))
    du = dh * g * s
    tl.store(dg_ptr + offs, dg.to(dg_ptr.dtype.element_ty), mask=mask)
    tl.store(du_ptr + offs, du.to(du_ptr.dtype.element_ty), mask=mask)


register(
    KernelSpec("silu_mul", _silu_mul_fwd_kernel, {"g_ptr": "*{dtype}", "u_ptr": "*{dtype}", "h_ptr": "*{dtype}",
               "n": "i64", "BLOCK": "constexpr"}, {"BLOCK": BLOCK}, num_warps=NUM_WARPS),
    KernelSpec("silu_mul", _silu_mul_bwd_kernel, {"dh_ptr": "*{dtype}", "g_ptr": "*{dtype}", "u_ptr": "*{dtype}",
               "dg_ptr": "*{dtype}", "du_ptr": "*{dtype}", "n": "i64", "BLOCK": "constexpr"},
               {"BLOCK": BLOCK}, num_warps=NUM_WARPS),
)


def _check(gate: torch.Tensor, up: torch.Tensor) -> None:
    if gate.shape != up.shape:
        raise ValueError(f"silu_mul: gate {tuple(gate.shape)} and up {tuple(up.shape)} must have the same shape")
    if gate.dtype != up.dtype or gate.device != up.device:
        raise ValueError(f"silu_mul: gate and up must share dtype and device, got {gate.dtype}/{up.dtype}, "
                         f"{gate.device}/{up.device}")


def _grid(n: int) -> tuple[int]:
    return (triton.cdiv(n, BLOCK),)


@torch.library.custom_op("swkernels::silu_mul", mutates_args=())
def _silu_mul_op(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    g, u = gate.contiguous(), up.contiguous()
    h = torch.empty_like(g)
    if g.numel():
        _silu_mul_fwd_kernel[_grid(g.numel())](g, u, h, g.numel(), BLOCK=BLOCK, num_warps=NUM_WARPS)
    return h


@_silu_mul_op.register_fake
def _(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(gate, memory_format=torch.contiguous_format)


@torch.library.custom_op("swkernels::silu_mul_backward", mutates_args=())
def _silu_mul_bwd_op(grad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dh, g, u = grad.contiguous(), gate.contiguous(), up.contiguous()
    dg, du = torch.empty_like(g), torch.empty_like(u)
    if g.numel():
        _silu_mul_bwd_kernel[_grid(g.numel())](dh, g, u, dg, du, g.numel(), BLOCK=BLOCK, num_warps=NUM_WARPS)
    return dg, du


@_silu_mul_bwd_op.register_fake
def _(grad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    fmt = torch.contiguous_format
    return torch.empty_like(gate, memory_format=fmt), torch.empty_like(up, memory_format=fmt)


def _setup_context(ctx, inputs, output) -> None:
    gate, up = inputs
    ctx.save_for_backward(gate, up)


def _backward(ctx, grad: torch.Tensor):
    gate, up = ctx.saved_tensors
    return _silu_mul_bwd_op(grad, gate, up)


_silu_mul_op.register_autograd(_backward, setup_context=_setup_context)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU activation ``silu(gate) * up`` with a fused Triton forward and backward."""
    _check(gate, up)
    if select_backend("silu_mul", gate) == "torch":
        return reference.silu_mul(gate, up)
    return _silu_mul_op(gate, up)
