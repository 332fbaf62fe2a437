"""Rotary position embedding for Q and K in one launch, cos/sin computed in-kernel.

For a pair (x1, x2) = (x[i], x[i + d/2]) of the rotary dims (HF's rotate_half layout) at
position p, with angle a = p·inv_freq[i] (fp32) and attention factor f:
    out1 = f·(x1·cos a − x2·sin a),  out2 = f·(x2·cos a + x1·sin a)
i.e. a rotation by a, scaled by f. Its Jacobian is f·R(a), so the gradient is
    dx = f·R(a)ᵀ·dout = f·R(−a)·dout
— the same kernel with sin negated (``conjugate``). No (seq × dim) cos/sin table is ever
allocated: one program per token computes that token's angles once (fp32, accurate libdevice
sin/cos, so positions of 100K+ are fine) and rotates every Q head and then every K head of the
token, a tile of heads at a time (GQA is just a different head count: any Hq and Hkv, each head
rotated on its own, so they need not divide each other). Dims past the rotary dim
(partial rotary) are copied through. Packed sequences need nothing special: positions come from
position_ids, which may restart per document.

Autograd story: ``apply_rope`` is a functional custom op (fresh outputs with the inputs' layout;
its backward is the conjugate launch), which is what training needs — q and k are saved by
nobody, and in-place mutation of autograd inputs would invalidate other saved views.
``apply_rope_`` launches the very same kernel with outputs = inputs (each program loads a tile
before storing it, and tiles never overlap), for inference and KV-cache writes, without autograd.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from swkernels import reference
from swkernels._backend import select_backend
from swkernels.registry import KernelSpec, register

# Heads are rotated in tiles of BLOCK_H × BLOCK_R pairs, two tiles per loop step (both loaded
# before either is stored, so 4 KB of bf16 is in flight per program). TILE pairs per tile over
# 4 warps is 4 per thread and keeps registers ≤ 72 on sm_75…90 (more per thread and the per-column sin/cos
# crowd out the data). BLOCK_H follows from BLOCK_R, so the only compile-time choice is BLOCK_R
# (the rotary half-dim rounded up to a power of two) and every launchable config is registered.
TILE = 512
NUM_WARPS = 4
BLOCK_R_CHOICES = (16, 32, 64, 128)  # rotary dims up to 256


def block_r(half: int) -> int:
    """The BLOCK_R a rotary half-dim launches with (at least 16: tiny rotary dims are masked)."""
    return max(16, triton.next_power_of_2(half))


@triton.jit
def _load_halves(x_tok, h, sxh, r, half, mask):
    x_row = x_tok + h * sxh
    x1 = tl.load(x_row + r, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_row + half + r, mask=mask, other=0.0).to(tl.float32)
    return x1, x2


@triton.jit
def _store_rotated(o_tok, h, soh, r, half, mask, x1, x2, cos, sin):
    o_row = o_tok + h * soh
    tl.store(o_row + r, (x1 * cos - x2 * sin).to(o_tok.dtype.element_ty), mask=mask)
    tl.store(o_row + half + r, (x2 * cos + x1 * sin).to(o_tok.dtype.element_ty), mask=mask)


@triton.jit
def _rotate_heads(x_ptr, o_ptr, H, sxb, sxh, sxt, sob, soh, sot, b, t, cos, sin, half, copy_end,
                  BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    """Rotate all H heads of token (b, t); copy dims [2·half, copy_end) through."""
    r = tl.arange(0, BLOCK_R)[None, :]
    rmask = r < half
    cos, sin = cos[None, :], sin[None, :]
    x_tok = x_ptr + b * sxb + t * sxt
    o_tok = o_ptr + b * sob + t * sot
    for h0 in range(0, H, 2 * BLOCK_H):
        ha = (h0 + tl.arange(0, BLOCK_H)).to(tl.int64)[:, None]
        hb = ha + BLOCK_H
        ma = (ha < H) & rmask
        mb = (hb < H) & rmask
        # every load of this step comes before any store: safe when o_ptr == x_ptr (in place)
        a1, a2 = _load_halves(x_tok, ha, sxh, r, half, ma)
        b1, b2 = _load_halves(x_tok, hb, sxh, r, half, mb)
        _store_rotated(o_tok, ha, soh, r, half, ma, a1, a2, cos, sin)
        _store_rotated(o_tok, hb, soh, r, half, mb, b1, b2, cos, sin)
        # partial rotary: the remaining dims pass through (no iterations when copy_end == 2·half)
        hh = (h0 + tl.arange(0, 2 * BLOCK_H)).to(tl.int64)[:, None]
        for c0 in range(2 * half, copy_end, BLOCK_R):
            cols = c0 + tl.arange(0, BLOCK_R)[None, :]
            cmask = (hh < H) & (cols < copy_end)
            tl.store(o_tok + hh * soh + cols, tl.load(x_tok + hh * sxh + cols, mask=cmask), mask=cmask)


@triton.jit
def _rope_kernel(
    q_ptr, k_ptr, qo_ptr, ko_ptr, pos_ptr, inv_ptr,
    T, Hq, Hkv, half, copy_end,  # half = rotary_dim / 2; copy_end = head_dim, or 2·half in place
    sqb, sqh, sqt, skb, skh, skt, sqob, sqoh, sqot, skob, skoh, skot, spb, spt,
    attention_factor, sign,  # sign = −1 for the backward (conjugate) rotation
    BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)  # one token (b, t) per program: its angles are computed once
    b = token // T
    t = token % T
    pos = tl.load(pos_ptr + b * spb + t * spt).to(tl.float32)
    r = tl.arange(0, BLOCK_R)
    inv = tl.load(inv_ptr + r, mask=r < half, other=0.0)
    angle = pos * inv  # the same fp32 product transformers' rotary module forms
    cos = tl.cos(angle) * attention_factor
    sin = tl.sin(angle) * (attention_factor * sign)
    _rotate_heads(q_ptr, qo_ptr, Hq, sqb, sqh, sqt, sqob, sqoh, sqot, b, t, cos, sin, half, copy_end,
                  BLOCK_R, BLOCK_H)
    _rotate_heads(k_ptr, ko_ptr, Hkv, skb, skh, skt, skob, skoh, skot, b, t, cos, sin, half, copy_end,
                  BLOCK_R, BLOCK_H)


def launch_config(half: int) -> dict:
    """Compile-time parameters for a rotary half-dim (the same function feeds the registry)."""
    br = block_r(half)
    return {"BLOCK_R": br, "BLOCK_H": max(1, TILE // br)}


def _launch(q, k, qo, ko, position_ids, inv_freq, attention_factor: float, conjugate: bool,
            in_place: bool = False) -> None:
    B, Hq, T, D = q.shape
    half = inv_freq.shape[0]
    if B * T == 0:
        return
    copy_end = 2 * half if in_place else D  # in place, the pass-through dims are already there
    _rope_kernel[(B * T,)](
        q, k, qo, ko, position_ids, inv_freq, T, Hq, k.shape[1], half, copy_end,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        qo.stride(0), qo.stride(1), qo.stride(2), ko.stride(0), ko.stride(1), ko.stride(2),
        position_ids.stride(0), position_ids.stride(1), float(attention_factor), -1.0 if conjugate else 1.0,
        **launch_config(half), num_warps=NUM_WARPS)


def _dense_last(x: torch.Tensor) -> torch.Tensor:
    """The kernel needs stride 1 along head_dim (gradients can arrive broadcast, with stride 0)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _outputs(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, ...]:
    q, k = _dense_last(q), _dense_last(k)
    return q, k, torch.empty_like(q), torch.empty_like(k)  # outputs keep the inputs' layout


