"""The distillation loss of one micro-batch, fused with both LM heads.

    loss = [(1 − α)·Σ CE_i + α·Σ KD_i] / num_items        (i: tokens whose label is not -100)

``alpha`` = ``distill.alpha`` weighs KD against the hard-label CE; KD is ``distill.kind``
(forward_kl | reverse_kl | jsd with ``distill.beta``) between softmax(teacher/T) and
softmax(student/T), T = ``distill.temperature``. Shift and masking are those of
:func:`swengine.train.step.causal_lm_loss`: position t predicts token t + 1, and with
``num_items`` (the label tokens of the whole optimizer step) the summed token losses are divided
by it, so accumulated micro-batches weigh every token alike (without it: the mean over this
micro-batch's label tokens).

The student's decoder hidden states and the teacher's (under ``torch.no_grad``) go into
:func:`swkernels.fused_linear_distill` with both LM-head weights: neither model's
(tokens × vocab) logits are materialised. Student and teacher may differ in depth and hidden
width; they share the vocabulary (``vocab_size`` from :func:`swengine.distill.teacher.check_vocab`
cuts padded heads to it).

Offline teacher: ``topk=(logprobs, indices)``, each (batch, seq, k), from
:meth:`swengine.distill.cache.Cache.batch_topk`, replaces the teacher model; KD then runs over the
teacher's top-k tokens, both distributions renormalised over them (raw T=1 log-probs are cached;
the temperature applies here). At k = vocabulary size this is the online loss exactly.

Telemetry parts (``parts=True``): ``kd_part`` = Σ KD_i / num_items and ``ce_part`` =
Σ CE_i / num_items, so loss = (1 − α)·ce_part + α·kd_part (with ``scale_by_t2``, KD_i carries the
T² factor). Exact, and cheap: one extra *forward-only* pass of the fused op over the hidden states
already computed (α = 1, per-token reduction: the two head matmuls per chunk, none of the three
gradient matmuls, no decoder re-run); CE then follows from the loss by linearity. At α = 1 (no CE)
or α = 0 (no KD wanted) the extra pass is skipped. Pass ``parts=False`` on steps that log nothing.
"""

from __future__ import annotations

import torch

KINDS = ("forward_kl", "reverse_kl", "jsd")


def shifted_labels(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Labels aligned with the hidden states: position t is scored against token t + 1."""
    return torch.nn.functional.pad(batch["labels"][:, 1:], (0, 1), value=-100)


def decoder_hidden(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The decoder's last hidden states (batch, seq, hidden), as the fused CE path computes them."""
    from swengine.train.step import _causal_lm

    return _causal_lm(model).get_decoder()(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                                           position_ids=batch.get("position_ids"), use_cache=False).last_hidden_state


def _check(kind: str, temperature: float, alpha: float, beta: float) -> None:
    from swengine.errors import UserError

    if kind not in KINDS:
        raise UserError(f"distill.kind must be one of {', '.join(KINDS)} (got {kind!r})")
    if not temperature > 0:
        raise UserError(f"distill.temperature must be > 0 (got {temperature})")
    if not 0.0 <= alpha <= 1.0:
        raise UserError(f"distill.alpha must be in [0, 1] (got {alpha}): the weight of KD against the hard-label CE")
    if not 0.0 <= beta <= 1.0:
        raise UserError(f"distill.beta must be in [0, 1] (got {beta})")


def distill_step_loss(student: torch.nn.Module, teacher_or_none: torch.nn.Module | None,
                      batch: dict[str, torch.Tensor], *, kind: str = "forward_kl", temperature: float = 1.0,
                      alpha: float = 0.5, beta: float = 0.5, num_items: int | None = None,
                      topk: tuple[torch.Tensor, torch.Tensor] | None = None, vocab_size: int | None = None,
                      scale_by_t2: bool = False, parts: bool = True,
                      ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(loss, ce_part, kd_part) of one micro-batch; see the module doc. ``loss`` carries the
    gradient (call ``.backward()`` on it, scaled as the loop scales); the parts are detached
    (None with ``parts=False``). Give the teacher model, or ``topk`` from the offline cache.
    ``vocab_size``: the shared vocabulary: :func:`~swengine.distill.teacher.check_vocab`'s result
    online, ``Cache.vocab_size`` offline. Pass it whenever a head has padding rows: without it
    the CE runs over every row of the student's head (as the plain fused CE does), with it over
    the real vocabulary, in both paths alike (online, different head sizes require it)."""
    import swkernels
    from swengine.distill.teacher import lm_head

    _check(kind, temperature, alpha, beta)
    if (teacher_or_none is None) == (topk is None):
        raise ValueError("distill_step_loss: give a teacher model or topk from a distill cache, not both or neither")
    labels = shifted_labels(batch)
    hidden = decoder_hidden(student, batch)
    s_head = lm_head(student, "student").weight
    if topk is not None:
        logprobs, indices = topk
        teacher = dict(teacher_topk=(logprobs.to(hidden.device), indices.to(hidden.device)))
    else:
        t_head = lm_head(teacher_or_none, "teacher").weight
        with torch.no_grad():
            t_hidden = decoder_hidden(teacher_or_none, batch)
        teacher = dict(teacher_hidden=t_hidden, teacher_head_weight=t_head)
    common = dict(kind=kind, temperature=temperature, beta=beta, vocab_size=vocab_size, scale_by_t2=scale_by_t2,
                  **teacher)
    reduction = "mean" if num_items is None else "sum"
    loss = swkernels.fused_linear_distill(hidden, s_head, labels=labels, alpha=alpha, reduction=reduction, **common)
    if num_items is not None:
        loss = loss / num_items
    if not parts:
        return loss, None, None
    loss_d = loss.detach()
    if alpha == 0.0:
        return loss, loss_d, torch.zeros_like(loss_d)
    if alpha == 1.0:
        kd = loss_d
    else:
        kd = _kd_part(swkernels, hidden, s_head, labels, num_items, common)
    ce = (loss_d - alpha * kd) / (1.0 - alpha) if alpha < 1.0 else torch.zeros_like(loss_d)
    return loss, ce, kd


def _kd_part(swkernels, hidden, s_head, labels, num_items, common) -> torch.Tensor:
    """Σ KD_i / num_items (or the mean), from a forward-only pass: reduction="none" with a head
    that "trains" makes the op skip its gradient matmuls in forward (it would recompute them in
    backward, which never runs here)."""
    with torch.no_grad():
        head = s_head.detach().requires_grad_(True)
        per_token = swkernels.fused_linear_distill(hidden.detach(), head, labels=labels, alpha=1.0, reduction="none",
                                                   **common)
    total = per_token.sum()
    if num_items is not None:
        return total / num_items
    return total / (labels != -100).sum().clamp(min=1)
