"""Knowledge distillation fused with both LM heads, chunked over tokens: the (tokens × vocab)
logits of neither model are ever materialised.

loss = (1 − α)·CE(student, labels) + α·KD(teacher‖student)[·T²]
per token (CE optionally with the z-loss ζ·lse²), then averaged over tokens whose label is not
ignore_index, summed, or kept per token (reduction="none"; per-token upstream gradients as in
:mod:`swkernels.ops.fused_linear_cross_entropy`: rows scaled after the fact for a frozen head, the
chunk loop re-run with per-row kernel scales when the head trains); KD is forward KL, reverse KL
or JSD(β) (:mod:`swkernels.ops._loss_kernels`). Per chunk of C tokens:
    s = h_s·W_sᵀ, t = h_t·W_tᵀ           (C × V buffers, V = the real vocabulary)
    KD kernel: t ← α·scale·∂KD/∂s          (written over the teacher logits, no longer needed)
    CE kernel: s ← (1−α)·scale·∂CE/∂s      (in place)
    ds = s + t;  ∂loss/∂h_s = ds·W_s;  ∂loss/∂W_s += dsᵀ·h_s   (when W_s trains)
The teacher is frozen: no gradient reaches h_t or W_t.

Padded vocabularies: a student with 151,936 rows and a teacher with 152,064 share the first
``vocab_size`` tokens; logits past it are dropped (their gradient is 0). Different sizes without
``vocab_size`` are an error, since the real vocabularies may differ.

Top-k teacher (an offline cache): ``teacher_topk=(logprobs (N, k), indices (N, k))`` instead of
the teacher's hidden states and head. KD is then taken over the teacher's top-k support, with
both distributions renormalised over it: p̂ = softmax(logprobs/T), q̂ = softmax(s[indices]/T);
the gradient reaches only those k logits of each token.
"""

from __future__ import annotations

import torch

from swkernels import reference
from swkernels._backend import select_backend
from swkernels.ops._loss_kernels import launch_ce_rows, launch_distill_rows, row_scale
from swkernels.ops.distill_loss import kind_code, reduce_losses, reduction_scale
from swkernels.ops.fused_linear_cross_entropy import check_lse_square_scale, chunk_size, matmul_dtype
from swkernels.reference.losses import check_labels, check_reduction


def chunked_distill(s_hidden, s_weight, t_hidden, t_weight, topk_logprobs, topk_indices, labels, valid8, kind: int,
                    temperature: float, beta: float, alpha: float, ignore_index: int, vocab: int, chunk: int,
                    weight_grad: bool, kd_scale, ce_scale, lse_square_scale: float, rows: str, grads: bool = True):
    """The chunk loop: per-row KD and CE losses (unscaled) and, with ``grads``, the gradients of
    Σ_i kd_scale_i·KD_i + ce_scale_i·CE_i (scales (1,) for all rows or (n,) per row).
    ``rows`` as in :func:`chunked_ce` ("triton", "torch" fallback, "none" = fake)."""

    def distill(s_, t_, g_, start, end):
        args = (s_, t_, g_, valid8[start:end], kd_losses[start:end], row_scale(kd_scale, start, end), kind,
                temperature, beta)
        if rows == "triton":
            launch_distill_rows(*args)
        elif rows == "torch":
            reference.distill_rows(*args)

    def ce(logits, start, end):
        args = (logits, labels[start:end], ce_losses[start:end], row_scale(ce_scale, start, end), ignore_index, 0.0,
                None, lse_square_scale)
        if rows == "triton":
            launch_ce_rows(*args)
        elif rows == "torch":
            reference.ce_rows_(*args)

    n = s_hidden.shape[0]
    kd_losses = torch.empty(n, dtype=torch.float32, device=s_hidden.device)
    ce_losses = torch.zeros(n, dtype=torch.float32, device=s_hidden.device)
    grad_h = torch.empty_like(s_hidden) if grads else s_hidden.new_empty(0)
    grad_w = torch.zeros_like(s_weight) if grads and weight_grad else s_hidden.new_empty(0)
    for start in range(0, n, chunk):
        end = min(start + chunk, n)
        h_c = s_hidden[start:end]
        s = h_c @ s_weight.t()  # (C, Vs): rows past `vocab` keep a zero gradient
        sv = s[:, :vocab]
        if topk_indices is not None:
            idx = topk_indices[start:end]
            s_top = sv.gather(1, idx)
            distill(s_top, topk_logprobs[start:end], s_top, start, end)
            kd_grad = s_top
        else:
            t = (t_hidden[start:end] @ t_weight.t())[:, :vocab]
            distill(sv, t, t, start, end)
            kd_grad = t
        if alpha < 1.0:
            ce(sv, start, end)
        if grads:
            if alpha < 1.0:
                if topk_indices is not None:
                    sv.scatter_add_(1, idx, kd_grad)
                else:
                    sv.add_(kd_grad)
            elif topk_indices is not None:
                sv.zero_()
                sv.scatter_(1, idx, kd_grad)
            else:
                sv.copy_(kd_grad)
            if s.shape[1] > vocab:
                s[:, vocab:].zero_()
            del kd_grad
            torch.mm(s, s_weight, out=grad_h[start:end])
            if weight_grad:
                grad_w.addmm_(s.t(), h_c)
        else:
            del kd_grad
        del s, sv
    return kd_losses, ce_losses, grad_h, grad_w


