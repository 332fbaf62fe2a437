"""Rotary position embedding for Q and K in one launch, cos/sin computed in-kernel.

For a pair (x1, x2) = (x[i], x[i + d/2]) of the rotary dims (HF's rotate_half layout) at
position p, with angle a = p·inv_freq[i] (fp32) and attention factor f:
    out1 = f·(x1·cos a − x2·sin a),  out2 = f·(x2·cos a + x1·sin a)
i.e. a rotation by a, scaled by f. Its Jacobian is f·R(a), so the gradient is
    dx = f·R(a)ᵀ·dout = f·R(−a)·dout
— the same kernel with sin negated (``conjugate``). No (seq × dim) cos/sin table is ever
allocated: each program computes the angles of its token once (fp32) and rotates every Q and
K head of that token; dims past the rotary dim (partial rotary) are copied through. Packed
sequences need nothing special: positions come from position_ids (restarting per document).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from swkernels import reference
from swkernels._backend import select_backend
from swkernels.registry import KernelSpec, register


@triton.jit
def _rotate_heads(x_ptr, o_ptr, H, sxb, sxh, sxt, sob, soh, sot, b, t, cos, sin, half, pass_dim, rot,
                  BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr, HAS_PASS: tl.constexpr):
    r = tl.arange(0, BLOCK_R)
    rmask = r < half
    for h in range(0, H):
        xb = x_ptr + b * sxb + h * sxh + t * sxt
        ob = o_ptr + b * sob + h * soh + t * sot
        x1 = tl.load(xb + r, mask=rmask, other=0.0).to(tl.float32)
        x2 = tl.load(xb + half + r, mask=rmask, other=0.0).to(tl.float32)
        tl.store(ob + r, (x1 * cos - x2 * sin).to(o_ptr.dtype.element_ty), mask=rmask)
        tl.store(ob + half + r, (x2 * cos + x1 * sin).to(o_ptr.dtype.element_ty), mask=rmask)
        if HAS_PASS:
            pcol = tl.arange(0, BLOCK_P)
            pmask = pcol < pass_dim
            tl.store(ob + rot + pcol, tl.load(xb + rot + pcol, mask=pmask), mask=pmask)


@triton.jit
def _rope_kernel(
    q_ptr, k_ptr, qo_ptr, ko_ptr, pos_ptr, inv_ptr,
    T, Hq, Hkv, half, pass_dim,  # half = rotary_dim / 2
    sqb, sqh, sqt, skb, skh, skt, sqob, sqoh, sqot, skob, skoh, skot, spb, spt,
    attention_factor, sign,  # sign = −1 for the backward (conjugate) rotation
    BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr, HAS_PASS: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)  # one token (b, t) per program
    b = pid // T
    t = pid % T
    pos = tl.load(pos_ptr + b * spb + t * spt).to(tl.float32)
    r = tl.arange(0, BLOCK_R)
    inv = tl.load(inv_ptr + r, mask=r < half, other=0.0)
    angle = pos * inv
    cos = tl.cos(angle) * attention_factor
    sin = tl.sin(angle) * attention_factor * sign
    rot = 2 * half
    _rotate_heads(q_ptr, qo_ptr, Hq, sqb, sqh, sqt, sqob, sqoh, sqot, b, t, cos, sin, half, pass_dim, rot,
                  BLOCK_R, BLOCK_P, HAS_PASS)
    _rotate_heads(k_ptr, ko_ptr, Hkv, skb, skh, skt, skob, skoh, skot, b, t, cos, sin, half, pass_dim, rot,
                  BLOCK_R, BLOCK_P, HAS_PASS)


def _launch(q, k, qo, ko, position_ids, inv_freq, attention_factor: float, conjugate: bool) -> None:
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    half = inv_freq.shape[0]
    pass_dim = D - 2 * half
    if B * T == 0:
        return
    _rope_kernel[(B * T,)](
        q, k, qo, ko, position_ids, inv_freq, T, Hq, Hkv, half, pass_dim,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        qo.stride(0), qo.stride(1), qo.stride(2), ko.stride(0), ko.stride(1), ko.stride(2),
        position_ids.stride(0), position_ids.stride(1), float(attention_factor), -1.0 if conjugate else 1.0,
        BLOCK_R=triton.next_power_of_2(half), BLOCK_P=triton.next_power_of_2(max(pass_dim, 1)),
        HAS_PASS=pass_dim > 0, num_warps=4 if half >= 64 else 2)


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
    # in place is safe: each program reads a token's head before writing the same elements
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError("apply_rope_: in place needs stride 1 along head_dim")
    _launch(q, k, q, k, position_ids, inv_freq, attention_factor, False)


@rope_inplace_op.register_fake
def _(q, k, position_ids, inv_freq, attention_factor):
    return None


def _check(q, k, position_ids, inv_freq):
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"apply_rope: q and k must be (batch, heads, seq, head_dim), got {tuple(q.shape)}, {tuple(k.shape)}")
    B, Hq, T, D = q.shape
    if k.shape[0] != B or k.shape[2] != T or k.shape[3] != D:
        raise ValueError(f"apply_rope: k {tuple(k.shape)} must match q {tuple(q.shape)} except for its head count")
    if Hq % k.shape[1]:
        raise ValueError(f"apply_rope: query heads ({Hq}) must be a multiple of key heads ({k.shape[1]})")
    if position_ids.shape != (B, T):
        raise ValueError(f"apply_rope: position_ids must be (batch, seq) = {(B, T)}, got {tuple(position_ids.shape)}")
    if inv_freq.dim() != 1 or 2 * inv_freq.shape[0] > D:
        raise ValueError(f"apply_rope: inv_freq must be 1-D with at most head_dim/2 = {D // 2} entries")


def apply_rope(q: torch.Tensor, k: torch.Tensor, position_ids: torch.Tensor, inv_freq: torch.Tensor,
               attention_factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q (B, Hq, T, D) and k (B, Hkv, T, D) by their positions (HF rotate_half layout),
    differentiably; returns new tensors with the inputs' layout. Partial rotary when
    2·len(inv_freq) < D; GQA when Hkv < Hq; position_ids (B, T) may restart per packed document."""
    _check(q, k, position_ids, inv_freq)
    inv = inv_freq.to(device=q.device, dtype=torch.float32).contiguous()
    if select_backend("rope", q) == "torch":
        return reference.apply_rope(q, k, position_ids, inv, attention_factor)
    return rope_op(q, k, position_ids, inv, float(attention_factor), False)


