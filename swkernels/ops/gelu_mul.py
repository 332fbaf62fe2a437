"""GeGLU-tanh activation ``h = gelu_tanh(g) * u`` (the gated MLP of Gemma/Gemma2/Gemma3), fused.

gelu_tanh is ``F.gelu(approximate="tanh")`` (HF ``ACT2FN["gelu_pytorch_tanh"]``):
    gelu_tanh(g) = ½·g·(1 + tanh(z)),   z = √(2/π)·(g + c·g³),   c = 0.044715.

Triton has no portable ``tanh`` (not in ``tl``; libdevice differs between the interpreter and
compiled code), and ``tanh(z) = 2σ(2z) − 1`` cancels catastrophically near z = 0. Instead use
    ½·(1 + tanh(z)) = σ(2z)      (exact identity: ½(1 + (1 − e^{−2z})/(1 + e^{−2z})) = 1/(1 + e^{−2z}))
so, with s = σ(2z),
    h = g · s · u,
the same shape as SwiGLU with argument 2z instead of g. No subtraction of nearly equal numbers
anywhere: near g = 0, s → ½ and h ≈ ½·g·u to full relative precision; for large |g|, σ
saturates cleanly to 1 (h = g·u) or 0 (h = −0·u), with no inf/inf or inf − inf.

Gradients, with upstream dh, dσ(x)/dx = σ(x)(1 − σ(x)) and z' = dz/dg = √(2/π)·(1 + 3c·g²):
    ∂s/∂g  = 2·s·(1 − s)·z'
    ∂h/∂u  = g · s                                  → du = dh · g · s
    ∂h/∂g  = u · (s + g · ∂s/∂g)                     → dg = dh · u · (s + 2·g·s·(1 − s)·z')
(Equivalently, in tanh form with t = tanh(z): s = ½(1 + t), 2s(1 − s) = ½(1 − t²), giving the
textbook dg = dh·u·(½(1 + t) + ½·g·(1 − t²)·z'), which the reference uses.) For |g| large,
s(1 − s) underflows to 0 while g·z' grows like g³ (and overflows fp32 for |g| ≳ 1e13); the
kernel sets that term to exactly 0 wherever s(1 − s) = 0, so it never evaluates inf·0.

One read of (g, u) and one write of h forward; backward reads (dh, g, u) once and writes
(dg, du) once; s is recomputed, never stored. All arithmetic in fp32 (the Triton interpreter
also miscomputes bf16 arithmetic, so never skip the upcast).
"""

from __future__ import annotations

import triton
import triton.language as tl

from swkernels import reference
from swkernels.ops._gated import define_gated_op

# In the kernels: 1.5957691216057308 = 2·√(2/π), 0.044715 = c, 0.134145 = 3c.


@triton.jit
def _gelu_mul_fwd_kernel(
    g_ptr, u_ptr, h_ptr,  # (n,) contiguous, same dtype
    n,  # number of elements (not constexpr: no recompiles per shape)
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(1.5957691216057308 * (g + 0.044715 * g * g * g))  # σ(2z) = ½(1 + tanh z)
    h = g * s * u
    tl.store(h_ptr + offs, h.to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gelu_mul_bwd_kernel(
    dh_ptr, g_ptr, u_ptr, dg_ptr, du_ptr,  # (n,) contiguous
    n,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dh = tl.load(dh_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g2 = g * g
    s = tl.sigmoid(1.5957691216057308 * (g + 0.044715 * g2 * g))  # σ(2z)
    ss = s * (1.0 - s)
    # 2·z' = 2√(2/π)·(1 + 3c·g²); the term is exactly 0 where σ saturates (avoids 0·inf for huge g)
    ds = tl.where(ss == 0.0, 0.0, g * ss * (1.5957691216057308 * (1.0 + 0.134145 * g2)))
    dg = dh * u * (s + ds)
    du = dh * g * s
    tl.store(dg_ptr + offs, dg.to(dg_ptr.dtype.element_ty), mask=mask)
    tl.store(du_ptr + offs, du.to(du_ptr.dtype.element_ty), mask=mask)



_OP = define_gated_op("gelu_mul", _gelu_mul_fwd_kernel, _gelu_mul_bwd_kernel, reference.gelu_mul,
                      """GeGLU activation ``gelu_tanh(gate) * up`` (``F.gelu(gate, approximate="tanh") * up``, as in
Gemma's MLP) with a fused Triton forward and backward.""")
_gelu_mul_op, _gelu_mul_bwd_op, gelu_mul = _OP.forward_op, _OP.backward_op, _OP.public
