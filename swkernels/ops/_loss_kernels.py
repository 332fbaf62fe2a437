"""Row-wise Triton kernels for the loss ops: each program streams one token's logits over the
vocabulary in blocks (online log-sum-exp, fp32), writes the row's loss, and overwrites the logits
with their gradient, so no probability tensor is ever stored.

Cross-entropy with label smoothing ε, optional soft-capping z = c·tanh(l/c) and z-loss weight ζ
(``lse_square_scale``, PaLM's auxiliary loss that keeps log Z near 0):
    loss = (1−ε)·(lse − z_y) + ε·(lse − mean_j z_j) + ζ·lse²
    ∂loss/∂z_j = q_j·(1 + 2ζ·lse) − (1−ε)·[j = y] − ε/V,  q = softmax(z);   ∂z/∂l = 1 − (z/c)²

Distillation over z_s = s/T (student), z_t = t/T (teacher), q = softmax(z_s), p = softmax(z_t):
    forward KL(p‖q) = Σ p (log p − log q)            ∂/∂z_s,j = q_j − p_j
    reverse KL(q‖p) = Σ q (log q − log p)            ∂/∂z_s,j = q_j (log q_j − log p_j − KL)
    JSD_β = β·KL(p‖m) + (1−β)·KL(q‖m), m = β p + (1−β) q   (m in the linear domain: _log_mixture)
        ∂JSD/∂q_k = (1−β)·log(q_k/m_k) =: a_k (the p- and m-terms cancel), so through the softmax
        ∂/∂z_s,j = q_j (a_j − Σ_k q_k a_k)
    β = 0 and β = 1 are forward and reverse KL (the TRL / Liger convention).
The teacher gets no gradient (it is frozen). ∂/∂s = (1/T)·∂/∂z_s.

Both kernels multiply the gradient by a scale read at ``scale_ptr + row·scale_stride``: stride 0
for one scale shared by all rows (1/#valid for a mean, 1 for a sum: a tensor, so no host sync),
stride 1 for a per-row upstream gradient (``reduction="none"``). Ignored rows get loss 0 and
gradient 0 whatever the scale.
"""

from __future__ import annotations

import triton
import triton.language as tl

KIND_FORWARD_KL, KIND_REVERSE_KL, KIND_JSD = 0, 1, 2


@triton.jit
def _tanh(y):
    """tanh in fp32 without cancellation near 0 (2σ(2y)−1 loses all relative precision there):
    odd Taylor series for |y| < 1/4 (truncation < 1e-8 relative), else (1−e^{−2|y|})/(1+e^{−2|y|})."""
    a = tl.abs(y)
    y2 = y * y
    small = y * (1.0 + y2 * (-1.0 / 3.0 + y2 * (2.0 / 15.0 + y2 * (-17.0 / 315.0 + y2 * (62.0 / 2835.0)))))
    e = tl.exp(-2.0 * a)
    big = (1.0 - e) / (1.0 + e)
    big = tl.where(y < 0, -big, big)
    return tl.where(a < 0.25, small, big)


@triton.jit
def _capped(x, softcap, HAS_SOFTCAP: tl.constexpr):
    if HAS_SOFTCAP:
        return softcap * _tanh(x / softcap)  # c·tanh(x/c)
    return x


