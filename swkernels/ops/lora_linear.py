"""Fused LoRA linear: y = x·Wᵀ + s·(drop(x)·Aᵀ)·Bᵀ (+ bias), W frozen.

Shapes: x (M, K) (leading dims flattened), W (N, K), A (r, K), B (N, r), s = alpha/r (or
alpha/√r for rsLoRA). Kernels in :mod:`swkernels.ops._lora_kernels`.

Forward (two launches): S = s·drop(x)·Aᵀ (M×r, computed once, saved for backward; the scaling
is applied to this small tensor, once); then the base GEMM whose epilogue adds S·Bᵀ and the
bias, so the full-size output is written once and never read back. Computing S inside every
N-tile instead would redo r·K work per tile; precomputing it costs one M×r write and read.

Backward, with upstream gradient G = ∂L/∂y (M×N). Write D = drop(x) = x ⊙ m/(1−p), m the
keep-mask. Then y = x·Wᵀ + s·D·Aᵀ·Bᵀ and, elementwise, ∂y[i,n]/∂A[r,k] = s·B[n,r]·D[i,k], so
    ∂L/∂B = s·Gᵀ·(D·Aᵀ) = Gᵀ·S                       (N×r)
    ∂L/∂A = s·(G·B)ᵀ·D = Tᵀ·D,   T := s·G·B          (r×K)
    ∂L/∂x = G·W + s·(G·B·A) ⊙ m/(1−p) = G·W + (T·A) ⊙ m/(1−p)     (M×K; D depends on x through
                                                     x ⊙ m/(1−p), hence the mask on the term)
    ∂L/∂bias = Σ_rows G;  W is frozen: no ∂L/∂W.
Four launches: T = s·G·B (skinny), dX = G·W with the low-rank term T·A (and the regenerated
dropout mask) in the epilogue, and dA, dB (two skinny reductions over M). The mask is never
stored: Philox regenerates it from (seed, element index).
"""

from __future__ import annotations

import itertools

import torch
import triton

from swkernels import reference
from swkernels._backend import interpreting, select_backend
from swkernels.ops._lora_kernels import _dropout_mask_kernel, _gemm_lora, _skinny_nt, _skinny_tn
from swkernels.ops._nf4 import NF4Weight
from swkernels.registry import KernelSpec, register

# (BM, BN, BK, warps, stages), checked spill-free and within ~99 KB of shared memory on sm_80+
# by the health check. Triton lowers tl.dot to FMA (no tensor cores) below sm_80, so T4-class
# GPUs take the cuBLAS path (see use_cublas) and no GEMM config is registered for sm_75.
# 128-row tiles spill on sm_86 once the epilogue tiles are live; 8 warps keep 64-row ones clean.
GEMM_CONFIGS = [(64, 128, 32, 8, 3), (64, 64, 32, 8, 3)]
# NF4: every gathered operand of the dequantisation (bytes, scales, and for double quant the
# 8-bit scales and their second-level scales) is pipelined through shared memory, so the wide
# tile takes two stages (three need 108 KB with double quant, over sm_86/89's 99 KB)
NF4_GEMM_CONFIGS = [(64, 128, 32, 8, 2), (64, 64, 32, 8, 3)]
FP32_GEMM_CONFIGS = [(32, 64, 32, 8, 2)]  # fp32 tiles are twice the bytes (dense weights only)
# the GEMM epilogue's rank tile: ranks loop in chunks of 32 (the low-rank term is ~r/K of the work)
GEMM_BR = 32
INTERPRETER_GEMM = (32, 32, 32, 4, 1)
SKINNY_BM, SKINNY_BK, SKINNY_WARPS = 32, 32, 8  # one BM×BR output tile per program; spill-free sm_75..90
MIN_TRITON_GEMM_ARCH = 80
GROUP_M = 8


