"""RMSNorm over the last dim, fused forward and backward, cast exactly as transformers casts it.

Maths, per row x ∈ ℝⁿ (fp32), with w_eff = w (llama style) or 1 + w (gemma style):
    r  = (mean(x²) + ε)^(−1/2),   x̂ = x · r,   y = w_eff ⊙ x̂
Casting (transformers 5): llama style rounds x̂ to the input dtype *before* the multiply,
``y = w * x̂.to(x.dtype)`` with y in promote_types(w, x); gemma style keeps everything in fp32 and
rounds once, ``y = (x̂ * (1 + w.float())).to(x.dtype)``. The kernel reproduces both roundings.

Backward, with upstream dy and g = dy ⊙ w_eff (the rounding of x̂ has derivative 1, as in autograd):
    ∂r/∂x_j   = −½ (mean(x²) + ε)^(−3/2) · 2x_j / n = −r³ x_j / n
    ∂x̂_i/∂x_j = r δ_ij + x_i ∂r/∂x_j = r δ_ij − r³ x_i x_j / n
    dx_j      = Σ_i g_i ∂x̂_i/∂x_j = r g_j − (r³ x_j / n) Σ_i g_i x_i
              = r · (g_j − x̂_j · mean(g ⊙ x̂))
    dw_i      = Σ_rows dy_i · x̂_i          (x̂ rounded to x's dtype for llama style)
The forward saves x (the input, which autograd keeps anyway) and r (one fp32 per row), never x̂:
the backward recomputes x̂ = x · r bitwise as the forward formed it. dw is computed only when the
weight requires grad (a trainable norm); for a frozen weight (LoRA) the kernel writes nothing for
it and None is returned. When it is needed, the kernel writes the per-row products dy ⊙ x̂ (fp32)
and torch sums them over rows.

One program per row, BLOCK a power of two from a short list: a row that fits is read once and
kept in registers; a longer row (hidden > the largest BLOCK) is walked in BLOCK chunks twice
(sum of squares, then normalise; for the backward: Σ g ⊙ x̂, then dx), the second pass reading
from L2. Both styles share one compiled kernel: the weight offset (0 or 1) and the rounding of x̂
(none, fp16 or bf16) are runtime arguments. A weight whose dtype differs from x (e.g. an fp32
weight with bf16 activations) runs the fp32 kernel on upcast copies, rounding x̂ to x's dtype, so
the kernel always sees a single dtype (the one the health registry compiles).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from swkernels import reference
from swkernels._backend import select_backend
from swkernels.registry import KernelSpec, register

# BLOCK → num_warps: q/k-norm head dims (64…256), hidden sizes ≤ 1024, and ≤ 4096; longer rows
# (5120, 8192, 16384, ...) loop over 4096-wide chunks. At most 16 fp32 elements of a tensor per
# thread: ≤ 120 registers, no spills on sm_75…90. Two warps (not one) for the short rows, which
# launch one small program per (token, head): the per-SM limit on resident programs binds first.
BLOCK_WARPS = {256: 2, 1024: 4, 4096: 8}
BLOCK_CHOICES = tuple(BLOCK_WARPS)
_ROUND = {torch.float16: 1, torch.bfloat16: 2}  # round_mode codes; 0 = no rounding


@triton.jit
def _round(v, round_mode):
    """v rounded to fp16 (round_mode 1) or bf16 (2) and back to fp32; 0 leaves it. The bf16
    rounding is to nearest even by integer arithmetic on the fp32 bits (what cvt.rn.bf16.f32 does
    on the GPU), so the CPU interpreter, whose fp32 → bf16 cast truncates, rounds the same way."""
    if round_mode == 1:
        v = v.to(tl.float16).to(tl.float32)
    elif round_mode == 2:
        bits = v.to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        v = tl.where(v != v, v, bits.to(tl.float32, bitcast=True))  # NaN stays NaN
    return v


@triton.jit
def _rms_norm_fwd_kernel(
    x_ptr, w_ptr, y_ptr, rstd_ptr,  # x (rows, n) unit column stride; w (n,); y (rows, n) contiguous; rstd (rows,) fp32
    n, sx,  # row length, x's row stride (not constexpr: no recompiles per shape)
    eps, offset, round_mode,  # ε; weight offset (0.0 llama, 1.0 gemma); x̂ rounding (0 none, 1 fp16, 2 bf16)
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * sx
    y_row = y_ptr + row * n
    cols = tl.arange(0, BLOCK)
    if n <= BLOCK:  # the whole row in registers: x read once
        mask = cols < n
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        r = tl.math.rsqrt(tl.sum(x * x, axis=0) / n + eps)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32) + offset
        y = _round(x * r, round_mode) * w
        tl.store(y_row + cols, y.to(y_ptr.dtype.element_ty), mask=mask)
    else:  # a long row: sum of squares, then normalise (x re-read)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, n, BLOCK):
            c = start + cols
            x = tl.load(x_row + c, mask=c < n, other=0.0).to(tl.float32)
            acc += x * x
        r = tl.math.rsqrt(tl.sum(acc, axis=0) / n + eps)
        for start in range(0, n, BLOCK):
            c = start + cols
            mask = c < n
            x = tl.load(x_row + c, mask=mask, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + c, mask=mask, other=0.0).to(tl.float32) + offset
            y = _round(x * r, round_mode) * w
            tl.store(y_row + c, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + row, r)


@triton.jit
def _rms_norm_bwd_kernel(
    dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dwp_ptr,  # dy, x (rows, n) unit column stride; w (n,); rstd (rows,)
    # fp32; dx (rows, n) contiguous; dwp (rows, n) fp32 per-row dy ⊙ x̂, written only when has_dw
    n, sdy, sx,  # row length, row strides
    offset, round_mode, has_dw,  # as the forward; has_dw: 1 when the weight needs a gradient
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    dy_row = dy_ptr + row * sdy
    x_row = x_ptr + row * sx
    dx_row = dx_ptr + row * n
    dwp_row = dwp_ptr + row * n
    r = tl.load(rstd_ptr + row)
    cols = tl.arange(0, BLOCK)
    if n <= BLOCK:  # the whole row in registers: dy and x read once
        mask = cols < n
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_row + cols, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32) + offset
        xh = x * r
        g = dy * w
        c = tl.sum(g * xh, axis=0) / n
        tl.store(dx_row + cols, (r * (g - xh * c)).to(dx_ptr.dtype.element_ty), mask=mask)
        if has_dw:
            tl.store(dwp_row + cols, dy * _round(xh, round_mode), mask=mask)
    else:  # a long row: Σ g ⊙ x̂ (and the dw products), then dx (dy and x re-read)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, n, BLOCK):
            cc = start + cols
            mask = cc < n
            x = tl.load(x_row + cc, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_row + cc, mask=mask, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + cc, mask=mask, other=0.0).to(tl.float32) + offset
            xh = x * r
            acc += dy * w * xh
            if has_dw:
                tl.store(dwp_row + cc, dy * _round(xh, round_mode), mask=mask)
        c = tl.sum(acc, axis=0) / n
        for start in range(0, n, BLOCK):
            cc = start + cols
            mask = cc < n
            x = tl.load(x_row + cc, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_row + cc, mask=mask, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + cc, mask=mask, other=0.0).to(tl.float32) + offset
            xh = x * r
            tl.store(dx_row + cc, (r * (dy * w - xh * c)).to(dx_ptr.dtype.element_ty), mask=mask)


_FWD_SIG = {"x_ptr": "*{dtype}", "w_ptr": "*{dtype}", "y_ptr": "*{dtype}", "rstd_ptr": "*fp32", "n": "i32",
            "sx": "i32", "eps": "fp32", "offset": "fp32", "round_mode": "i32", "BLOCK": "constexpr"}
_BWD_SIG = {"dy_ptr": "*{dtype}", "x_ptr": "*{dtype}", "w_ptr": "*{dtype}", "rstd_ptr": "*fp32", "dx_ptr": "*{dtype}",
            "dwp_ptr": "*fp32", "n": "i32", "sdy": "i32", "sx": "i32", "offset": "fp32", "round_mode": "i32",
            "has_dw": "i32", "BLOCK": "constexpr"}
register(*(KernelSpec("rms_norm", kernel, sig, {"BLOCK": block}, num_warps=warps)
           for block, warps in BLOCK_WARPS.items()
           for kernel, sig in ((_rms_norm_fwd_kernel, _FWD_SIG), (_rms_norm_bwd_kernel, _BWD_SIG))))


def block_for(n: int) -> int:
    """The BLOCK a row of n elements launches with (the largest one loops over longer rows)."""
    return next((b for b in BLOCK_CHOICES if n <= b), BLOCK_CHOICES[-1])


def _check(x: torch.Tensor, weight: torch.Tensor) -> None:
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"rms_norm: x must have a non-empty last dim, got shape {tuple(x.shape)}")
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"rms_norm: weight must be ({x.shape[-1]},) (x's last dim), got {tuple(weight.shape)}")
    if not (x.dtype.is_floating_point and weight.dtype.is_floating_point):
        raise ValueError(f"rms_norm: x and weight must be floating point, got {x.dtype}/{weight.dtype}")
    if x.device != weight.device:
        raise ValueError(f"rms_norm: x and weight must share a device, got {x.device}/{weight.device}")


def _kernel_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The one dtype the kernel sees: x's when the weight matches it, else fp32 (upcast copies)."""
    return x.dtype if weight.dtype == x.dtype else torch.float32