@triton.jit
def _ce_rows(
    logits_ptr, labels_ptr, loss_ptr, scale_ptr,  # logits (N, V) in place → gradient; labels, loss (N,); scale (1,)|(N,)
    V, stride_row, scale_stride, ignore_index, label_smoothing, softcap, lse_square_scale,
    HAS_SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    ptr = logits_ptr + row * stride_row
    label = tl.load(labels_ptr + row)
    grad_scale = tl.load(scale_ptr + row * scale_stride)
    cols = tl.arange(0, BLOCK_V)
    if label == ignore_index:
        for v0 in range(0, V, BLOCK_V):
            tl.store(ptr + v0 + cols, tl.zeros((BLOCK_V,), dtype=tl.float32).to(logits_ptr.dtype.element_ty),
                     mask=v0 + cols < V)
        tl.store(loss_ptr + row, 0.0)
        return
    m = -float("inf")
    d = 0.0
    zsum = 0.0
    for v0 in range(0, V, BLOCK_V):
        mask = v0 + cols < V
        z = _capped(tl.load(ptr + v0 + cols, mask=mask, other=0.0).to(tl.float32), softcap, HAS_SOFTCAP)
        z = tl.where(mask, z, -float("inf"))
        m_new = tl.maximum(m, tl.max(z, 0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), 0)
        m = m_new
        zsum += tl.sum(tl.where(mask, z, 0.0), 0)
    lse = m + tl.log(d)
    in_range = (label >= 0) & (label < V)  # an out-of-range label reads nothing and gives a NaN loss
    z_y = _capped(tl.load(ptr + tl.where(in_range, label, 0)).to(tl.float32), softcap, HAS_SOFTCAP)
    # without smoothing, a -inf logit (masked through the bias) must not give 0·inf = NaN
    smooth = tl.where(label_smoothing > 0.0, label_smoothing * (lse - zsum / V), 0.0)
    # z-loss terms are skipped at ζ = 0 (lse = ±inf must not give 0·inf = NaN there)
    z_loss = tl.where(lse_square_scale != 0.0, lse_square_scale * lse * lse, 0.0)
    z_grad = tl.where(lse_square_scale != 0.0, 2.0 * lse_square_scale * lse, 0.0)
    loss = (1.0 - label_smoothing) * (lse - z_y) + smooth + z_loss
    loss = tl.where(in_range, loss, float("nan"))
    tl.store(loss_ptr + row, loss)
    for v0 in range(0, V, BLOCK_V):
        mask = v0 + cols < V
        z = _capped(tl.load(ptr + v0 + cols, mask=mask, other=0.0).to(tl.float32), softcap, HAS_SOFTCAP)
        g = tl.exp(z - lse) * (1.0 + z_grad) - label_smoothing / V
        g = tl.where(v0 + cols == label, g - (1.0 - label_smoothing), g)
        if HAS_SOFTCAP:
            g = g * (1.0 - (z / softcap) * (z / softcap))
        tl.store(ptr + v0 + cols, (g * grad_scale).to(logits_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _log_mixture(p, q, beta):
    """log m, m = β·p + (1−β)·q, formed in the linear domain as torch's lerp does: log β + log p in
    fp32 rounds to a grid coarser than log p's, which biases every term the same way (JSD off by
    ~2e-6 relative at β = 0.1, 32k vocabulary). Floored at the smallest normal: no log 0 where
    p = q = 0 (those terms are masked); where m underflows, β·p and (1−β)·q do too, and their
    terms are ~1e-36 at most."""
    return tl.log(tl.maximum(beta * p + (1.0 - beta) * q, 1.1754943508222875e-38))


@triton.jit
def _distill_rows(
    s_ptr, t_ptr, g_ptr, valid_ptr, loss_ptr, scale_ptr,  # s, t (N, V); g (N, V) gradient (may alias s or t)
    V, stride_s, stride_t, stride_g, scale_stride, inv_temperature, beta,
    KIND: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    sp, tp, gp = s_ptr + row * stride_s, t_ptr + row * stride_t, g_ptr + row * stride_g
    cols = tl.arange(0, BLOCK_V)
    grad_scale = tl.load(scale_ptr + row * scale_stride)
    if tl.load(valid_ptr + row) == 0:
        for v0 in range(0, V, BLOCK_V):
            tl.store(gp + v0 + cols, tl.zeros((BLOCK_V,), dtype=tl.float32).to(g_ptr.dtype.element_ty),
                     mask=v0 + cols < V)
        tl.store(loss_ptr + row, 0.0)
        return
    # pass 1: log-sum-exp of both distributions
    ms = -float("inf")
    ds = 0.0
    mt = -float("inf")
    dt = 0.0
    for v0 in range(0, V, BLOCK_V):
        mask = v0 + cols < V
        zs = tl.where(mask, tl.load(sp + v0 + cols, mask=mask, other=0.0).to(tl.float32) * inv_temperature, -float("inf"))
        zt = tl.where(mask, tl.load(tp + v0 + cols, mask=mask, other=0.0).to(tl.float32) * inv_temperature, -float("inf"))
        ms_new = tl.maximum(ms, tl.max(zs, 0))
        ds = ds * tl.exp(ms - ms_new) + tl.sum(tl.exp(zs - ms_new), 0)
        ms = ms_new
        mt_new = tl.maximum(mt, tl.max(zt, 0))
        dt = dt * tl.exp(mt - mt_new) + tl.sum(tl.exp(zt - mt_new), 0)
        mt = mt_new
    lse_s = ms + tl.log(ds)
    lse_t = mt + tl.log(dt)
    # pass 2: the loss and Σ q·a
    loss = 0.0
    qa = 0.0
    for v0 in range(0, V, BLOCK_V):
        mask = v0 + cols < V
        lq = tl.load(sp + v0 + cols, mask=mask, other=0.0).to(tl.float32) * inv_temperature - lse_s
        lp = tl.load(tp + v0 + cols, mask=mask, other=0.0).to(tl.float32) * inv_temperature - lse_t
        q = tl.where(mask, tl.exp(lq), 0.0)
        p = tl.where(mask, tl.exp(lp), 0.0)
        # terms with a zero probability are 0 (0·log 0 = 0), not 0·(−inf) = NaN
        if KIND == 0:
            loss += tl.sum(tl.where(p > 0.0, p * (lp - lq), 0.0), 0)
        elif KIND == 1:
            loss += tl.sum(tl.where(q > 0.0, q * (lq - lp), 0.0), 0)
        else:
            lm = _log_mixture(p, q, beta)
            tq = tl.where(q > 0.0, q * (1.0 - beta) * (lq - lm), 0.0)
            loss += tl.sum(tl.where(p > 0.0, beta * p * (lp - lm), 0.0) + tq, 0)
            qa += tl.sum(tq, 0)
    tl.store(loss_ptr + row, loss)
    # pass 3: the gradient w.r.t. the student logits (after all reads of this block: may alias s)
    for v0 in range(0, V, BLOCK_V):
        mask = v0 + cols < V
        lq = tl.load(sp + v0 + cols, mask=mask, other=0.0).to(tl.float32) * inv_temperature - lse_s
        lp = tl.load(tp + v0 + cols, mask=mask, other=0.0).to(tl.float32) * inv_temperature - lse_t
        q = tl.exp(lq)
        if KIND == 0:
            g = q - tl.exp(lp)
        elif KIND == 1:
            g = tl.where(q > 0.0, q * (lq - lp - loss), 0.0)
        else:
            lm = _log_mixture(tl.exp(lp), q, beta)
            g = tl.where(q > 0.0, q * ((1.0 - beta) * (lq - lm) - qa), 0.0)
        tl.store(gp + v0 + cols, (g * (grad_scale * inv_temperature)).to(g_ptr.dtype.element_ty), mask=mask)


def block_v(V: int, cap: int = 4096) -> int:
    return min(cap, triton.next_power_of_2(V))


def _warps(bv: int) -> int:
    return 8 if bv >= 2048 else 4


DISTILL_BLOCK_CAP = 2048  # the JSD pass keeps ~3× the live values of CE per element


def distill_warps(bv: int) -> int:
    """About 4 vocabulary elements per thread: spill-free on sm_75..sm_90 for every kind."""
    return max(1, min(16, bv // 128))


def per_row_stride(scale, n: int) -> int:
    """0 for one scale shared by all n rows, else the stride of a per-row scale (n,)."""
    if scale.numel() == 1:
        return 0
    if scale.shape != (n,):
        raise ValueError(f"scale must hold 1 or {n} values, got shape {tuple(scale.shape)}")
    return scale.stride(0)


def row_scale(scale, start: int, end: int):
    """The scale of rows start..end: a shared (1,) scale as is, a per-row one sliced."""
    return scale if scale.numel() == 1 else scale[start:end]


def launch_ce_rows(logits, labels, loss, scale, ignore_index: int, label_smoothing: float, softcap: float | None,
                   lse_square_scale: float = 0.0):
    """In place: logits (n, V) become scale·∂loss/∂logits; loss (n,) gets each row's loss (unscaled).
    scale: (1,) shared or (n,) per row."""
    n, V = logits.shape
    if n == 0:
        return
    bv = block_v(V)
    _ce_rows[(n,)](logits, labels, loss, scale, V, logits.stride(0), per_row_stride(scale, n), int(ignore_index),
                   float(label_smoothing), float(softcap or 1.0), float(lse_square_scale),
                   HAS_SOFTCAP=softcap is not None, BLOCK_V=bv, num_warps=_warps(bv))


def launch_distill_rows(s, t, g, valid, loss, scale, kind: int, temperature: float, beta: float):
    """g (n, V, may alias s or t) = scale·∂loss/∂s; loss (n,) per row (unscaled); rows with valid == 0
    get 0. scale: (1,) shared or (n,) per row."""
    n, V = s.shape
    if n == 0:
        return
    bv = block_v(V, DISTILL_BLOCK_CAP)
    _distill_rows[(n,)](s, t, g, valid, loss, scale, V, s.stride(0), t.stride(0), g.stride(0), per_row_stride(scale, n),
                        1.0 / float(temperature), float(beta), KIND=kind, BLOCK_V=bv, num_warps=distill_warps(bv))
