"""Fused LoRA linear over a 4-bit NF4 base weight (QLoRA): y = x·Wᵀ + s·(drop(x)·Aᵀ)·Bᵀ (+ bias),
W stored as bitsandbytes packs it and dequantised tile by tile inside the GEMM's K-loop.

The kernels read bitsandbytes' ``Params4bit`` + ``QuantState`` tensors as they are (layout in
:mod:`swkernels.ops._nf4`): the packed bytes, the 16-entry NF4 code and the per-64-element scales,
and with double quantisation the uint8 scales with their second-level code, scales and offset,
decoded per element in the kernel. Nothing of W's size is ever materialised, not even the fp32
scales (N·K/16 bytes); the backward saves only what the weight already holds. Blocks may
straddle rows when K % 64 ≠ 0: the kernel indexes W by flat element, so that is handled.

Gradients are those of :mod:`swkernels.ops.lora_linear` (W frozen; S = s·drop(x)·Aᵀ, T = s·G·B):
    ∂L/∂x = G·W + (T·A) ⊙ m/(1−p),  ∂L/∂A = Tᵀ·drop(x),  ∂L/∂B = Gᵀ·S.
The dX GEMM reads the same NF4 bytes through transposed element strides: element (k, n) of
Wᵀ is W's flat element n·K + k.
"""

from __future__ import annotations

import torch

from swkernels import reference
from swkernels._backend import select_backend
from swkernels.ops._nf4 import NF4Weight, nf4_state
from swkernels.ops.lora_linear import (
    _nf4_specs,
    check_lora_args,
    compute_dtype,
    cublas_lora_linear,
    launch_gemm,
    launch_skinny_nt,
    lora_backward_low_rank,
    new_seed,
    use_cublas,
)
from swkernels.registry import register

__all__ = ["NF4Weight", "nf4_lora_linear", "nf4_state"]


def _weight(packed, absmax, code, absmax2, code2, offset, out_features, blocksize, nested_blocksize, k):
    return NF4Weight(packed, absmax, code, (out_features, k), blocksize, absmax2, code2, offset, nested_blocksize)


