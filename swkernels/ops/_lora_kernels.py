"""Triton kernels shared by the LoRA ops (bf16/fp16/fp32 base weight, and NF4 base weight).

Three kernels cover forward and backward of y = x·Wᵀ + s·(drop(x)·Aᵀ)·Bᵀ:

* ``_skinny_nt``: C (M×R) = s · drop(X) (M×K) · Y (R×K)ᵀ — the scaled rank-r projections
  S = s·drop(x)·Aᵀ (forward) and T = s·dY·B (backward, Y = Bᵀ through strides). Scaling here, on
  the small tensors, leaves the epilogues and the weight gradients without a multiply.
* ``_gemm_lora``: C (M×N) = X (M×K) · Z (N×K)ᵀ, plus in the epilogue L (M×R) · Q (N×R)ᵀ (times
  the dropout keep-mask / (1−p) when asked) plus bias. Forward: Z = W, L = S, Q = B.
  Backward: dX = dY·W + (T·A)⊙mask/(1−p) with Z = Wᵀ, L = T, Q = Aᵀ (strides again). With
  ``Z_NF4`` the Z tiles are dequantised from bitsandbytes' NF4 bytes inside the K-loop.
* ``_skinny_tn``: C (N×R) = drop(X)ᵀ (N×M) · L (M×R) — dB = dYᵀ·S and dA = Tᵀ·drop(x), the
  latter stored transposed through C's strides.

Dropout is Philox counter-based (``tl.rand(seed, m·K + k)``): the forward and both backward
uses regenerate the same keep-mask from (seed, element index); no mask tensor is stored.
Every accumulation is fp32; tensor-core inputs stay in the compute dtype.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _keep_scale(seed, offsets, p):
    """1/(1−p) where the element is kept, else 0 (inverted dropout)."""
    keep = tl.rand(seed, offsets) >= p
    return tl.where(keep, 1.0 / (1.0 - p), 0.0)


@triton.jit
def _dot(a, b, FP32_DOT: tl.constexpr):
    """a·b with fp32 accumulation; b is rounded to a's dtype first (as tensor cores see it).
    FP32_DOT does the products in fp32: for fp32 inputs (exact "ieee", no TF32) and under the
    Triton interpreter, whose bf16 arithmetic is unreliable (bf16·bf16 products are exact in fp32,
    so the result matches the tensor-core path)."""
    b = b.to(a.dtype)
    if FP32_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _dropout_mask_kernel(out_ptr, n, p, seed, BLOCK: tl.constexpr):
    """The keep-scale of elements 0..n−1 (row-major index m·K + k), as the other kernels draw it."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, _keep_scale(seed, offs, p), mask=offs < n)