def _scales(valid, reduction, alpha, temperature, t2):
    return (reduction_scale(valid, reduction, alpha * (temperature**2 if t2 else 1.0)),
            reduction_scale(valid, reduction, 1.0 - alpha))


def _forward(s_hidden, s_weight, t_hidden, t_weight, topk_logprobs, topk_indices, labels, kind, temperature, beta,
             alpha, ignore_index, vocab, chunk, t2, weight_grad, rows, reduction, lse_square_scale, grads):
    """The loss, and with ``grads`` (False: no backward will run) its gradients at upstream 1,
    except for reduction="none" with a trained head (the backward recomputes them with the
    upstream gradient as per-row scale, as in :mod:`fused_linear_cross_entropy`)."""
    valid = labels != ignore_index
    kd_scale, ce_scale = _scales(valid, reduction, alpha, temperature, t2)
    kd_losses, ce_losses, grad_h, grad_w = chunked_distill(
        s_hidden, s_weight, t_hidden, t_weight, topk_logprobs, topk_indices, labels, valid.to(torch.int8), kind,
        temperature, beta, alpha, ignore_index, vocab, chunk, weight_grad, kd_scale, ce_scale, lse_square_scale, rows,
        grads=grads and not (reduction == "none" and weight_grad))
    loss = reduce_losses(kd_losses, kd_scale, reduction) + reduce_losses(ce_losses, ce_scale, reduction)
    return loss, grad_h, grad_w