def _out_dtype(x: torch.Tensor, weight: torch.Tensor, gemma: bool) -> torch.dtype:
    return x.dtype if gemma else torch.promote_types(weight.dtype, x.dtype)


def _rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """t as (rows, n) with unit column stride: a view when the layout allows, else a copy."""
    t2 = t.reshape(-1, n)
    return t2 if t2.stride(1) == 1 else t2.contiguous()


def _launch(kernel, rows: int, n: int, *args) -> None:
    block = block_for(n)
    kernel[(rows,)](*args, BLOCK=block, num_warps=BLOCK_WARPS[block])


@torch.library.custom_op("swkernels::rms_norm", mutates_args=())
def _rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float, gemma: bool) -> tuple[torch.Tensor, torch.Tensor]:
    n, kdt = x.shape[-1], _kernel_dtype(x, weight)
    x2, w = _rows(x.to(kdt), n), weight.to(kdt).contiguous()
    rows = x2.shape[0]
    y = torch.empty((rows, n), dtype=kdt, device=x.device)
    rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
    if rows:
        _launch(_rms_norm_fwd_kernel, rows, n, x2, w, y, rstd, n, x2.stride(0), float(eps),
                1.0 if gemma else 0.0, 0 if gemma else _ROUND.get(x.dtype, 0))
    return y.view(x.shape).to(_out_dtype(x, weight, gemma)), rstd


