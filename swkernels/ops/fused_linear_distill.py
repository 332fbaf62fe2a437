"""Knowledge distillation fused with both LM heads, chunked over tokens: the (tokens × vocab)
logits of neither model are ever materialised.

loss = (1 − α)·CE(student, labels) + α·KD(teacher‖student)[·T²]
both averaged over tokens whose label is not ignore_index; KD is forward KL, reverse KL or JSD(β)
(:mod:`swkernels.ops._loss_kernels`). Per chunk of C tokens:
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
from swkernels.ops._loss_kernels import launch_ce_rows, launch_distill_rows
from swkernels.ops.distill_loss import kind_code, mean_scale
from swkernels.ops.fused_linear_cross_entropy import chunk_size
from swkernels.reference.losses import check_labels


def chunked_distill(s_hidden, s_weight, t_hidden, t_weight, topk_logprobs, topk_indices, labels, kind: int,
                    temperature: float, beta: float, alpha: float, ignore_index: int, vocab: int, chunk: int,
                    t2: bool, weight_grad: bool, rows: str):
    """The chunk loop; ``rows`` as in :func:`chunked_ce` ("triton", "torch" fallback, "none" = fake)."""

    def distill(s_, t_, g_, sl):
        if rows == "triton":
            launch_distill_rows(s_, t_, g_, valid8[sl], kd_losses[sl], kd_scale, kind, temperature, beta)
        elif rows == "torch":
            reference.distill_rows(s_, t_, g_, valid8[sl], kd_losses[sl], kd_scale, kind, temperature, beta)

    def ce(logits, sl):
        if rows == "triton":
            launch_ce_rows(logits, labels[sl], ce_losses[sl], ce_scale, ignore_index, 0.0, None)
        elif rows == "torch":
            reference.ce_rows_(logits, labels[sl], ce_losses[sl], ce_scale, ignore_index, 0.0, None)

    n = s_hidden.shape[0]
    valid = labels != ignore_index
    kd_scale = mean_scale(valid, alpha * (temperature**2 if t2 else 1.0))
    ce_scale = mean_scale(valid, 1.0 - alpha)
    valid8 = valid.to(torch.int8)
    kd_losses = torch.empty(n, dtype=torch.float32, device=s_hidden.device)
    ce_losses = torch.zeros(n, dtype=torch.float32, device=s_hidden.device)
    grad_h = torch.empty_like(s_hidden)
    grad_w = torch.zeros_like(s_weight) if weight_grad else s_hidden.new_empty(0)
    for start in range(0, n, chunk):
        end = min(start + chunk, n)
        h_c = s_hidden[start:end]
        s = h_c @ s_weight.t()  # (C, Vs): rows past `vocab` keep a zero gradient
        sv = s[:, :vocab]
        if topk_indices is not None:
            idx = topk_indices[start:end]
            s_top = sv.gather(1, idx)
            distill(s_top, topk_logprobs[start:end], s_top, slice(start, end))
            kd_grad = s_top
        else:
            t = (t_hidden[start:end] @ t_weight.t())[:, :vocab]
            distill(sv, t, t, slice(start, end))
            kd_grad = t
        if alpha < 1.0:
            ce(sv, slice(start, end))
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
        del s, sv
    loss = (kd_losses.sum() * kd_scale[0] + ce_losses.sum() * ce_scale[0]).reshape(())
    return loss, grad_h, grad_w


@torch.library.custom_op("swkernels::fused_linear_distill_fwd", mutates_args=())
def fused_linear_distill_fwd(s_hidden: torch.Tensor, s_weight: torch.Tensor, t_hidden: torch.Tensor | None,
                             t_weight: torch.Tensor | None, topk_logprobs: torch.Tensor | None,
                             topk_indices: torch.Tensor | None, labels: torch.Tensor, kind: int, temperature: float,
                             beta: float, alpha: float, ignore_index: int, vocab: int, chunk: int, t2: bool,
                             weight_grad: bool, rows: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return chunked_distill(s_hidden, s_weight, t_hidden, t_weight, topk_logprobs, topk_indices, labels, kind,
                           temperature, beta, alpha, ignore_index, vocab, chunk, t2, weight_grad, rows)


@fused_linear_distill_fwd.register_fake
def _(s_hidden, s_weight, t_hidden, t_weight, topk_logprobs, topk_indices, labels, kind, temperature, beta, alpha,
      ignore_index, vocab, chunk, t2, weight_grad, rows):
    return chunked_distill(s_hidden, s_weight, t_hidden, t_weight, topk_logprobs, topk_indices, labels, kind,
                           temperature, beta, alpha, ignore_index, vocab, chunk, t2, weight_grad, "none")


def _setup(ctx, inputs, output):
    ctx.weight_grad = inputs[15]
    ctx.save_for_backward(output[1], output[2])
    ctx.mark_non_differentiable(output[1], output[2])


def _backward(ctx, grad_loss, *_):
    grad_h, grad_w = ctx.saved_tensors
    g = grad_loss.to(grad_h.dtype)
    return (grad_h * g, grad_w * g if ctx.weight_grad else None) + (None,) * 15


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
                         max_chunk_bytes: int | None = None) -> torch.Tensor:
    """Distillation (+ hard-label CE weighted 1−α) fused with the LM heads; see the module doc.
    Give the teacher as (teacher_hidden, teacher_head_weight) or as ``teacher_topk``."""
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
    dtype = hs.dtype
    ws = student_head_weight.to(dtype)
    chunk = chunk_size(n, ws.shape[0], H, hs.element_size(), max_chunk_bytes)
    loss, _, _ = fused_linear_distill_fwd(
        hs.contiguous(), ws, None if ht is None else ht.to(dtype).contiguous(), None if wt is None else wt.to(dtype),
        None if lp is None else lp.to(dtype).contiguous(), None if idx is None else idx.contiguous(), y.contiguous(),
        code, float(temperature), float(beta), float(alpha), int(ignore_index), vocab, chunk, bool(scale_by_t2),
        student_head_weight.requires_grad, rows)
    return loss