@torch.library.custom_op("swkernels::nf4_lora_linear_fwd", mutates_args=())
def nf4_lora_linear_fwd(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                        absmax2: torch.Tensor | None, code2: torch.Tensor | None, offset: torch.Tensor | None,
                        out_features: int, blocksize: int, nested_blocksize: int, a: torch.Tensor,
                        b: torch.Tensor, bias: torch.Tensor | None, scaling: float, dropout_p: float,
                        seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    M, K, R = x.shape[0], x.shape[1], a.shape[0]
    w = _weight(packed, absmax, code, absmax2, code2, offset, out_features, blocksize, nested_blocksize, K)
    s = launch_skinny_nt(x, (a.stride(0), a.stride(1)), a, R, x.new_empty(M, R), scaling, dropout_p, seed)
    y = x.new_empty(M, out_features)
    # Z = W: element (n, k) is flat element n·K + k
    launch_gemm(x, packed, (K, 1), s, b, (b.stride(0), b.stride(1)), bias, y, 0.0, seed, nf4=w)
    return y, s


@nf4_lora_linear_fwd.register_fake
def _(x, packed, absmax, code, absmax2, code2, offset, out_features, blocksize, nested_blocksize, a, b, bias,
      scaling, dropout_p, seed):
    return x.new_empty(x.shape[0], out_features), x.new_empty(x.shape[0], a.shape[0])


@torch.library.custom_op("swkernels::nf4_lora_linear_bwd", mutates_args=())
def nf4_lora_linear_bwd(dy: torch.Tensor, x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor,
                        code: torch.Tensor, absmax2: torch.Tensor | None, code2: torch.Tensor | None,
                        offset: torch.Tensor | None, blocksize: int, nested_blocksize: int, a: torch.Tensor,
                        b: torch.Tensor, s: torch.Tensor, scaling: float, dropout_p: float,
                        seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    K = x.shape[1]
    w = _weight(packed, absmax, code, absmax2, code2, offset, dy.shape[1], blocksize, nested_blocksize, K)
    t, da, db = lora_backward_low_rank(dy, x, a, b, s, scaling, dropout_p, seed)
    dx = x.new_empty(x.shape)
    # dX = G·W: Z = Wᵀ (K×N), element (k, n) is W's flat element n·K + k: strides (1, K)
    launch_gemm(dy, packed, (1, K), t, a, (a.stride(1), a.stride(0)), None, dx, dropout_p, seed, nf4=w)
    return dx, da, db


@nf4_lora_linear_bwd.register_fake
def _(dy, x, packed, absmax, code, absmax2, code2, offset, blocksize, nested_blocksize, a, b, s, scaling,
      dropout_p, seed):
    dy.new_empty(x.shape[0], a.shape[0])  # T, the real kernel's transient
    return x.new_empty(x.shape), torch.empty_like(a), torch.empty_like(b)


def _setup(ctx, inputs, output):
    (x, packed, absmax, code, absmax2, code2, offset, out_features, blocksize, nested_blocksize, a, b, bias,
     scaling, dropout_p, seed) = inputs
    # the NF4 tensors are the weight's own: saving them costs no memory
    ctx.save_for_backward(x, packed, absmax, code, absmax2, code2, offset, a, b, output[1])
    ctx.blocksize, ctx.nested_blocksize = blocksize, nested_blocksize
    ctx.scaling, ctx.dropout_p, ctx.seed = scaling, dropout_p, seed
    ctx.has_bias = bias is not None
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, dy, _ds):
    x, packed, absmax, code, absmax2, code2, offset, a, b, s = ctx.saved_tensors
    dx, da, db = nf4_lora_linear_bwd(dy.contiguous(), x, packed, absmax, code, absmax2, code2, offset,
                                     ctx.blocksize, ctx.nested_blocksize, a, b, s, ctx.scaling, ctx.dropout_p,
                                     ctx.seed)
    dbias = dy.sum(0) if ctx.has_bias else None
    return dx, None, None, None, None, None, None, None, None, None, da, db, dbias, None, None, None


nf4_lora_linear_fwd.register_autograd(_backward, setup_context=_setup)


def nf4_lora_linear(x: torch.Tensor, weight, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float,
                    bias: torch.Tensor | None = None, dropout_p: float = 0.0, quant_state=None) -> torch.Tensor:
    """QLoRA linear: like :func:`swkernels.lora_linear` with ``weight`` a quantised bitsandbytes
    NF4 ``Params4bit`` (``Linear4bit.weight``; blocksize 64 by default, with or without double
    quant). The compute dtype is x's (or autocast's); fp16/bf16 run the fused kernels.
    ``quant_state``: the weight's bitsandbytes QuantState when ``weight`` is its packed bytes alone."""
    w = nf4_state(weight, quant_state)
    out_features, in_features = w.shape
    check_lora_args(x, out_features, in_features, lora_a, lora_b, bias, scaling, dropout_p)
    dtype = compute_dtype(x)
    x2 = x.reshape(-1, in_features).to(dtype)
    bias_c = bias.to(dtype) if bias is not None else None
    if select_backend("nf4_lora_linear", x) == "torch":
        y = reference.lora_linear(x2, w.dequantize().to(dtype), lora_a, lora_b, scaling, bias_c, dropout_p)
    elif use_cublas(x2) or (x2.is_cuda and dtype == torch.float32):
        # T4-class GPUs, or fp32 compute: bitsandbytes' dequantise + cuBLAS, as QLoRA does
        import bitsandbytes.functional as bnbf

        qs = quant_state if quant_state is not None else weight.quant_state
        dense = bnbf.dequantize_4bit(weight.data, qs).to(dtype)
        y = cublas_lora_linear(x2, dense, lora_a, lora_b, scaling, bias_c, dropout_p)
    else:
        seed = new_seed(dropout_p)
        y, _ = nf4_lora_linear_fwd(x2.contiguous(), w.packed, w.absmax, w.code, w.absmax2, w.code2, w.offset,
                                   out_features, w.blocksize, w.nested_blocksize, lora_a, lora_b, bias_c,
                                   float(scaling), float(dropout_p), seed)
    return y.reshape(*x.shape[:-1], out_features)


# the skinny kernels (S, T, dA, dB) are lora_linear's, registered there
register(*_nf4_specs("nf4_lora_linear"))
