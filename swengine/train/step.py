"""One training step, exactly as the loop runs it and as the planner measures it.

Keeping this code in one place is what makes the planner's fake-tensor measurement (and its
analytic model, calibrated on that measurement) describe the real loop.
"""

from __future__ import annotations

import contextlib

import torch


def autocast_context(device_type: str, dtype: torch.dtype | None):
    """bf16/fp16 autocast on the model's device, or nothing for fp32 training."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=dtype)


def _causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers *ForCausalLM inside a PEFT wrapper, or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def label_tokens(batch: dict[str, torch.Tensor]) -> int:
    """How many tokens of a batch carry a loss (labels shifted by one, -100 ignored); counted on
    the CPU tensors the batch stream makes, so no device sync."""
    return int((batch["labels"][:, 1:] != -100).sum())


def causal_lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], fused: bool = False,
                   num_items: int | None = None) -> torch.Tensor:
    """Next-token cross-entropy over label tokens that are not -100: their mean, or with
    ``num_items`` their sum divided by it (the label tokens of a whole optimizer step, so that
    accumulated micro-batches weigh every token the same, as one large batch would).

    Unfused: transformers' own loss (logits upcast to fp32: ~14 B × tokens × vocab at its peak).
    Fused: the decoder's last hidden states go straight into
    :func:`swkernels.fused_linear_cross_entropy` with the LM head's weight (and Gemma-2's final
    soft-cap), so the (tokens × vocab) logits are never materialised. Same loss, same shift."""
    if not fused:
        extra = {} if num_items is None else {"num_items_in_batch": num_items}
        out = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                    position_ids=batch.get("position_ids"), labels=batch["labels"], use_cache=False, **extra)
        return out.loss
    import swkernels

    lm = _causal_lm(model)
    hidden = lm.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                              position_ids=batch.get("position_ids"), use_cache=False).last_hidden_state
    labels = torch.nn.functional.pad(batch["labels"][:, 1:], (0, 1), value=-100)  # token t predicts t + 1
    head = lm.get_output_embeddings()
    softcap = getattr(lm.config, "final_logit_softcapping", None)
    if num_items is None:
        return swkernels.fused_linear_cross_entropy(hidden, head.weight, labels, softcap=softcap, bias=head.bias)
    total = swkernels.fused_linear_cross_entropy(hidden, head.weight, labels, softcap=softcap, bias=head.bias,
                                                 reduction="sum")
    return total / num_items


def forward_backward(model: torch.nn.Module, batch: dict[str, torch.Tensor], *, autocast_dtype: torch.dtype | None,
                     loss_scale: float = 1.0, scaler: torch.amp.GradScaler | None = None,
                     on_phase=None, fused_loss: bool = False, num_items: int | None = None,
                     loss_fn=None) -> torch.Tensor:
    """Forward and backward of one micro-batch; gradients accumulate into ``.grad``.

    Token-weighted accumulation: with ``num_items`` (label tokens of the whole optimizer step) the
    loss is this micro-batch's summed token losses / num_items, so the step's micro-batch losses
    add up to the mean over all its tokens (``loss_scale`` stays 1). Without it, the mean of this
    micro-batch times ``loss_scale``. Returns the detached, unscaled loss, left on the device.
    ``on_phase`` (a callable taking "forward"/"backward") lets the planner label where memory peaks.
    ``loss_fn(model, batch, num_items)``: another loss in place of the causal-LM cross-entropy
    (distillation), run under the same autocast.
    """
    device_type = batch["input_ids"].device.type
    if on_phase:
        on_phase("forward")
    with autocast_context(device_type, autocast_dtype):
        loss = (causal_lm_loss(model, batch, fused_loss, num_items) if loss_fn is None
                else loss_fn(model, batch, num_items))
    if on_phase:
        on_phase("backward")
    scaled = loss * loss_scale
    (scaler.scale(scaled) if scaler is not None else scaled).backward()
    return loss.detach()


def optimizer_step(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], *,
                   max_grad_norm: float | None, scaler: torch.amp.GradScaler | None = None) -> torch.Tensor | None:
    """Unscale (fp16), clip, step, zero grads (set to None, freeing them). Returns the grad norm."""
    norm = clip_gradients(optimizer, params, max_grad_norm=max_grad_norm, scaler=scaler) if max_grad_norm else None
    apply_update(optimizer, scaler)  # (the scaler unscales here when clipping did not)
    return norm


def clip_gradients(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], *,
                   max_grad_norm: float | None, scaler: torch.amp.GradScaler | None = None) -> torch.Tensor:
    """Unscale (fp16) and clip to ``max_grad_norm`` (0/None: no clipping); the pre-clipping norm,
    left on the device (the circuit breaker reads it with the loss, once per step)."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    return torch.nn.utils.clip_grad_norm_(params, max_grad_norm or float("inf"))


def discard_update(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None = None) -> None:
    """Drop this step's gradients without updating (the breaker's skip / rollback / stop)."""
    if scaler is not None:
        scaler.update()
    optimizer.zero_grad(set_to_none=True)


def apply_update(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None = None) -> None:
    """Step (through the fp16 scaler when there is one) and free the gradients."""
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