def apply_rope_(q: torch.Tensor, k: torch.Tensor, position_ids: torch.Tensor, inv_freq: torch.Tensor,
                attention_factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """In-place rotation of q and k (no autograd): for inference and caches."""
    _check(q, k, position_ids, inv_freq)
    inv = inv_freq.to(device=q.device, dtype=torch.float32).contiguous()
    if select_backend("rope", q) == "torch":
        qo, ko = reference.apply_rope(q, k, position_ids, inv, attention_factor)
        q.copy_(qo)
        k.copy_(ko)
    else:
        rope_inplace_op(q, k, position_ids, inv, float(attention_factor))
    return q, k


_SIG = {"q_ptr": "*{dtype}", "k_ptr": "*{dtype}", "qo_ptr": "*{dtype}", "ko_ptr": "*{dtype}", "pos_ptr": "*i64",
        "inv_ptr": "*fp32", **{n: "i32" for n in ("T", "Hq", "Hkv", "half", "pass_dim", "sqb", "sqh", "sqt", "skb",
                                                   "skh", "skt", "sqob", "sqoh", "sqot", "skob", "skoh", "skot",
                                                   "spb", "spt")},
        "attention_factor": "fp32", "sign": "fp32", "BLOCK_R": "constexpr", "BLOCK_P": "constexpr",
        "HAS_PASS": "constexpr"}
register(*(KernelSpec("rope", _rope_kernel, _SIG, {"BLOCK_R": half, "BLOCK_P": p, "HAS_PASS": p > 1},
                      num_warps=4 if half >= 64 else 2)
           for half, p in ((32, 1), (64, 1), (128, 1), (16, 16), (32, 32))))
