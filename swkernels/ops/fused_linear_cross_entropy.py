"""Cross-entropy of ``hidden · Wᵀ (+ bias)`` without ever materialising the (tokens × vocab) logits.

Tokens are processed in chunks. For each chunk: logits_c = h_c·Wᵀ (a (C × V) buffer in the
compute dtype), one Triton program per token turns them in place into scale·∂loss/∂logits
(online log-sum-exp; label smoothing, soft-capping and z-loss included; see _loss_kernels), then
    ∂loss/∂h_c = dlogits_c · W,   ∂loss/∂W += dlogits_cᵀ · h_c,   ∂loss/∂bias += Σ_rows dlogits_c
and the buffer is reused for the next chunk. Gradients are complete after the forward pass;
the backward multiplies them by the upstream gradient. Peak extra memory: one chunk of logits
plus the gradients' own size, instead of ~14 bytes × tokens × vocab for transformers' upcast
logits path.

reduction="none" returns per-token losses ℓ_i and takes a per-token upstream gradient g_i:
    ∂/∂h_i = g_i·∂ℓ_i/∂h_i          (row i of the forward's gradient times g_i: exact, no extra work)
    ∂/∂W = Σ_i g_i·dlogits_iᵀ·h_i   (not a multiple of the forward's Σ_i dlogits_iᵀ·h_i)
so with a frozen head the forward computes ∂ℓ_i/∂h_i as usual and the backward scales its rows;
with a trained head the forward computes the losses only and the backward runs the chunk loop
again with g as a per-row scale inside the kernel (one extra logits matmul in all).

Chunk size: C = 2^⌈log2(N / ⌈V/H⌉)⌉, so a chunk's logits hold about as many elements as the
hidden states (Liger's rule), optionally capped by ``max_chunk_bytes``.
"""

from __future__ import annotations

import contextlib
import math

import torch
import triton

from swkernels import reference
from swkernels._backend import select_backend
from swkernels.ops._loss_kernels import _ce_rows, launch_ce_rows, row_scale
from swkernels.ops.distill_loss import reduce_losses, reduction_scale
from swkernels.reference.losses import check_labels, check_reduction
from swkernels.registry import KernelSpec, register


def chunk_size(n: int, vocab: int, hidden: int, elem_bytes: int = 2, max_chunk_bytes: int | None = None) -> int:
    chunk = triton.next_power_of_2(triton.cdiv(n, triton.cdiv(vocab, hidden)))
    if max_chunk_bytes:
        while chunk > 1 and chunk * vocab * elem_bytes > max_chunk_bytes:
            chunk //= 2
    return max(1, min(chunk, triton.next_power_of_2(max(n, 1))))


def _logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.addmm(bias, h, weight.t()) if bias is not None else h @ weight.t()


def chunked_ce(hidden, weight, bias, labels, ignore_index, label_smoothing, softcap, lse_square_scale, chunk,
               weight_grad, scale, rows: str, grads: bool = True):
    """The chunk loop: per-row losses (unscaled) and, with ``grads``, scale·gradients; ``scale`` is
    (1,) for all rows or (n,) per row. ``rows``: "triton" (the kernel), "torch" (its row-wise torch
    equivalent, the CPU fallback: same chunking, more temporaries per chunk) or "none" (fake
    tensors: exactly the allocations of the Triton path)."""
    n = hidden.shape[0]
    losses = torch.empty(n, dtype=torch.float32, device=hidden.device)
    grad_h = torch.empty_like(hidden) if grads else hidden.new_empty(0)
    grad_w = torch.zeros_like(weight) if grads and weight_grad else hidden.new_empty(0)
    grad_b = torch.zeros_like(bias) if grads and weight_grad and bias is not None else hidden.new_empty(0)
    for start in range(0, n, chunk):
        end = min(start + chunk, n)
        h_c = hidden[start:end]
        logits = _logits(h_c, weight, bias)
        args = (logits, labels[start:end], losses[start:end], row_scale(scale, start, end), ignore_index,
                label_smoothing, softcap, lse_square_scale)
        if rows == "triton":
            launch_ce_rows(*args)
        elif rows == "torch":
            reference.ce_rows_(*args)
        if grads:
            torch.mm(logits, weight, out=grad_h[start:end])
            if weight_grad:
                grad_w.addmm_(logits.t(), h_c)
                if bias is not None:
                    grad_b.add_(logits.sum(0))
        del logits
    return losses, grad_h, grad_w, grad_b