@_rms_norm_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, eps: float, gemma: bool) -> tuple[torch.Tensor, torch.Tensor]:
    rows = math.prod(x.shape[:-1])
    return x.new_empty(x.shape, dtype=_out_dtype(x, weight, gemma)), x.new_empty(rows, dtype=torch.float32)


@torch.library.custom_op("swkernels::rms_norm_backward", mutates_args=())
def _rms_norm_bwd_op(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, gemma: bool,
                     weight_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dw); dw is an empty (0,) tensor, never computed, unless ``weight_grad``."""
    n, kdt = x.shape[-1], _kernel_dtype(x, weight)
    dy2, x2, w = _rows(grad.to(kdt), n), _rows(x.to(kdt), n), weight.to(kdt).contiguous()
    rows = x2.shape[0]
    dx = torch.empty((rows, n), dtype=kdt, device=x.device)
    dwp = torch.empty((rows, n), dtype=torch.float32, device=x.device) if weight_grad else rstd  # rstd: never written
    if rows:
        _launch(_rms_norm_bwd_kernel, rows, n, dy2, x2, w, rstd, dx, dwp, n, dy2.stride(0), x2.stride(0),
                1.0 if gemma else 0.0, 0 if gemma else _ROUND.get(x.dtype, 0), int(weight_grad))
    dw = dwp.sum(0).to(weight.dtype) if weight_grad else weight.new_empty(0)
    return dx.view(x.shape).to(x.dtype), dw


@_rms_norm_bwd_op.register_fake
def _(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, gemma: bool,
      weight_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if weight_grad:  # the per-row products, summed by torch
        x.new_empty((math.prod(x.shape[:-1]), x.shape[-1]), dtype=torch.float32)
    return x.new_empty(x.shape), weight.new_empty(weight.shape if weight_grad else (0,))


def _setup_context(ctx, inputs, output) -> None:
    x, weight, eps, gemma = inputs
    ctx.save_for_backward(x, weight, output[1])  # x and rstd; never x̂
    ctx.gemma = gemma
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad: torch.Tensor, _grad_rstd):
    x, weight, rstd = ctx.saved_tensors
    weight_grad = ctx.needs_input_grad[1]
    dx, dw = _rms_norm_bwd_op(grad, x, weight, rstd, ctx.gemma, weight_grad)
    return dx if ctx.needs_input_grad[0] else None, dw if weight_grad else None, None, None


_rms_norm_op.register_autograd(_backward, setup_context=_setup_context)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, gemma: bool = False) -> torch.Tensor:
    """RMSNorm over the last dim of ``x`` (any leading dims) with a fused Triton forward and backward.

    ``gemma=False``: ``weight * x̂.to(x.dtype)`` (Llama, Qwen2/3, Mistral, Phi-3), dtype
    promote_types(weight, x); ``gemma=True``: ``(x̂ * (1 + weight.float())).to(x.dtype)`` (Gemma 1/2/3).
    The weight gets a gradient only when it requires one.
    """
    _check(x, weight)
    if select_backend("rms_norm", x) == "torch":
        return reference.rms_norm(x, weight, eps, gemma)
    return _rms_norm_op(x, weight, float(eps), bool(gemma))[0]
