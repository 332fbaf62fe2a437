"""Pure-torch losses: the oracle for the loss kernels and their CPU fallback (fp32 math)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _valid(labels, n, ignore_index, device):
    if labels is None:
        return torch.ones(n, dtype=torch.bool, device=device)
    return labels.reshape(-1) != ignore_index


def plogp_ratio(lp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """p·(log p − log q) elementwise, 0 where p = 0 (0·log 0 = 0; no 0·(−inf) = NaN)."""
    p = lp.exp()
    return p * torch.where(p > 0, lp - lq, 0.0)  # masked inside the product: no NaN gradient either


def log_mixture(lp: torch.Tensor, lq: torch.Tensor, beta: float) -> torch.Tensor:
    """log(β·p + (1−β)·q) formed in the linear domain, like the kernel (a log-domain sum with log β
    rounds with a bias), floored at the smallest normal float: no log 0 where p = q = 0."""
    return torch.log(torch.clamp(beta * lp.exp() + (1 - beta) * lq.exp(), min=torch.finfo(lp.dtype).tiny))


def check_labels(labels: torch.Tensor, vocab: int, ignore_index: int, where: str) -> None:
    """Labels must be ``ignore_index`` or in [0, vocab). On the CPU this raises a ValueError naming
    the first bad label; on an accelerator it queues a device-side assert (no host sync), and the
    kernels give such a row a NaN loss without reading outside the row."""
    from torch._subclasses.fake_tensor import is_fake

    if torch.compiler.is_compiling() or labels.device.type == "meta" or is_fake(labels):
        return
    bad = ((labels < 0) | (labels >= vocab)) & (labels != ignore_index)
    if labels.device.type == "cpu":
        if bool(bad.any()):
            i = int(bad.reshape(-1).nonzero()[0, 0])
            raise ValueError(f"{where}: label {int(labels.reshape(-1)[i])} at position {i} is out of range: "
                             f"labels must be in [0, {vocab}) or ignore_index={ignore_index}")
        return
    torch._assert_async(~bad.any(), f"{where}: a label is out of range [0, {vocab}) and not ignore_index")


def distill_per_token(s: torch.Tensor, t: torch.Tensor, kind: str, temperature: float, beta: float) -> torch.Tensor:
    """Per-row divergence between teacher p = softmax(t/T) and student q = softmax(s/T)."""
    lq = F.log_softmax(s.float() / temperature, dim=-1)
    lp = F.log_softmax(t.float() / temperature, dim=-1)
    if kind == "jsd" and beta == 0.0:
        kind = "forward_kl"
    if kind == "jsd" and beta == 1.0:
        kind = "reverse_kl"
    if kind == "forward_kl":
        return plogp_ratio(lp, lq).sum(-1)
    if kind == "reverse_kl":
        return plogp_ratio(lq, lp).sum(-1)
    if kind == "jsd":
        lm = log_mixture(lp, lq, beta)
        return beta * plogp_ratio(lp, lm).sum(-1) + (1 - beta) * plogp_ratio(lq, lm).sum(-1)
    raise ValueError(f"unknown distillation kind {kind!r}")


REDUCTIONS = ("mean", "sum", "none")


def check_reduction(reduction: str, where: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"{where}: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def reduce_rows(per: torch.Tensor, valid: torch.Tensor, reduction: str) -> torch.Tensor:
    """per-token values (0 on ignored tokens) → their mean over valid tokens, their sum, or as is."""
    if reduction == "none":
        return per
    total = per.sum()
    return total / valid.sum().clamp_min(1) if reduction == "mean" else total


def distill_loss(s, t, kind="forward_kl", temperature=1.0, beta=0.5, ignore_index=-100, labels=None,
                 scale_by_t2=False, reduction="mean") -> torch.Tensor:
    """Divergence per token (0 on ignored tokens), × T² if asked: their mean over non-ignored tokens,
    their sum, or ("none") per token, shaped like the logits' leading dimensions."""
    s2, t2 = s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1])
    valid = _valid(labels, s2.shape[0], ignore_index, s.device)
    per = torch.where(valid, distill_per_token(s2, t2, kind, temperature, beta), 0.0)
    loss = reduce_rows(per, valid, reduction)
    loss = loss * temperature**2 if scale_by_t2 else loss
    return loss.reshape(s.shape[:-1]) if reduction == "none" else loss


def capped_logits(hidden, weight, bias=None, softcap=None) -> torch.Tensor:
    logits = F.linear(hidden.float(), weight.float(), None if bias is None else bias.float())
    return softcap * torch.tanh(logits / softcap) if softcap else logits


def cross_entropy(logits, labels, ignore_index=-100, label_smoothing=0.0, reduction="mean",
                  lse_square_scale=0.0) -> torch.Tensor:
    """torch's cross-entropy on fp32 logits (N, V), plus the z-loss ζ·logsumexp² of each non-ignored
    token reduced the same way."""
    ce = F.cross_entropy(logits, labels, ignore_index=ignore_index, label_smoothing=label_smoothing,
                         reduction=reduction)
    if not lse_square_scale:
        return ce
    valid = labels != ignore_index
    z = torch.where(valid, lse_square_scale * torch.logsumexp(logits, dim=-1) ** 2, 0.0)
    return ce + reduce_rows(z, valid, reduction)


