"""Distillation loss on given logits: forward KL, reverse KL or JSD(β) between teacher p =
softmax(t/T) and student q = softmax(s/T), per token (optionally × T²), then the mean over
non-ignored tokens, their sum, or per token (reduction="none").

One Triton program per token streams the vocabulary three times (log-sum-exps; loss and
Σ q·a; gradient) and writes ∂loss/∂s during the forward pass, so the backward is a scale (per row
for reduction="none": ∂/∂s_i = g_i·∂ℓ_i/∂s_i, exact) and no softmax is ever stored. Maths and gradients in :mod:`swkernels.ops._loss_kernels`.
"""

from __future__ import annotations

import torch

from swkernels import reference
from swkernels._backend import select_backend
from swkernels.ops._loss_kernels import (
    DISTILL_BLOCK_CAP,
    KIND_FORWARD_KL,
    KIND_JSD,
    KIND_REVERSE_KL,
    _distill_rows,
    distill_warps,
    launch_distill_rows,
)
from swkernels.reference.losses import check_reduction
from swkernels.registry import KernelSpec, register

KINDS = ("forward_kl", "reverse_kl", "jsd")


def kind_code(kind: str, beta: float) -> int:
    """Kernel code; JSD at β = 0 / 1 is forward / reverse KL (TRL's and Liger's convention)."""
    if kind not in KINDS:
        raise ValueError(f"distillation kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if kind == "jsd":
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"jsd beta must be in [0, 1], got {beta}")
        return KIND_FORWARD_KL if beta == 0.0 else KIND_REVERSE_KL if beta == 1.0 else KIND_JSD
    return KIND_FORWARD_KL if kind == "forward_kl" else KIND_REVERSE_KL


def mean_scale(valid: torch.Tensor, extra: float = 1.0) -> torch.Tensor:
    """extra / max(#valid, 1) as a 1-element fp32 tensor (read by the kernels: no host sync)."""
    return (extra / valid.sum().clamp_min(1).to(torch.float32)).reshape(1)


def reduction_scale(valid: torch.Tensor, reduction: str, extra: float = 1.0) -> torch.Tensor:
    """The gradient scale shared by all rows, a (1,) fp32 tensor: extra / #valid for "mean", else
    extra ("sum"; "none", whose backward multiplies each row by its upstream gradient)."""
    if reduction == "mean":
        return mean_scale(valid, extra)
    return torch.full((1,), extra, dtype=torch.float32, device=valid.device)


def reduce_losses(losses: torch.Tensor, scale: torch.Tensor, reduction: str) -> torch.Tensor:
    """Per-row losses (n,) (0 on ignored rows) and their scale → the op's loss: scale·Σ, or per row."""
    return losses * scale if reduction == "none" else (losses.sum() * scale[0]).reshape(())


def _forward(s, t, valid, kind, temperature, beta, t2, reduction, run: bool):
    scale = reduction_scale(valid, reduction, temperature**2 if t2 else 1.0)
    grad = torch.empty_like(s)
    losses = torch.empty(s.shape[0], dtype=torch.float32, device=s.device)
    if run:
        launch_distill_rows(s, t, grad, valid, losses, scale, kind, temperature, beta)
    return reduce_losses(losses, scale, reduction), grad


@torch.library.custom_op("swkernels::distill_loss_fwd", mutates_args=())
def distill_loss_fwd(s: torch.Tensor, t: torch.Tensor, valid: torch.Tensor, kind: int, temperature: float,
                     beta: float, t2: bool, reduction: str = "mean") -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(s, t, valid, kind, temperature, beta, t2, reduction, True)


@distill_loss_fwd.register_fake
def _(s, t, valid, kind, temperature, beta, t2, reduction="mean"):
    return _forward(s, t, valid, kind, temperature, beta, t2, reduction, False)  # what the real op allocates


def _setup(ctx, inputs, output):
    ctx.per_row = inputs[7] == "none"
    ctx.save_for_backward(output[1])
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_loss, _):
    (grad,) = ctx.saved_tensors
    g = grad_loss.to(grad.dtype)
    return (grad * (g[:, None] if ctx.per_row else g),) + (None,) * 7


distill_loss_fwd.register_autograd(_backward, setup_context=_setup)


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str = "forward_kl",
                 temperature: float = 1.0, beta: float = 0.5, ignore_index: int = -100,
                 labels: torch.Tensor | None = None, scale_by_t2: bool = False, reduction: str = "mean") -> torch.Tensor:
    """Divergence of the student from the teacher per token whose label is not ``ignore_index``
    (all tokens when ``labels`` is None), × T² with ``scale_by_t2``. ``reduction``: "mean" over
    those tokens, "sum", or "none": fp32 per-token values shaped like the logits' leading
    dimensions (0 on ignored tokens) that take a per-token upstream gradient. Logits (..., V) of
    any float dtype; fp32 accumulation; the teacher gets no gradient."""
    check_reduction(reduction, "distill_loss")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"distill_loss: student {tuple(student_logits.shape)} and teacher "
                         f"{tuple(teacher_logits.shape)} logits differ in shape (for padded vocabularies use "
                         "fused_linear_distill(..., vocab_size=) or trim them)")
    if temperature <= 0:
        raise ValueError(f"distill_loss: temperature must be > 0, got {temperature}")
    code = kind_code(kind, beta)
    V = student_logits.shape[-1]
    s, t = student_logits.reshape(-1, V), teacher_logits.reshape(-1, V).detach()
    if labels is not None and labels.numel() != s.shape[0]:
        raise ValueError(f"distill_loss: {labels.numel()} labels for {s.shape[0]} tokens")
    if select_backend("distill_loss", s) == "torch":
        loss = reference.distill_loss(s, t, kind, temperature, beta, ignore_index, labels, scale_by_t2, reduction)
    else:
        valid = (labels.reshape(-1) != ignore_index) if labels is not None else torch.ones(
            s.shape[0], dtype=torch.bool, device=s.device)
        loss, _ = distill_loss_fwd(s.contiguous(), t.contiguous(), valid.to(torch.int8), code, float(temperature),
                                   float(beta), bool(scale_by_t2), reduction)
    return loss.reshape(student_logits.shape[:-1]) if reduction == "none" else loss


_SIG = {"s_ptr": "*{dtype}", "t_ptr": "*{dtype}", "g_ptr": "*{dtype}", "valid_ptr": "*i8", "loss_ptr": "*fp32",
        "scale_ptr": "*fp32", "V": "i32", "stride_s": "i32", "stride_t": "i32", "stride_g": "i32",
        "scale_stride": "i32", "inv_temperature": "fp32", "beta": "fp32", "KIND": "constexpr", "BLOCK_V": "constexpr"}
register(*(KernelSpec("distill_loss", _distill_rows, _SIG, {"KIND": kind, "BLOCK_V": bv}, num_warps=distill_warps(bv))
           for kind in (KIND_FORWARD_KL, KIND_REVERSE_KL, KIND_JSD) for bv in (256, 1024, DISTILL_BLOCK_CAP)))