@torch.library.custom_op("swkernels::rope", mutates_args=())
def rope_op(q: torch.Tensor, k: torch.Tensor, position_ids: torch.Tensor, inv_freq: torch.Tensor,
            attention_factor: float, conjugate: bool) -> tuple[torch.Tensor, torch.Tensor]:
    q, k, qo, ko = _outputs(q, k)
    _launch(q, k, qo, ko, position_ids, inv_freq, attention_factor, conjugate)
    return qo, ko


@rope_op.register_fake
def _(q, k, position_ids, inv_freq, attention_factor, conjugate):
    _, _, qo, ko = _outputs(q, k)  # allocates the same copies as the real op
    return qo, ko


def _setup(ctx, inputs, output):
    _, _, position_ids, inv_freq, attention_factor, conjugate = inputs
    ctx.save_for_backward(position_ids, inv_freq)
    ctx.attention_factor, ctx.conjugate = attention_factor, conjugate


def _backward(ctx, dq, dk):
    position_ids, inv_freq = ctx.saved_tensors
    dq_in, dk_in = rope_op(dq, dk, position_ids, inv_freq, ctx.attention_factor, not ctx.conjugate)
    return dq_in, dk_in, None, None, None, None


rope_op.register_autograd(_backward, setup_context=_setup)


@torch.library.custom_op("swkernels::rope_", mutates_args=("q", "k"))
def rope_inplace_op(q: torch.Tensor, k: torch.Tensor, position_ids: torch.Tensor, inv_freq: torch.Tensor,
                    attention_factor: float) -> None:
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError("apply_rope_: in place needs stride 1 along head_dim; use apply_rope (functional) "
                         "or rotate a .contiguous() copy")
    _launch(q, k, q, k, position_ids, inv_freq, attention_factor, False, in_place=True)