def linear_cross_entropy(hidden, weight, labels, ignore_index=-100, label_smoothing=0.0, softcap=None, bias=None,
                         reduction="mean", lse_square_scale=0.0) -> torch.Tensor:
    logits = capped_logits(hidden.reshape(-1, hidden.shape[-1]), weight, bias, softcap)
    loss = cross_entropy(logits, labels.reshape(-1), ignore_index, label_smoothing, reduction, lse_square_scale)
    return loss.reshape(labels.shape) if reduction == "none" else loss


def linear_distill(s_hidden, s_weight, t_hidden, t_weight, labels, kind="forward_kl", temperature=1.0, beta=0.5,
                   alpha=0.5, ignore_index=-100, vocab_size=None, scale_by_t2=False, reduction="mean",
                   lse_square_scale=0.0) -> torch.Tensor:
    """(1 − α)·(CE + z-loss)(student, labels) + α·KD(teacher‖student) over the first ``vocab_size``
    logits of each model (padding rows dropped), both reduced over non-ignored tokens alike."""
    V = vocab_size or s_weight.shape[0]
    s = capped_logits(s_hidden.reshape(-1, s_hidden.shape[-1]), s_weight)[:, :V]
    t = capped_logits(t_hidden.reshape(-1, t_hidden.shape[-1]), t_weight)[:, :V]
    kd = distill_loss(s, t, kind, temperature, beta, ignore_index, labels, scale_by_t2, reduction)
    if alpha < 1.0:
        kd = (1 - alpha) * cross_entropy(s, labels.reshape(-1), ignore_index, 0.0, reduction, lse_square_scale) + \
            alpha * kd
    return kd.reshape(s_hidden.shape[:-1]) if reduction == "none" else kd


def topk_distill_per_token(s: torch.Tensor, topk_logprobs: torch.Tensor, topk_indices: torch.Tensor, kind: str,
                           temperature: float, beta: float) -> torch.Tensor:
    """KD restricted to the teacher's top-k support, both distributions renormalised over it."""
    return distill_per_token(s.float().gather(-1, topk_indices), topk_logprobs.float(), kind, temperature, beta)


# ---- row-wise equivalents of the Triton loss kernels (the fused ops' CPU fallback) ----

def ce_rows_(logits, labels, losses, scale, ignore_index, label_smoothing, softcap, lse_square_scale=0.0):
    """In place, like ``_ce_rows``: logits (n, V) → scale·∂loss/∂logits (scale (1,) or (n,));
    losses (n,) ← per-row loss, z-loss ζ·lse² included."""
    z = logits.float()
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    valid = labels != ignore_index
    safe = torch.where(valid & (labels >= 0) & (labels < z.shape[-1]), labels, 0)
    lse = torch.logsumexp(z, dim=-1)
    z_y = z.gather(1, safe[:, None])[:, 0]
    loss = (1 - label_smoothing) * (lse - z_y)
    if label_smoothing:  # else a -inf logit would give 0·inf = NaN
        loss = loss + label_smoothing * (lse - z.mean(-1))
    if lse_square_scale:
        loss = loss + lse_square_scale * lse**2
    loss = torch.where((labels >= 0) & (labels < z.shape[-1]), loss, float("nan"))
    losses.copy_(torch.where(valid, loss, 0.0))
    g = torch.softmax(z, dim=-1)
    if lse_square_scale:
        g = g * (1 + 2 * lse_square_scale * lse[:, None])
    g = g - label_smoothing / z.shape[-1]
    g.scatter_add_(1, safe[:, None], torch.full_like(z_y[:, None], -(1 - label_smoothing)))
    if softcap:
        g = g * (1 - (z / softcap) ** 2)
    logits.copy_(g * scale.reshape(-1, 1) * valid[:, None])


def distill_rows(s, t, g, valid, losses, scale, kind, temperature, beta):
    """Like ``_distill_rows`` (kind: 0 forward KL, 1 reverse KL, 2 JSD): g ← scale·∂loss/∂s, scale
    (1,) or (n,)."""
    lq = torch.log_softmax(s.float() / temperature, dim=-1)
    lp = torch.log_softmax(t.float() / temperature, dim=-1)
    q, p = lq.exp(), lp.exp()
    if kind == 0:
        loss, grad = plogp_ratio(lp, lq).sum(-1), q - p
    elif kind == 1:
        loss = plogp_ratio(lq, lp).sum(-1)
        grad = torch.where(q > 0, q * (lq - lp - loss[:, None]), 0.0)
    else:
        lm = log_mixture(lp, lq, beta)
        qa = (1 - beta) * plogp_ratio(lq, lm)
        loss = beta * plogp_ratio(lp, lm).sum(-1) + qa.sum(-1)
        a = (1 - beta) * (lq - lm)
        grad = torch.where(q > 0, q * (a - qa.sum(-1, keepdim=True)), 0.0)
    keep = valid.bool()
    losses.copy_(torch.where(keep, loss, 0.0))
    g.copy_(grad * (scale.reshape(-1, 1) / temperature) * keep[:, None])