def block_r(r: int) -> int:
    """The skinny kernels' rank tile: a power of two in [32, 64] (larger ranks take more programs).
    64 lets r = 64 read x once; 16 would do for tl.dot but gains nothing."""
    return max(32, min(64, triton.next_power_of_2(r)))


def _fp32_dot(t: torch.Tensor) -> bool:
    return t.dtype == torch.float32 or (interpreting() and not t.is_cuda)


def _gemm_config(x: torch.Tensor) -> tuple[int, int, int, int, int]:
    if interpreting() and not x.is_cuda:
        return INTERPRETER_GEMM
    return None  # autotuned


def _gemm_configs(fp32: bool, nf4: bool) -> list[tuple[int, int, int, int, int]]:
    return FP32_GEMM_CONFIGS if fp32 else (NF4_GEMM_CONFIGS if nf4 else GEMM_CONFIGS)


def _autotuned_gemm(fp32: bool, nf4: bool):
    """The autotuned GEMM, one tuner per config list. The key buckets M; tensor dtypes (nested
    NF4 or not) join the key by themselves, the epilogue flags are named."""
    if (fp32, nf4) not in _AUTOTUNED:
        _AUTOTUNED[fp32, nf4] = triton.autotune(
            configs=[triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": GROUP_M}, num_warps=w, num_stages=s)
                     for bm, bn, bk, w, s in _gemm_configs(fp32, nf4)],
            key=["M_BUCKET", "N", "K", "R", "HAS_BIAS", "DROPOUT"],
        )(_gemm_lora)
    return _AUTOTUNED[fp32, nf4]


_AUTOTUNED: dict = {}


def launch_gemm(x, z, z_strides, l, q, q_strides, bias, out, dropout_p: float, seed: int,
                nf4: NF4Weight | None = None) -> torch.Tensor:
    """out (M×N) = x·Zᵀ + (L·Qᵀ)[⊙ dropout] + bias. Z is (N×K) through ``z_strides`` (element
    strides; for NF4, ``z`` is the packed bytes and the strides index W's flattened elements);
    Q is (N×R) through ``q_strides``."""
    M, K = x.shape
    N, R = out.shape[1], l.shape[1]
    args = (x, z, l, q, bias if bias is not None else x, out, *_nf4_args(x, nf4),
            M, N, K, R, triton.next_power_of_2(M),
            x.stride(0), x.stride(1), z_strides[0], z_strides[1], l.stride(0), l.stride(1),
            q_strides[0], q_strides[1], out.stride(0), out.stride(1),
            float(dropout_p), int(seed))
    meta = dict(HAS_BIAS=bias is not None, Z_NF4=nf4 is not None, DROPOUT=dropout_p > 0, FP32_DOT=_fp32_dot(x),
                NF4_BLOCKSIZE=nf4.blocksize if nf4 is not None else 64,
                NF4_NESTED=nf4 is not None and nf4.nested,
                NF4_NESTED_BLOCKSIZE=nf4.nested_blocksize if nf4 is not None else 256, BR=GEMM_BR)
    cfg = _gemm_config(x)
    if cfg is not None:
        bm, bn, bk, w, s = cfg
        grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
        _gemm_lora[grid](*args, **meta, BM=bm, BN=bn, BK=bk, GROUP_M=GROUP_M, num_warps=w, num_stages=s)
    else:
        def grid(m):
            return (triton.cdiv(M, m["BM"]) * triton.cdiv(N, m["BN"]),)

        _autotuned_gemm(_fp32_dot(x), nf4 is not None)[grid](*args, **meta)
    return out


def _nf4_args(x: torch.Tensor, nf4: NF4Weight | None) -> tuple[torch.Tensor, ...]:
    """The kernel's (code, absmax, absmax2, code2, offset) pointers; tensors that a variant never
    reads are filled with a placeholder of a fixed dtype (the registry compiles the same types)."""
    if nf4 is None:
        return (x,) * 5
    if nf4.nested:
        return nf4.code, nf4.absmax, nf4.absmax2, nf4.code2, nf4.offset
    return nf4.code, nf4.absmax, nf4.absmax, nf4.absmax, nf4.absmax