@torch.library.custom_op("swkernels::fused_linear_distill_fwd", mutates_args=())
def fused_linear_distill_fwd(s_hidden: torch.Tensor, s_weight: torch.Tensor, t_hidden: torch.Tensor | None,
                             t_weight: torch.Tensor | None, topk_logprobs: torch.Tensor | None,
                             topk_indices: torch.Tensor | None, labels: torch.Tensor, kind: int, temperature: float,
                             beta: float, alpha: float, ignore_index: int, vocab: int, chunk: int, t2: bool,
                             weight_grad: bool, rows: str, reduction: str = "mean", lse_square_scale: float = 0.0,
                             grads: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _forward(s_hidden, s_weight, t_hidden, t_weight, topk_logprobs, topk_indices, labels, kind, temperature,
                    beta, alpha, ignore_index, vocab, chunk, t2, weight_grad, rows, reduction, lse_square_scale, grads)


@fused_linear_distill_fwd.register_fake
def _(s_hidden, s_weight, t_hidden, t_weight, topk_logprobs, topk_indices, labels, kind, temperature, beta, alpha,
      ignore_index, vocab, chunk, t2, weight_grad, rows, reduction="mean", lse_square_scale=0.0, grads=True):
    return _forward(s_hidden, s_weight, t_hidden, t_weight, topk_logprobs, topk_indices, labels, kind, temperature,
                    beta, alpha, ignore_index, vocab, chunk, t2, weight_grad, "none", reduction, lse_square_scale,
                    grads)


def _backward_rows(s_hidden, s_weight, t_hidden, t_weight, topk_logprobs, topk_indices, labels, grad_rows, kind,
                   temperature, beta, alpha, ignore_index, vocab, chunk, t2, rows, lse_square_scale):
    valid8 = (labels != ignore_index).to(torch.int8)
    kd_scale = grad_rows * (alpha * (temperature**2 if t2 else 1.0))
    ce_scale = grad_rows * (1.0 - alpha)
    _, _, grad_h, grad_w = chunked_distill(s_hidden, s_weight, t_hidden, t_weight, topk_logprobs, topk_indices, labels,
                                           valid8, kind, temperature, beta, alpha, ignore_index, vocab, chunk, True,
                                           kd_scale, ce_scale, lse_square_scale, rows)
    return grad_h, grad_w


@torch.library.custom_op("swkernels::fused_linear_distill_bwd", mutates_args=())
def fused_linear_distill_bwd(s_hidden: torch.Tensor, s_weight: torch.Tensor, t_hidden: torch.Tensor | None,
                             t_weight: torch.Tensor | None, topk_logprobs: torch.Tensor | None,
                             topk_indices: torch.Tensor | None, labels: torch.Tensor, grad_rows: torch.Tensor,
                             kind: int, temperature: float, beta: float, alpha: float, ignore_index: int, vocab: int,
                             chunk: int, t2: bool, rows: str, lse_square_scale: float,
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """reduction="none" with a trained head: the chunk loop again with the per-token upstream
    gradient g (n,) fp32 folded into both kernels' per-row scales."""
    return _backward_rows(s_hidden, s_weight, t_hidden, t_weight, topk_logprobs, topk_indices, labels, grad_rows,
                          kind, temperature, beta, alpha, ignore_index, vocab, chunk, t2, rows, lse_square_scale)


@fused_linear_distill_bwd.register_fake
def _(s_hidden, s_weight, t_hidden, t_weight, topk_logprobs, topk_indices, labels, grad_rows, kind, temperature, beta,
      alpha, ignore_index, vocab, chunk, t2, rows, lse_square_scale):
    return _backward_rows(s_hidden, s_weight, t_hidden, t_weight, topk_logprobs, topk_indices, labels, grad_rows,
                          kind, temperature, beta, alpha, ignore_index, vocab, chunk, t2, "none", lse_square_scale)


def _setup(ctx, inputs, output):
    weight_grad, rows, reduction, lse_square_scale, _ = inputs[15:]
    ctx.weight_grad = weight_grad
    ctx.per_row = reduction == "none"
    ctx.recompute = ctx.per_row and weight_grad
    if ctx.recompute:
        ctx.params = inputs[7:15] + (rows, lse_square_scale)  # kind .. t2
        ctx.save_for_backward(*inputs[:7])
    else:
        ctx.save_for_backward(output[1], output[2])
    ctx.mark_non_differentiable(output[1], output[2])


def _backward(ctx, grad_loss, *_):
    rest = (None,) * 18  # the teacher, labels and the non-tensor arguments
    if ctx.recompute:
        *tensors, labels = ctx.saved_tensors
        grad_h, grad_w = fused_linear_distill_bwd(*tensors, labels, grad_loss.to(torch.float32).contiguous(),
                                                  *ctx.params)
        return (grad_h, grad_w) + rest
    grad_h, grad_w = ctx.saved_tensors
    g = grad_loss.to(grad_h.dtype)
    if ctx.per_row:  # frozen head: each row's gradient times its upstream gradient, exactly
        return (grad_h * g[:, None], None) + rest
    return (grad_h * g, grad_w * g if ctx.weight_grad else None) + rest


fused_linear_distill_fwd.register_autograd(_backward, setup_context=_setup)


def resolve_vocab(student_vocab: int, teacher_vocab: int | None, vocab_size: int | None) -> int:
    if vocab_size is None:
        if teacher_vocab is not None and teacher_vocab != student_vocab:
            raise ValueError(f"student and teacher LM heads have different vocabulary sizes ({student_vocab} vs "
                             f"{teacher_vocab}); if the extra rows are padding, pass vocab_size=<the real "
                             "vocabulary size>; if the tokenizers differ, logit distillation does not apply")
        return student_vocab
    limit = min(student_vocab, teacher_vocab or student_vocab)
    if not 0 < vocab_size <= limit:
        raise ValueError(f"vocab_size={vocab_size} must be in 1..{limit} (the smaller LM head)")
    return vocab_size


def fused_linear_distill(student_hidden: torch.Tensor, student_head_weight: torch.Tensor,
                         teacher_hidden: torch.Tensor | None = None, teacher_head_weight: torch.Tensor | None = None,
                         labels: torch.Tensor | None = None, kind: str = "forward_kl", temperature: float = 1.0,
                         beta: float = 0.5, alpha: float = 0.5, ignore_index: int = -100,
                         vocab_size: int | None = None, scale_by_t2: bool = False,
                         teacher_topk: tuple[torch.Tensor, torch.Tensor] | None = None,
                         max_chunk_bytes: int | None = None, reduction: str = "mean",
                         lse_square_scale: float = 0.0) -> torch.Tensor:
    """Distillation (+ hard-label CE weighted 1−α) fused with the LM heads; see the module doc.
    Give the teacher as (teacher_hidden, teacher_head_weight) or as ``teacher_topk``.
    ``reduction``: "mean" over non-ignored tokens, "sum", or "none": fp32 per-token losses shaped
    like the hidden states' leading dimensions (0 on ignored tokens) that take a per-token
    upstream gradient. ``lse_square_scale`` ζ adds the z-loss ζ·lse² to the CE term (so it is
    weighted by 1−α)."""
    check_reduction(reduction, "fused_linear_distill")
    check_lse_square_scale(lse_square_scale)
    H = student_hidden.shape[-1]
    hs = student_hidden.reshape(-1, H)
    n = hs.shape[0]
    if labels is None:
        if alpha < 1.0:
            raise ValueError("fused_linear_distill: hard-label CE (alpha < 1) needs labels; pass labels or alpha=1")
        labels = torch.zeros(n, dtype=torch.long, device=hs.device)
    y = labels.reshape(-1)
    if y.shape[0] != n:
        raise ValueError(f"fused_linear_distill: {y.shape[0]} labels for {n} tokens")
    if not 0.0 <= alpha <= 1.0 or temperature <= 0:
        raise ValueError(f"alpha must be in [0, 1] and temperature > 0 (got {alpha}, {temperature})")
    code = kind_code(kind, beta)
    if (teacher_topk is None) == (teacher_hidden is None or teacher_head_weight is None):
        raise ValueError("give the teacher either as teacher_hidden + teacher_head_weight or as teacher_topk")
    if teacher_topk is not None:
        lp, idx = teacher_topk
        lp, idx = lp.reshape(n, -1).detach(), idx.reshape(n, -1).to(torch.long)
        vocab = resolve_vocab(student_head_weight.shape[0], None, vocab_size)
        ht = wt = None
    else:
        ht = teacher_hidden.reshape(n, -1).detach()
        wt = teacher_head_weight.detach()
        vocab = resolve_vocab(student_head_weight.shape[0], wt.shape[0], vocab_size)
        lp = idx = None
    if alpha < 1.0:
        check_labels(y, vocab, ignore_index, "fused_linear_distill")
    rows = select_backend("fused_linear_distill", hs)  # the torch fallback keeps the chunking
    dtype, autocast_off = matmul_dtype(hs)
    hs, ws = hs.to(dtype), student_head_weight.to(dtype)
    grads = torch.is_grad_enabled() and (hs.requires_grad or ws.requires_grad)  # else the logits matmuls only
    chunk = chunk_size(n, ws.shape[0], H, hs.element_size(), max_chunk_bytes)
    with autocast_off:
        loss, _, _ = fused_linear_distill_fwd(
            hs.contiguous(), ws, None if ht is None else ht.to(dtype).contiguous(),
            None if wt is None else wt.to(dtype), None if lp is None else lp.to(dtype).contiguous(),
            None if idx is None else idx.contiguous(), y.contiguous(), code, float(temperature), float(beta),
            float(alpha), int(ignore_index), vocab, chunk, bool(scale_by_t2), student_head_weight.requires_grad, rows,
            reduction, float(lse_square_scale), grads)
    return loss.reshape(student_hidden.shape[:-1]) if reduction == "none" else loss
