"""Cross-entropy of ``hidden · Wᵀ (+ bias)`` without ever materialising the (tokens × vocab) logits.

Tokens are processed in chunks. For each chunk: logits_c = h_c·Wᵀ (a (C × V) buffer in the
compute dtype), one Triton program per token turns them in place into scale·∂loss/∂logits
(online log-sum-exp; label smoothing and soft-capping included; see _loss_kernels), then
    ∂loss/∂h_c = dlogits_c · W,   ∂loss/∂W += dlogits_cᵀ · h_c,   ∂loss/∂bias += Σ_rows dlogits_c
and the buffer is reused for the next chunk. Gradients are complete after the forward pass;
the backward multiplies them by the upstream gradient. Peak extra memory: one chunk of logits
plus the gradients' own size, instead of ~14 bytes × tokens × vocab for transformers' upcast
logits path.

Chunk size: C = 2^⌈log2(N / ⌈V/H⌉)⌉, so a chunk's logits hold about as many elements as the
hidden states (Liger's rule), optionally capped by ``max_chunk_bytes``.
"""

from __future__ import annotations

import torch
import triton

from swkernels import reference
from swkernels._backend import select_backend
from swkernels.ops._loss_kernels import _ce_rows, launch_ce_rows
from swkernels.ops.distill_loss import mean_scale
from swkernels.reference.losses import check_labels
from swkernels.registry import KernelSpec, register


def chunk_size(n: int, vocab: int, hidden: int, elem_bytes: int = 2, max_chunk_bytes: int | None = None) -> int:
    chunk = triton.next_power_of_2(triton.cdiv(n, triton.cdiv(vocab, hidden)))
    if max_chunk_bytes:
        while chunk > 1 and chunk * vocab * elem_bytes > max_chunk_bytes:
            chunk //= 2
    return max(1, min(chunk, triton.next_power_of_2(max(n, 1))))


def _logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.addmm(bias, h, weight.t()) if bias is not None else h @ weight.t()


def chunked_ce(hidden, weight, bias, labels, ignore_index, label_smoothing, softcap, chunk, weight_grad, reduction,
               rows: str):
    """The chunk loop. ``rows``: "triton" (the kernel), "torch" (its row-wise torch equivalent, the
    CPU fallback: same chunking, more temporaries per chunk) or "none" (fake tensors: exactly the
    allocations of the Triton path)."""
    n, h = hidden.shape
    valid = labels != ignore_index
    scale = mean_scale(valid) if reduction == "mean" else torch.ones(1, dtype=torch.float32, device=hidden.device)
    losses = torch.empty(n, dtype=torch.float32, device=hidden.device)
    grad_h = torch.empty_like(hidden)
    grad_w = torch.zeros_like(weight) if weight_grad else hidden.new_empty(0)
    grad_b = torch.zeros_like(bias) if (weight_grad and bias is not None) else hidden.new_empty(0)
    for start in range(0, n, chunk):
        end = min(start + chunk, n)
        h_c = hidden[start:end]
        logits = _logits(h_c, weight, bias)
        if rows == "triton":
            launch_ce_rows(logits, labels[start:end], losses[start:end], scale, ignore_index, label_smoothing, softcap)
        elif rows == "torch":
            reference.ce_rows_(logits, labels[start:end], losses[start:end], scale, ignore_index, label_smoothing,
                               softcap)
        torch.mm(logits, weight, out=grad_h[start:end])
        if weight_grad:
            grad_w.addmm_(logits.t(), h_c)
            if bias is not None:
                grad_b.add_(logits.sum(0))
        del logits
    loss = (losses.sum() * scale[0]).reshape(())
    return loss, grad_h, grad_w, grad_b


@torch.library.custom_op("swkernels::fused_linear_ce_fwd", mutates_args=())
def fused_linear_ce_fwd(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
                        ignore_index: int, label_smoothing: float, softcap: float, chunk: int, weight_grad: bool,
                        reduction: str, rows: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return chunked_ce(hidden, weight, bias, labels, ignore_index, label_smoothing, softcap or None, chunk, weight_grad,
                      reduction, rows)


@fused_linear_ce_fwd.register_fake
def _(hidden, weight, bias, labels, ignore_index, label_smoothing, softcap, chunk, weight_grad, reduction, rows):
    return chunked_ce(hidden, weight, bias, labels, ignore_index, label_smoothing, softcap or None, chunk, weight_grad,
                      reduction, "none")


def _setup(ctx, inputs, output):
    ctx.has_bias = inputs[2] is not None
    ctx.weight_grad = inputs[8]
    ctx.save_for_backward(*output[1:])
    ctx.mark_non_differentiable(*output[1:])


def _backward(ctx, grad_loss, *_):
    grad_h, grad_w, grad_b = ctx.saved_tensors
    g = grad_loss.to(grad_h.dtype)
    dw = grad_w * g if ctx.weight_grad else None
    db = grad_b * g if ctx.weight_grad and ctx.has_bias else None
    return grad_h * g, dw, db, None, None, None, None, None, None, None, None


fused_linear_ce_fwd.register_autograd(_backward, setup_context=_setup)


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                               ignore_index: int = -100, label_smoothing: float = 0.0, softcap: float | None = None,
                               bias: torch.Tensor | None = None, reduction: str = "mean",
                               max_chunk_bytes: int | None = None) -> torch.Tensor:
    """``cross_entropy(softcap(hidden·Wᵀ + bias), labels)`` chunked over tokens (see module doc).

    hidden (..., H), weight (V, H), labels (...) with ``ignore_index`` for masked tokens.
    ``reduction``: "mean" over non-ignored tokens, or "sum". Gradients flow to hidden and, when
    they require it, to weight and bias."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"fused_linear_cross_entropy: reduction must be 'mean' or 'sum', got {reduction!r}")
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
    check_labels(y, weight.shape[0], ignore_index, "fused_linear_cross_entropy")
    rows = select_backend("fused_linear_cross_entropy", h2)  # the torch fallback keeps the chunking
    w = weight.to(h2.dtype) if weight.dtype != h2.dtype else weight
    b = bias.to(h2.dtype) if bias is not None and bias.dtype != h2.dtype else bias
    weight_grad = weight.requires_grad or (bias is not None and bias.requires_grad)
    chunk = chunk_size(h2.shape[0], weight.shape[0], H, h2.element_size(), max_chunk_bytes)
    loss, *_ = fused_linear_ce_fwd(h2.contiguous(), w, b, y.contiguous(), int(ignore_index), float(label_smoothing),
                                   float(softcap or 0.0), chunk, weight_grad, reduction, rows)
    return loss


_SIG = {"logits_ptr": "*{dtype}", "labels_ptr": "*i64", "loss_ptr": "*fp32", "scale_ptr": "*fp32", "V": "i32",
        "stride_row": "i32", "ignore_index": "i32", "label_smoothing": "fp32", "softcap": "fp32",
        "HAS_SOFTCAP": "constexpr", "BLOCK_V": "constexpr"}
register(*(KernelSpec("fused_linear_cross_entropy", _ce_rows, _SIG, {"HAS_SOFTCAP": cap, "BLOCK_V": bv},
                      num_warps=8 if bv >= 2048 else 4) for cap in (False, True) for bv in (1024, 4096)))