def launch_skinny_nt(x, y_strides, y, R: int, out, scaling: float, dropout_p: float = 0.0,
                     seed: int = 0) -> torch.Tensor:
    """out (M×R) = s · drop(x) (M×K) · Y (R×K)ᵀ, Y read through ``y_strides`` = (stride_r, stride_k)."""
    M, K = x.shape
    br = block_r(R)
    grid = (triton.cdiv(M, SKINNY_BM), triton.cdiv(R, br))
    _skinny_nt[grid](x, y, out, M, K, R, x.stride(0), x.stride(1), y_strides[0], y_strides[1],
                     out.stride(0), out.stride(1), float(scaling), float(dropout_p), int(seed),
                     DROPOUT=dropout_p > 0, FP32_DOT=_fp32_dot(x), BM=SKINNY_BM, BK=SKINNY_BK, BR=br,
                     num_warps=SKINNY_WARPS)
    return out


def launch_skinny_tn(x, l, out, out_strides, dropout_p: float = 0.0, seed: int = 0) -> torch.Tensor:
    """out (N×R, through ``out_strides``) = drop(x)ᵀ (N×M) · L (M×R)."""
    M, N = x.shape
    R = l.shape[1]
    br = block_r(R)
    grid = (triton.cdiv(N, SKINNY_BK), triton.cdiv(R, br))
    _skinny_tn[grid](x, l, out, M, N, R, x.stride(0), x.stride(1), l.stride(0), l.stride(1),
                     out_strides[0], out_strides[1], float(dropout_p), int(seed),
                     DROPOUT=dropout_p > 0, FP32_DOT=_fp32_dot(x), BN=SKINNY_BK, BM=SKINNY_BM, BR=br,
                     num_warps=SKINNY_WARPS)
    return out


def lora_backward_low_rank(dy, x, a, b, s, scaling, dropout_p, seed):
    """T = s·G·B, dA = Tᵀ·drop(x) (r×K, written transposed), dB = Gᵀ·S (S already holds s).
    Returns (T, dA, dB)."""
    M = x.shape[0]
    R = a.shape[0]
    t = launch_skinny_nt(dy, (b.stride(1), b.stride(0)), b, R, dy.new_empty(M, R), scaling)
    da = torch.empty_like(a)
    launch_skinny_tn(x, t, da, (da.stride(1), da.stride(0)), dropout_p, seed)
    db = torch.empty_like(b)
    launch_skinny_tn(dy, s, db, (db.stride(0), db.stride(1)))
    return t, da, db


# ---------------------------------------------------------------- custom ops

