"""Fused LoRA linear over a 4-bit NF4 base weight (QLoRA): y = x·Wᵀ + s·(drop(x)·Aᵀ)·Bᵀ (+ bias),
W stored as bitsandbytes packs it and dequantised tile by tile inside the GEMM's K-loop.

Layout read (bitsandbytes ``Params4bit`` + ``QuantState``): W (N, K) flattened row-major, byte
i//2 holds element i (even element in the high nibble), value = code[nibble] · absmax[i // 64].
With double quantisation, absmax itself is 8-bit: we undo that once per call on the host with
bitsandbytes' own ``dequantize_blockwise`` (+ offset): N·K/64 floats, 1/32 of a bf16 copy of W;
a full-precision W is never materialised. Blocks may straddle rows when K % 64 ≠ 0; the kernel
indexes by flat element, so that is handled.

Gradients are those of :mod:`swkernels.ops.lora_linear` (W frozen); the backward dX GEMM reads
the same NF4 bytes through transposed element strides.
"""

from __future__ import annotations

import torch

from swkernels import reference
from swkernels._backend import select_backend
from swkernels.ops.lora_linear import (
    _skinny_specs,
    _specs,
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


def nf4_state(weight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, int], int]:
    """(packed uint8, absmax fp32, code fp32, (N, K), blocksize) from a bitsandbytes ``Params4bit``."""
    qs = getattr(weight, "quant_state", None)
    if qs is None:
        raise ValueError("nf4_lora_linear: the weight has no quant_state; pass a bitsandbytes Params4bit "
                         "(Linear4bit.weight) that has been quantised")
    if qs.quant_type != "nf4":
        raise ValueError(f"nf4_lora_linear: quant_type must be 'nf4', got {qs.quant_type!r}")
    if getattr(qs, "packing_format_for_cpu", False):
        raise ValueError("nf4_lora_linear: this weight was repacked by bitsandbytes' CPU kernels; "
                         "quantise it again (or move it with .cuda()) to get the standard NF4 layout")
    if qs.nested:
        import bitsandbytes.functional as bnbf

        absmax = bnbf.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset
    else:
        absmax = qs.absmax
    return weight.data.reshape(-1), absmax.float(), qs.code.float(), tuple(qs.shape), int(qs.blocksize)


@torch.library.custom_op("swkernels::nf4_lora_linear_fwd", mutates_args=())
def nf4_lora_linear_fwd(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                        out_features: int, blocksize: int, a: torch.Tensor, b: torch.Tensor,
                        bias: torch.Tensor | None, scaling: float, dropout_p: float,
                        seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    M, K, R = x.shape[0], x.shape[1], a.shape[0]
    s = launch_skinny_nt(x, (a.stride(0), a.stride(1)), a, R, x.new_empty(M, R), dropout_p, seed)
    y = x.new_empty(M, out_features)
    launch_gemm(x, packed, (K, 1), s, b, (b.stride(0), b.stride(1)), bias, y, scaling, 0.0, seed,
                nf4=(code, absmax, blocksize))
    return y, s


@nf4_lora_linear_fwd.register_fake
def _(x, packed, absmax, code, out_features, blocksize, a, b, bias, scaling, dropout_p, seed):
    return x.new_empty(x.shape[0], out_features), x.new_empty(x.shape[0], a.shape[0])


@torch.library.custom_op("swkernels::nf4_lora_linear_bwd", mutates_args=())
def nf4_lora_linear_bwd(dy: torch.Tensor, x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor,
                        code: torch.Tensor, blocksize: int, a: torch.Tensor, b: torch.Tensor, s: torch.Tensor,
                        scaling: float, dropout_p: float,
                        seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    K = x.shape[1]
    t, da, db = lora_backward_low_rank(dy, x, a, b, s, scaling, dropout_p, seed)
    dx = x.new_empty(x.shape)
    # dX = G·W: Z = Wᵀ, element (k, n) of Zᵀ... is W's flat element n·K + k: strides (1, K)
    launch_gemm(dy, packed, (1, K), t, a, (a.stride(1), a.stride(0)), None, dx, scaling, dropout_p, seed,
                nf4=(code, absmax, blocksize))
    return dx, da, db


@nf4_lora_linear_bwd.register_fake
def _(dy, x, packed, absmax, code, blocksize, a, b, s, scaling, dropout_p, seed):
    dy.new_empty(x.shape[0], a.shape[0])  # T, the real kernel's transient
    return x.new_empty(x.shape), torch.empty_like(a), torch.empty_like(b)


def _setup(ctx, inputs, output):
    x, packed, absmax, code, out_features, blocksize, a, b, bias, scaling, dropout_p, seed = inputs
    ctx.save_for_backward(x, packed, absmax, code, a, b, output[1])
    ctx.blocksize, ctx.scaling, ctx.dropout_p, ctx.seed = blocksize, scaling, dropout_p, seed
    ctx.has_bias = bias is not None
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, dy, _ds):
    x, packed, absmax, code, a, b, s = ctx.saved_tensors
    dx, da, db = nf4_lora_linear_bwd(dy.contiguous(), x, packed, absmax, code, ctx.blocksize, a, b, s, ctx.scaling,
                                     ctx.dropout_p, ctx.seed)
    dbias = dy.sum(0) if ctx.has_bias else None
    return dx, None, None, None, None, None, da, db, dbias, None, None, None


nf4_lora_linear_fwd.register_autograd(_backward, setup_context=_setup)


def nf4_lora_linear(x: torch.Tensor, weight, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float,
                    bias: torch.Tensor | None = None, dropout_p: float = 0.0) -> torch.Tensor:
    """QLoRA linear: like :func:`swkernels.lora_linear` with ``weight`` a bitsandbytes NF4
    ``Params4bit`` (blocksize 64 by default; with or without double quant)."""
    packed, absmax, code, (out_features, in_features), blocksize = nf4_state(weight)
    check_lora_args(x, out_features, in_features, lora_a, lora_b, bias, scaling, dropout_p)
    dtype = compute_dtype(x)
    x2 = x.reshape(-1, in_features).to(dtype)
    bias_c = bias.to(dtype) if bias is not None else None
    if select_backend("nf4_lora_linear", x) == "torch":
        w = reference.nf4_dequantize(packed, absmax, code, (out_features, in_features), blocksize).to(dtype)
        y = reference.lora_linear(x2, w, lora_a, lora_b, scaling, bias_c, dropout_p)
    elif use_cublas(x2) or (x2.is_cuda and dtype == torch.float32):
        # T4-class GPUs, or fp32 compute: bitsandbytes' dequantise + cuBLAS, as QLoRA does
        import bitsandbytes.functional as bnbf

        w = bnbf.dequantize_4bit(weight.data, weight.quant_state).to(dtype)
        y = cublas_lora_linear(x2, w, lora_a, lora_b, scaling, bias_c, dropout_p)
    else:
        seed = new_seed(dropout_p)
        y, _ = nf4_lora_linear_fwd(x2.contiguous(), packed, absmax, code, out_features, blocksize, lora_a, lora_b,
                                   bias_c, float(scaling), float(dropout_p), seed)
    return y.reshape(*x.shape[:-1], out_features)


register(*_specs("nf4_lora_linear", "*u8", nf4=True), *_skinny_specs("nf4_lora_linear"))