@triton.jit
def _nf4_tile(w_ptr, code_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, flat, mask,
              BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr):
    """Dequantise NF4 elements at flat (row-major) indices of W: byte i//2 holds element i, even
    elements in the high nibble; value = code[nibble] · absmax[i // blocksize] (fp32).
    NESTED (double quant): absmax is itself 8-bit, absmax[b] = code2[q[b]] · absmax2[b // 256] + offset,
    decoded here from bitsandbytes' own tensors (the gathers hit L1: a BK×BN tile spans few blocks)."""
    byte = tl.load(w_ptr + flat // 2, mask=mask, other=0).to(tl.int32)
    nib = tl.where(flat % 2 == 0, byte >> 4, byte & 0xF)
    code = tl.load(code_ptr + nib, mask=mask, other=0.0)
    block = flat // BLOCKSIZE
    if NESTED:
        q = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        scale = (tl.load(code2_ptr + q, mask=mask, other=0.0)
                 * tl.load(absmax2_ptr + block // NESTED_BLOCKSIZE, mask=mask, other=0.0) + tl.load(offset_ptr))
    else:
        scale = tl.load(absmax_ptr + block, mask=mask, other=0.0)
    return code * scale


@triton.jit
def _skinny_nt(
    x_ptr, y_ptr, c_ptr,  # X (M, K), Y (R, K), C (M, R)
    M, K, R,
    stride_xm, stride_xk, stride_yr, stride_yk, stride_cm, stride_cr,
    scaling, dropout_p, seed,
    DROPOUT: tl.constexpr, FP32_DOT: tl.constexpr,
    BM: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_r = tl.program_id(1).to(tl.int64)
    rm = pid_m * BM + tl.arange(0, BM)
    rr = pid_r * BR + tl.arange(0, BR)
    acc = tl.zeros((BM, BR), dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        xmask = (rm[:, None] < M) & (rk[None, :] < K)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk, mask=xmask, other=0.0)
        if DROPOUT:
            x = (x.to(tl.float32) * _keep_scale(seed, rm[:, None] * K + rk[None, :], dropout_p)).to(x.dtype)
        y = tl.load(y_ptr + rk[:, None] * stride_yk + rr[None, :] * stride_yr,
                    mask=(rk[:, None] < K) & (rr[None, :] < R), other=0.0)
        acc += _dot(x, y, FP32_DOT)
    tl.store(c_ptr + rm[:, None] * stride_cm + rr[None, :] * stride_cr, (scaling * acc).to(c_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rr[None, :] < R))


@triton.jit
def _gemm_lora(
    x_ptr, z_ptr, l_ptr, q_ptr, bias_ptr, c_ptr,  # X (M,K), Z (N,K), L (M,R), Q (N,R), bias (N,), C (M,N)
    # NF4 only: 16-entry code (fp32), absmax per block (fp32, or uint8 when NF4_NESTED), and for
    # NF4_NESTED the second-level 256-entry code, absmax per 256 blocks and the offset (fp32)
    code_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,
    M, N, K, R, M_BUCKET,  # M_BUCKET: power-of-two bucket of M, the autotune key (M itself varies per batch)
    stride_xm, stride_xk, stride_zn, stride_zk, stride_lm, stride_lr, stride_qn, stride_qr, stride_cm, stride_cn,
    dropout_p, seed,
    HAS_BIAS: tl.constexpr, Z_NF4: tl.constexpr, DROPOUT: tl.constexpr, FP32_DOT: tl.constexpr,
    NF4_BLOCKSIZE: tl.constexpr, NF4_NESTED: tl.constexpr, NF4_NESTED_BLOCKSIZE: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr, GROUP_M: tl.constexpr,
):
    # grouped launch order: neighbouring programs share Z tiles in L2
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = (first_m + (pid % group) % size_m).to(tl.int64)
    pid_n = ((pid % group) // size_m).to(tl.int64)

    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk,
                    mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
        zmask = (rk[:, None] < K) & (rn[None, :] < N)
        zoffs = rk[:, None] * stride_zk + rn[None, :] * stride_zn  # Zᵀ tile (BK, BN)
        if Z_NF4:
            z = _nf4_tile(z_ptr, code_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, zoffs, zmask,
                          NF4_BLOCKSIZE, NF4_NESTED, NF4_NESTED_BLOCKSIZE)
        else:
            z = tl.load(z_ptr + zoffs, mask=zmask, other=0.0)
        acc += _dot(x, z, FP32_DOT)

    # epilogue: the low-rank term, added before the single write of C
    if DROPOUT:  # the mask applies to the low-rank term alone: accumulate it apart
        lora = tl.zeros((BM, BN), dtype=tl.float32)
        for r0 in range(0, R, BR):
            rr = r0 + tl.arange(0, BR)
            lt = tl.load(l_ptr + rm[:, None] * stride_lm + rr[None, :] * stride_lr,
                         mask=(rm[:, None] < M) & (rr[None, :] < R), other=0.0)
            qt = tl.load(q_ptr + rr[:, None] * stride_qr + rn[None, :] * stride_qn,
                         mask=(rr[:, None] < R) & (rn[None, :] < N), other=0.0)
            lora += _dot(lt, qt, FP32_DOT)
        acc += lora * _keep_scale(seed, rm[:, None] * N + rn[None, :], dropout_p)
    else:  # accumulate straight into acc: no second BM×BN accumulator
        for r0 in range(0, R, BR):
            rr = r0 + tl.arange(0, BR)
            lt = tl.load(l_ptr + rm[:, None] * stride_lm + rr[None, :] * stride_lr,
                         mask=(rm[:, None] < M) & (rr[None, :] < R), other=0.0)
            qt = tl.load(q_ptr + rr[:, None] * stride_qr + rn[None, :] * stride_qn,
                         mask=(rr[:, None] < R) & (rn[None, :] < N), other=0.0)
            acc += _dot(lt, qt, FP32_DOT)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(c_ptr + rm[:, None] * stride_cm + rn[None, :] * stride_cn, acc.to(c_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def _skinny_tn(
    x_ptr, l_ptr, c_ptr,  # X (M, N), L (M, R), C (N, R)
    M, N, R,
    stride_xm, stride_xn, stride_lm, stride_lr, stride_cn, stride_cr,
    dropout_p, seed,
    DROPOUT: tl.constexpr, FP32_DOT: tl.constexpr,
    BN: tl.constexpr, BM: tl.constexpr, BR: tl.constexpr,
):
    pid_n = tl.program_id(0).to(tl.int64)
    pid_r = tl.program_id(1).to(tl.int64)
    rn = pid_n * BN + tl.arange(0, BN)
    rr = pid_r * BR + tl.arange(0, BR)
    acc = tl.zeros((BN, BR), dtype=tl.float32)
    for m0 in range(0, M, BM):
        rm = m0 + tl.arange(0, BM)
        xmask = (rn[:, None] < N) & (rm[None, :] < M)
        xt = tl.load(x_ptr + rn[:, None] * stride_xn + rm[None, :] * stride_xm, mask=xmask, other=0.0)  # (BN, BM)
        if DROPOUT:
            xt = (xt.to(tl.float32) * _keep_scale(seed, rm[None, :] * N + rn[:, None], dropout_p)).to(xt.dtype)
        lt = tl.load(l_ptr + rm[:, None] * stride_lm + rr[None, :] * stride_lr,
                     mask=(rm[:, None] < M) & (rr[None, :] < R), other=0.0)
        acc += _dot(xt, lt, FP32_DOT)
    tl.store(c_ptr + rn[:, None] * stride_cn + rr[None, :] * stride_cr, acc.to(c_ptr.dtype.element_ty),
             mask=(rn[:, None] < N) & (rr[None, :] < R))