@torch.library.custom_op("swkernels::lora_linear_fwd", mutates_args=())
def lora_linear_fwd(x: torch.Tensor, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None,
                    scaling: float, dropout_p: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    M, N, R = x.shape[0], w.shape[0], a.shape[0]
    s = launch_skinny_nt(x, (a.stride(0), a.stride(1)), a, R, x.new_empty(M, R), scaling, dropout_p, seed)
    y = x.new_empty(M, N)
    launch_gemm(x, w, (w.stride(0), w.stride(1)), s, b, (b.stride(0), b.stride(1)), bias, y, 0.0, seed)
    return y, s


@lora_linear_fwd.register_fake
def _(x, w, a, b, bias, scaling, dropout_p, seed):
    return x.new_empty(x.shape[0], w.shape[0]), x.new_empty(x.shape[0], a.shape[0])


@torch.library.custom_op("swkernels::lora_linear_bwd", mutates_args=())
def lora_linear_bwd(dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                    s: torch.Tensor, scaling: float, dropout_p: float,
                    seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    t, da, db = lora_backward_low_rank(dy, x, a, b, s, scaling, dropout_p, seed)
    dx = x.new_empty(x.shape)
    # dX = G·W: Z = Wᵀ (K×N) read through W's strides swapped; Q = Aᵀ (K×r)
    launch_gemm(dy, w, (w.stride(1), w.stride(0)), t, a, (a.stride(1), a.stride(0)), None, dx, dropout_p, seed)
    return dx, da, db


@lora_linear_bwd.register_fake
def _(dy, x, w, a, b, s, scaling, dropout_p, seed):
    dy.new_empty(x.shape[0], a.shape[0])  # T, the real kernel's transient
    return x.new_empty(x.shape), torch.empty_like(a), torch.empty_like(b)


def _setup(ctx, inputs, output):
    x, w, a, b, bias, scaling, dropout_p, seed = inputs
    ctx.save_for_backward(x, w, a, b, output[1])
    ctx.scaling, ctx.dropout_p, ctx.seed = scaling, dropout_p, seed
    ctx.has_bias = bias is not None
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, dy, _ds):
    x, w, a, b, s = ctx.saved_tensors
    dx, da, db = lora_linear_bwd(dy.contiguous(), x, w, a, b, s, ctx.scaling, ctx.dropout_p, ctx.seed)
    dbias = dy.sum(0) if ctx.has_bias else None
    return dx, None, da, db, dbias, None, None, None


lora_linear_fwd.register_autograd(_backward, setup_context=_setup)


# ---------------------------------------------------------------- public API

def check_lora_args(x, out_features, in_features, a, b, bias, scaling, dropout_p) -> None:
    if x.shape[-1] != in_features:
        raise ValueError(f"lora_linear: x has {x.shape[-1]} features but the weight expects {in_features}")
    if a.dim() != 2 or a.shape[1] != in_features:
        raise ValueError(f"lora_linear: A must be (r, {in_features}) (PEFT's lora_A layout), got {tuple(a.shape)}")
    if b.dim() != 2 or b.shape != (out_features, a.shape[0]):
        raise ValueError(f"lora_linear: B must be ({out_features}, {a.shape[0]}) (PEFT's lora_B layout), got {tuple(b.shape)}")
    if bias is not None and bias.shape != (out_features,):
        raise ValueError(f"lora_linear: bias must be ({out_features},), got {tuple(bias.shape)}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"lora_linear: dropout must be in [0, 1), got {dropout_p}")
    if not a.dtype.is_floating_point or not b.dtype.is_floating_point:
        raise ValueError("lora_linear: A and B must be floating point")


def use_cublas(x: torch.Tensor) -> bool:
    """Below sm_80 Triton's tl.dot runs on FMA units, not tensor cores: cuBLAS is faster there."""
    return x.is_cuda and torch.cuda.get_device_capability(x.device)[0] * 10 < MIN_TRITON_GEMM_ARCH


def cublas_lora_linear(x2, w, a, b, scaling, bias, dropout_p):
    """The unfused path in the compute dtype (as PEFT runs it): for GPUs without Triton tensor cores."""
    d = torch.nn.functional.dropout(x2, dropout_p, training=dropout_p > 0)
    low = torch.nn.functional.linear(torch.nn.functional.linear(d, a.to(x2.dtype)), b.to(x2.dtype))
    return torch.addmm(bias, x2, w.t()) + scaling * low if bias is not None else x2 @ w.t() + scaling * low


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The autocast dtype when autocast is on for x's device, else x's dtype."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def new_seed(dropout_p: float) -> int:
    """A Philox seed from torch's RNG (so torch.manual_seed makes dropout reproducible)."""
    return int(torch.randint(0, 2**31 - 1, ()).item()) if dropout_p > 0 else 0


def dropout_keep_scale(rows: int, cols: int, dropout_p: float, seed: int, device) -> torch.Tensor:
    """The (rows×cols) fp32 keep-mask ⊙ 1/(1−p) the kernels use for (seed, p): for tests and the
    torch fallback, so every backend drops exactly the same elements."""
    out = torch.empty(rows, cols, dtype=torch.float32, device=device)
    if out.numel():
        _dropout_mask_kernel[(triton.cdiv(out.numel(), 1024),)](out, out.numel(), float(dropout_p), int(seed),
                                                               BLOCK=1024)
    return out


def lora_linear(x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float,
                bias: torch.Tensor | None = None, dropout_p: float = 0.0) -> torch.Tensor:
    """``x·Wᵀ + scaling·(dropout(x)·Aᵀ)·Bᵀ (+ bias)`` with fused Triton kernels and autograd.

    A (r, in) and B (out, r) use PEFT's layout and may be fp32 (the usual trainable copies) while
    x and W are bf16/fp16: the kernels read them in the compute dtype and return dA/dB in their
    own dtype. W is frozen (no gradient). Leading dimensions of x are preserved."""
    out_features, in_features = weight.shape
    check_lora_args(x, out_features, in_features, lora_a, lora_b, bias, scaling, dropout_p)
    dtype = compute_dtype(x)
    x2 = x.reshape(-1, in_features).to(dtype)
    w = weight.to(dtype)
    bias_c = bias.to(dtype) if bias is not None else None
    if select_backend("lora_linear", x) == "torch":
        y = reference.lora_linear(x2, w, lora_a, lora_b, scaling, bias_c, dropout_p)
    elif use_cublas(x2):
        y = cublas_lora_linear(x2, w, lora_a, lora_b, scaling, bias_c, dropout_p)
    else:
        seed = new_seed(dropout_p)
        y, _ = lora_linear_fwd(x2.contiguous(), w, lora_a, lora_b, bias_c, float(scaling), float(dropout_p), seed)
    return y.reshape(*x.shape[:-1], out_features)


# ---------------------------------------------------------------- health-check registry

# Every kernel variant the launchers above can start, for the health check. The constexpr flags
# that change the code: the GEMM runs as forward (bias or not, never dropout: the mask applies to
# S) and as dX (no bias, dropout or not); the skinny kernels with and without dropout. Adapters
# (A, B) are read as fp32, LoRALinear's dtype.
GEMM_LAUNCHES = [dict(HAS_BIAS=True, DROPOUT=False), dict(HAS_BIAS=False, DROPOUT=False),
                 dict(HAS_BIAS=False, DROPOUT=True)]
NF4_VARIANTS = [dict(NF4_NESTED=False), dict(NF4_NESTED=True)]
_GEMM_INTS = ("M", "N", "K", "R", "M_BUCKET", "stride_xm", "stride_xk", "stride_zn", "stride_zk", "stride_lm",
              "stride_lr", "stride_qn", "stride_qr", "stride_cm", "stride_cn")
_GEMM_CONSTEXPRS = ("HAS_BIAS", "Z_NF4", "DROPOUT", "FP32_DOT", "NF4_BLOCKSIZE", "NF4_NESTED",
                    "NF4_NESTED_BLOCKSIZE", "BM", "BN", "BK", "BR", "GROUP_M")


def _gemm_signature(z_type: str, nf4_types: tuple[str, str, str, str, str]) -> dict[str, str]:
    """_gemm_lora's argument types; nf4_types are (code, absmax, absmax2, code2, offset) as
    :func:`_nf4_args` passes them."""
    names = ("code_ptr", "absmax_ptr", "absmax2_ptr", "code2_ptr", "offset_ptr")
    return {"x_ptr": "*{dtype}", "z_ptr": z_type, "l_ptr": "*{dtype}", "q_ptr": "*fp32", "bias_ptr": "*{dtype}",
            "c_ptr": "*{dtype}", **dict(zip(names, nf4_types, strict=True)), **{k: "i32" for k in _GEMM_INTS},
            "dropout_p": "fp32", "seed": "i32", **{k: "constexpr" for k in _GEMM_CONSTEXPRS}}


def _gemm_specs(op: str, signature: dict[str, str], configs, dtypes, fp32: bool, **flags) -> list[KernelSpec]:
    """One spec per (tile config, launch variant)."""
    specs = []
    for (bm, bn, bk, w, s), launch in itertools.product(configs, GEMM_LAUNCHES):
        constexprs = {"NF4_BLOCKSIZE": 64, "NF4_NESTED": False, "NF4_NESTED_BLOCKSIZE": 256, **flags, **launch,
                      "FP32_DOT": fp32, "BM": bm, "BN": bn, "BK": bk, "BR": GEMM_BR, "GROUP_M": GROUP_M}
        specs.append(KernelSpec(op, _gemm_lora, signature, constexprs, num_warps=w, num_stages=s, dtypes=dtypes,
                                min_arch=MIN_TRITON_GEMM_ARCH))
    return specs


def _dense_specs(op: str) -> list[KernelSpec]:
    sig = _gemm_signature("*{dtype}", ("*{dtype}",) * 5)
    return (_gemm_specs(op, sig, GEMM_CONFIGS, ("fp16", "bf16"), False, Z_NF4=False)
            + _gemm_specs(op, sig, FP32_GEMM_CONFIGS, ("fp32",), True, Z_NF4=False))


def _nf4_specs(op: str) -> list[KernelSpec]:
    """NF4 (blocksize 64, bitsandbytes' default) runs in fp16/bf16 only: fp32 takes cuBLAS."""
    plain = _gemm_signature("*u8", ("*fp32",) * 5)
    nested = _gemm_signature("*u8", ("*fp32", "*u8", "*fp32", "*fp32", "*fp32"))
    return (_gemm_specs(op, plain, NF4_GEMM_CONFIGS, ("fp16", "bf16"), False, Z_NF4=True, NF4_NESTED=False)
            + _gemm_specs(op, nested, NF4_GEMM_CONFIGS, ("fp16", "bf16"), False, Z_NF4=True, NF4_NESTED=True))


def _skinny_specs(op: str) -> list[KernelSpec]:
    ints = ("M", "K", "R", "stride_xm", "stride_xk", "stride_yr", "stride_yk", "stride_cm", "stride_cr")
    nt_sig = {"x_ptr": "*{dtype}", "y_ptr": "*fp32", "c_ptr": "*{dtype}", **{k: "i32" for k in ints},
              "scaling": "fp32", "dropout_p": "fp32", "seed": "i32", **{k: "constexpr" for k in ("DROPOUT", "FP32_DOT", "BM", "BK", "BR")}}
    ints = ("M", "N", "R", "stride_xm", "stride_xn", "stride_lm", "stride_lr", "stride_cn", "stride_cr")
    tn_sig = {"x_ptr": "*{dtype}", "l_ptr": "*{dtype}", "c_ptr": "*fp32", **{k: "i32" for k in ints},
              "dropout_p": "fp32", "seed": "i32",
              **{k: "constexpr" for k in ("DROPOUT", "FP32_DOT", "BN", "BM", "BR")}}
    specs = []
    groups = ((("fp16", "bf16"), False), (("fp32",), True))
    for (dtypes, fp32), br, dropout in itertools.product(groups, (32, 64), (False, True)):
        specs.append(KernelSpec(op, _skinny_nt, nt_sig, dict(DROPOUT=dropout, FP32_DOT=fp32, BM=SKINNY_BM,
                                                              BK=SKINNY_BK, BR=br), num_warps=SKINNY_WARPS,
                                dtypes=dtypes))
        specs.append(KernelSpec(op, _skinny_tn, tn_sig, dict(DROPOUT=dropout, FP32_DOT=fp32, BN=SKINNY_BK,
                                                              BM=SKINNY_BM, BR=br), num_warps=SKINNY_WARPS,
                                dtypes=dtypes))
    return specs


register(*_dense_specs("lora_linear"), *_skinny_specs("lora_linear"))