def _forward(hidden, weight, bias, labels, ignore_index, label_smoothing, softcap, chunk, weight_grad, reduction, rows,
             lse_square_scale, grads):
    """The loss, and with ``grads`` (False: no backward will run) the gradients at upstream 1,
    except for reduction="none" with a trained head: its weight gradient Σ_i g_i·∂loss_i/∂W
    cannot come from their sum, so the backward recomputes."""
    scale = reduction_scale(labels != ignore_index, reduction)
    grads = grads and not (reduction == "none" and weight_grad)
    losses, grad_h, grad_w, grad_b = chunked_ce(hidden, weight, bias, labels, ignore_index, label_smoothing,
                                                softcap or None, lse_square_scale, chunk, weight_grad, scale, rows,
                                                grads)
    return reduce_losses(losses, scale, reduction), grad_h, grad_w, grad_b


@torch.library.custom_op("swkernels::fused_linear_ce_fwd", mutates_args=())
def fused_linear_ce_fwd(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
                        ignore_index: int, label_smoothing: float, softcap: float, chunk: int, weight_grad: bool,
                        reduction: str, rows: str, lse_square_scale: float = 0.0, grads: bool = True,
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _forward(hidden, weight, bias, labels, ignore_index, label_smoothing, softcap, chunk, weight_grad,
                    reduction, rows, lse_square_scale, grads)


@fused_linear_ce_fwd.register_fake
def _(hidden, weight, bias, labels, ignore_index, label_smoothing, softcap, chunk, weight_grad, reduction, rows,
      lse_square_scale=0.0, grads=True):
    return _forward(hidden, weight, bias, labels, ignore_index, label_smoothing, softcap, chunk, weight_grad,
                    reduction, "none", lse_square_scale, grads)


def _recompute(hidden, weight, bias, labels, grad_rows, ignore_index, label_smoothing, softcap, lse_square_scale,
               chunk, rows):
    _, grad_h, grad_w, grad_b = chunked_ce(hidden, weight, bias, labels, ignore_index, label_smoothing,
                                           softcap or None, lse_square_scale, chunk, True, grad_rows, rows)
    return grad_h, grad_w, grad_b


@torch.library.custom_op("swkernels::fused_linear_ce_bwd", mutates_args=())
def fused_linear_ce_bwd(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
                        grad_rows: torch.Tensor, ignore_index: int, label_smoothing: float, softcap: float,
                        lse_square_scale: float, chunk: int, rows: str,
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """reduction="none" with a trained head: the chunk loop again, each row scaled by its upstream
    gradient grad_rows (n,) fp32 inside the kernel, so ∂/∂W = Σ_i g_i·∂loss_i/∂W is exact."""
    return _recompute(hidden, weight, bias, labels, grad_rows, ignore_index, label_smoothing, softcap,
                      lse_square_scale, chunk, rows)


@fused_linear_ce_bwd.register_fake
def _(hidden, weight, bias, labels, grad_rows, ignore_index, label_smoothing, softcap, lse_square_scale, chunk, rows):
    return _recompute(hidden, weight, bias, labels, grad_rows, ignore_index, label_smoothing, softcap,
                      lse_square_scale, chunk, "none")


def _setup(ctx, inputs, output):
    (hidden, weight, bias, labels, ignore_index, label_smoothing, softcap, chunk, weight_grad, reduction, rows,
     lse_square_scale, _) = inputs  # defaults included
    ctx.has_bias = bias is not None
    ctx.weight_grad = weight_grad
    ctx.reduction = reduction
    ctx.recompute = reduction == "none" and weight_grad
    if ctx.recompute:
        ctx.params = (ignore_index, label_smoothing, softcap, lse_square_scale, chunk, rows)
        ctx.save_for_backward(hidden, weight, bias, labels)
    else:
        ctx.save_for_backward(*output[1:])
    ctx.mark_non_differentiable(*output[1:])


def _backward(ctx, grad_loss, *_):
    rest = (None,) * 10  # labels and the non-tensor arguments
    if ctx.recompute:
        hidden, weight, bias, labels = ctx.saved_tensors
        grad_h, grad_w, grad_b = fused_linear_ce_bwd(hidden, weight, bias, labels,
                                                     grad_loss.to(torch.float32).contiguous(), *ctx.params)
        return (grad_h, grad_w, grad_b if ctx.has_bias else None) + rest
    grad_h, grad_w, grad_b = ctx.saved_tensors
    g = grad_loss.to(grad_h.dtype)
    if ctx.reduction == "none":  # frozen head: each row's gradient times its upstream gradient, exactly
        return (grad_h * g[:, None], None, None) + rest
    dw = grad_w * g if ctx.weight_grad else None
    db = grad_b * g if ctx.weight_grad and ctx.has_bias else None
    return (grad_h * g, dw, db) + rest


fused_linear_ce_fwd.register_autograd(_backward, setup_context=_setup)


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                               ignore_index: int = -100, label_smoothing: float = 0.0, softcap: float | None = None,
                               bias: torch.Tensor | None = None, reduction: str = "mean",
                               max_chunk_bytes: int | None = None, lse_square_scale: float = 0.0) -> torch.Tensor:
    """``cross_entropy(softcap(hidden·Wᵀ + bias), labels)`` chunked over tokens (see module doc).

    hidden (..., H), weight (V, H), labels (...) with ``ignore_index`` for masked tokens.
    ``reduction``: "mean" over non-ignored tokens, "sum", or "none": fp32 per-token losses shaped
    like ``labels`` (0 on ignored tokens) that take a per-token upstream gradient.
    ``lse_square_scale`` ζ adds the z-loss ζ·logsumexp(logits)² of each non-ignored token.
    Gradients flow to hidden and, when they require it, to weight and bias."""
    check_reduction(reduction, "fused_linear_cross_entropy")
    H = hidden.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != H:
        raise ValueError(f"fused_linear_cross_entropy: weight must be (vocab, {H}), got {tuple(weight.shape)}")
    h2, y = hidden.reshape(-1, H), labels.reshape(-1)
    if y.shape[0] != h2.shape[0]:
        raise ValueError(f"fused_linear_cross_entropy: {y.shape[0]} labels for {h2.shape[0]} tokens")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    if softcap is not None and softcap <= 0:
        raise ValueError(f"softcap must be > 0, got {softcap}")
    check_lse_square_scale(lse_square_scale)
    check_labels(y, weight.shape[0], ignore_index, "fused_linear_cross_entropy")
    rows = select_backend("fused_linear_cross_entropy", h2)  # the torch fallback keeps the chunking
    dtype, autocast_off = matmul_dtype(h2)
    h2, w = h2.to(dtype), weight.to(dtype)
    b = bias.to(dtype) if bias is not None else None
    weight_grad = weight.requires_grad or (bias is not None and bias.requires_grad)
    grads = torch.is_grad_enabled() and (h2.requires_grad or weight_grad)  # else the logits matmul only
    chunk = chunk_size(h2.shape[0], weight.shape[0], H, h2.element_size(), max_chunk_bytes)
    with autocast_off:
        loss, *_ = fused_linear_ce_fwd(h2.contiguous(), w, b, y.contiguous(), int(ignore_index),
                                       float(label_smoothing), float(softcap or 0.0), chunk, weight_grad, reduction,
                                       rows, float(lse_square_scale), grads)
    return loss.reshape(labels.shape) if reduction == "none" else loss


def matmul_dtype(hidden: torch.Tensor):
    """The LM-head matmul's dtype: hidden's, or under autocast the autocast dtype, as F.linear would
    use; and a context to run the op in with autocast off (its buffers and ``out=`` matmuls keep
    that one dtype)."""
    device = hidden.device.type
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device), torch.autocast(device, enabled=False)
    return hidden.dtype, contextlib.nullcontext()


def check_lse_square_scale(lse_square_scale: float) -> None:
    if not (math.isfinite(lse_square_scale) and lse_square_scale >= 0):
        raise ValueError(f"lse_square_scale (the z-loss weight) must be a finite number >= 0, got {lse_square_scale}")


_SIG = {"logits_ptr": "*{dtype}", "labels_ptr": "*i64", "loss_ptr": "*fp32", "scale_ptr": "*fp32", "V": "i32",
        "stride_row": "i32", "scale_stride": "i32", "ignore_index": "i32", "label_smoothing": "fp32",
        "softcap": "fp32", "lse_square_scale": "fp32", "HAS_SOFTCAP": "constexpr", "BLOCK_V": "constexpr"}
register(*(KernelSpec("fused_linear_cross_entropy", _ce_rows, _SIG, {"HAS_SOFTCAP": cap, "BLOCK_V": bv},
                      num_warps=8 if bv >= 2048 else 4) for cap in (False, True) for bv in (1024, 4096)))