@rope_inplace_op.register_fake
def _(q, k, position_ids, inv_freq, attention_factor):
    return None


def _check(q, k, position_ids, inv_freq):
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"apply_rope: q and k must be (batch, heads, seq, head_dim), got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}; transpose (B, T, H, D) projections with .transpose(1, 2)")
    B, Hq, T, D = q.shape
    if k.shape[0] != B or k.shape[2] != T or k.shape[3] != D:
        raise ValueError(f"apply_rope: k {tuple(k.shape)} must match q {tuple(q.shape)} except for its head count")
    if q.dtype != k.dtype or q.device != k.device:
        raise ValueError(f"apply_rope: q and k must share dtype and device, got {q.dtype}/{k.dtype}, "
                         f"{q.device}/{k.device}")
    if position_ids.dim() != 2 or position_ids.shape[0] not in (B, 1) or position_ids.shape[1] != T \
            or position_ids.is_floating_point():
        raise ValueError(f"apply_rope: position_ids must be integer (batch, seq) = {(B, T)} or (1, seq) = {(1, T)} "
                         f"(broadcast over the batch), got {position_ids.dtype} {tuple(position_ids.shape)}")
    half = inv_freq.shape[0] if inv_freq.dim() == 1 else -1
    if not 0 < 2 * half <= min(D, 2 * BLOCK_R_CHOICES[-1]):
        raise ValueError(f"apply_rope: inv_freq must be 1-D with 1..{min(D, 2 * BLOCK_R_CHOICES[-1]) // 2} entries "
                         f"(rotary dim / 2, at most head_dim/2 = {D // 2}), got shape {tuple(inv_freq.shape)}")


def _prepare(q, position_ids, inv_freq):
    """inv_freq as contiguous fp32 and positions as int64 on q's device (what the kernel reads)."""
    pos = position_ids.to(device=q.device, dtype=torch.int64)
    if pos.shape[0] != q.shape[0]:  # (1, T) broadcast over the batch: stride 0, the kernel reads strides
        pos = pos.expand(q.shape[0], -1)
    return pos, inv_freq.to(device=q.device, dtype=torch.float32).contiguous()


def apply_rope(q: torch.Tensor, k: torch.Tensor, position_ids: torch.Tensor, inv_freq: torch.Tensor,
               attention_factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q (B, Hq, T, D) and k (B, Hkv, T, D) by their positions (HF rotate_half layout),
    differentiably; returns new tensors with the inputs' layout. Partial rotary when
    2·len(inv_freq) < D; any head counts Hq, Hkv (GQA/MQA need not divide); position_ids (B, T) may
    restart per packed document, or (1, T) is broadcast over the batch."""
    _check(q, k, position_ids, inv_freq)
    pos, inv = _prepare(q, position_ids, inv_freq)
    if select_backend("rope", q) == "torch":
        return reference.apply_rope(q, k, pos, inv, attention_factor)
    return rope_op(q, k, pos, inv, float(attention_factor), False)


def apply_rope_(q: torch.Tensor, k: torch.Tensor, position_ids: torch.Tensor, inv_freq: torch.Tensor,
                attention_factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """In-place rotation of q and k (same kernel, outputs = inputs; no autograd): for inference
    and KV-cache writes. Returns (q, k)."""
    _check(q, k, position_ids, inv_freq)
    pos, inv = _prepare(q, position_ids, inv_freq)
    if select_backend("rope", q) == "torch":
        qo, ko = reference.apply_rope(q, k, pos, inv, attention_factor)
        q.copy_(qo)
        k.copy_(ko)
    else:
        rope_inplace_op(q, k, pos, inv, float(attention_factor))
    return q, k


_SIG = {"q_ptr": "*{dtype}", "k_ptr": "*{dtype}", "qo_ptr": "*{dtype}", "ko_ptr": "*{dtype}", "pos_ptr": "*i64",
        "inv_ptr": "*fp32", **{n: "i32" for n in ("T", "Hq", "Hkv", "half", "copy_end", "sqb", "sqh", "sqt", "skb",
                                                   "skh", "skt", "sqob", "sqoh", "sqot", "skob", "skoh", "skot",
                                                   "spb", "spt")},
        "attention_factor": "fp32", "sign": "fp32", "BLOCK_R": "constexpr", "BLOCK_H": "constexpr"}
register(*(KernelSpec("rope", _rope_kernel, _SIG, launch_config(br), num_warps=NUM_WARPS) for br in BLOCK_R_CHOICES))
