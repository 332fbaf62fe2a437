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

import triton
import triton.language as tl

from swkernels import reference
from swkernels.ops._gated import define_gated_op


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



_OP = define_gated_op("silu_mul", _silu_mul_fwd_kernel, _silu_mul_bwd_kernel, reference.silu_mul,
                      """SwiGLU activation ``silu(gate) * up`` with a fused Triton forward and backward.""")
_silu_mul_op, _silu_mul_bwd_op, silu_mul = _OP.forward_op, _OP.backward_op, _OP.public
