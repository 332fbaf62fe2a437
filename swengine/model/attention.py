"""Our attention entry for transformers' AttentionInterface: SDPA without a materialised mask.

transformers builds a (batch, 1, seq, seq) mask whenever it cannot prove there is no padding,
which includes every run on fake tensors (the planner) and every packed batch. Registering our
own implementation name (the public ``AttentionInterface.register`` extension point) makes the
model skip mask creation; we then call SDPA with ``is_causal=True`` (flash / memory-efficient
kernels, O(seq) memory), native GQA (no repeat_kv copies), and handle the two cases that need
more: packed documents (position_ids restarting at 0: attention stays inside each document) and
sliding-window layers longer than their window. Packed CUDA batches in fp16/bf16 go to
flash-attn's varlen kernel when it is installed (one launch for all documents); otherwise short
rows take one SDPA call with a block-diagonal causal mask built from position_ids, and long rows
(whose mask would be large) one SDPA call per document.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NAME = "swengine_sdpa"
# a packed batch gets one masked SDPA call while its boolean mask (batch × seq² bytes) stays this
# small; above it, one call per document (no mask at all). Many small calls cost far more than
# one masked call on short rows (the demo's 128-token rows hold ~40 documents each).
PACKED_MASK_MAX_BYTES = 16 * 2**20


def _document_lengths(position_ids: torch.Tensor) -> list[list[int]]:
    """Per batch row, the lengths of the documents packed in it (a document starts where position is 0)."""
    rows = []
    for row in position_ids.tolist():
        starts = [i for i, p in enumerate(row) if p == 0] or [0]
        if starts[0] != 0:
            starts.insert(0, 0)
        rows.append([b - a for a, b in zip(starts, starts[1:] + [len(row)], strict=True)])
    return rows


def _is_packed(position_ids: torch.Tensor | None, seq_len: int) -> bool:
    if position_ids is None or position_ids.device.type == "meta":
        return False
    from torch._subclasses.fake_tensor import FakeTensor

    if isinstance(position_ids, FakeTensor):
        return False  # planner runs: unpacked batches by construction
    return bool((position_ids[:, 1:] == 0).any())


def _varlen_for(query: torch.Tensor):
    if query.device.type != "cuda" or query.dtype not in (torch.float16, torch.bfloat16):
        return None
    return _flash_varlen()


def _flash_varlen():
    """flash-attn's varlen entry point, or None when it is not installed."""
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


def _packed_varlen(varlen, query, key, value, lengths: list[list[int]], window, dropout, scaling):
    """All documents of all rows as one varlen call: tokens flattened, documents delimited by cu_seqlens."""
    b, hq, s, d = query.shape
    flat = [n for row in lengths for n in row]
    cu = torch.zeros(len(flat) + 1, dtype=torch.int32, device=query.device)
    cu[1:] = torch.cumsum(torch.tensor(flat, dtype=torch.int32, device=query.device), 0)
    q, k, v = (t.transpose(1, 2).reshape(b * s, t.shape[1], d) for t in (query, key, value))
    out = varlen(q, k, v, cu, cu, max(flat), max(flat), dropout_p=dropout, softmax_scale=scaling, causal=True,
                 window_size=(window - 1, 0) if window else (-1, -1))
    return out.view(b, s, hq, d)


def _sliding_mask(seq_len: int, window: int, device) -> torch.Tensor:
    i = torch.arange(seq_len, device=device)
    diff = i[:, None] - i[None, :]
    return (diff >= 0) & (diff < window)


def _document_mask(position_ids: torch.Tensor, window: int | None) -> torch.Tensor:
    """(b, 1, s, s) bool: token i sees token j of its own document with j <= i (and i - j < window)."""
    doc = (position_ids == 0).cumsum(-1)
    i = torch.arange(position_ids.shape[-1], device=position_ids.device)
    diff = i[:, None] - i[None, :]
    allowed = diff >= 0
    if window:
        allowed = allowed & (diff < window)
    return ((doc[:, :, None] == doc[:, None, :]) & allowed)[:, None]


def sdpa_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                   **kwargs):
    """query (b, hq, s, d), key/value (b, hkv, s, d) → (b, s, hq, d), no attention weights."""
    b, hq, s, _ = query.shape
    gqa = key.shape[1] != hq
    # transformers passes the layer's window (Mistral and Phi-3 only pass it, as the config's)
    window = kwargs["sliding_window"] if "sliding_window" in kwargs else getattr(module, "sliding_window", None)
    dropout = dropout if module.training else 0.0
    position_ids = kwargs.get("position_ids")
    packed = attention_mask is None and _is_packed(position_ids, s)  # one device sync per call, not three
    if attention_mask is not None:  # an explicit (custom) mask always wins
        mask = attention_mask[:, :, :, : key.shape[-2]]
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling,
                                             enable_gqa=gqa)
    elif packed and (varlen := _varlen_for(query)) is not None:
        return _packed_varlen(varlen, query, key, value, _document_lengths(position_ids), window, dropout,
                              scaling), None
    elif packed and b * s * s <= PACKED_MASK_MAX_BYTES:
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=_document_mask(position_ids, window),
                                             dropout_p=dropout, scale=scaling, enable_gqa=gqa)
    elif packed:
        out = torch.empty_like(query)
        for row, lengths in enumerate(_document_lengths(position_ids)):
            start = 0
            for n in lengths:
                sl = slice(start, start + n)
                q, k, v = query[row:row + 1, :, sl], key[row:row + 1, :, sl], value[row:row + 1, :, sl]
                mask = _sliding_mask(n, window, query.device) if window and n > window else None
                out[row:row + 1, :, sl] = F.scaled_dot_product_attention(
                    q, k, v, attn_mask=mask, is_causal=mask is None, dropout_p=dropout, scale=scaling, enable_gqa=gqa)
                start += n
    elif window and s > window:
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=_sliding_mask(s, window, query.device),
                                             dropout_p=dropout, scale=scaling, enable_gqa=gqa)
    else:
        out = F.scaled_dot_product_attention(query, key, value, is_causal=s > 1, dropout_p=dropout, scale=scaling,
                                             enable_gqa=gqa)
    return out.transpose(1, 2).contiguous(), None


def register() -> str:
    """Register the implementation with transformers (idempotent) and return its name."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, sdpa_attention)
    return NAME


def implementation_for(config, requested: str = "sdpa") -> str:
    """The attention implementation to build a model with: ours for "sdpa", except for models whose
    attention needs logit soft-capping (Gemma-2), which SDPA cannot express: those use "eager"."""
    if requested == "eager" or getattr(config, "attn_logit_softcapping", None):
        return "eager"
    return register()
