"""The two pieces of a causal LM evaluation needs: the decoder's final hidden states and the LM
head. Perplexity feeds them to the fused linear cross-entropy, passkey scoring multiplies only the
answer rows by the head, so no (tokens × vocab) logits exist at any length."""

from __future__ import annotations

import torch
from torch import nn


def causal_lm(model: nn.Module) -> nn.Module:
    """The transformers *ForCausalLM inside a PEFT wrapper, or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def final_hidden(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """(batch, T, H) final hidden states (after the final norm) of ``input_ids`` (batch, T)."""
    out = causal_lm(model).get_decoder()(input_ids=input_ids, use_cache=False)
    return out.last_hidden_state


def output_head(model: nn.Module) -> tuple[nn.Module, float | None]:
    """The LM head (weight (V, H), optional bias) and the final logit soft-cap (Gemma-2), if any."""
    lm = causal_lm(model)
    softcap = getattr(getattr(lm, "config", None), "final_logit_softcapping", None)
    return lm.get_output_embeddings(), softcap


def head_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Logits of a few rows of hidden states (..., H) → (..., V), soft-capped like the model's."""
    head, softcap = output_head(model)
    logits = head(hidden).float()
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    return logits
