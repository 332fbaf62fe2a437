"""Our SDPA attention entry: causal, GQA, sliding window, packed documents (per-document SDPA and
the flash-attn varlen wiring), against an explicit masked-softmax reference."""

from types import SimpleNamespace

import pytest
import torch

from swengine.model import attention


def reference(q, k, v, allowed):
    """Masked softmax attention; allowed (s, s) or (b, s, s) bool; GQA by repeating K/V heads."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    if allowed.dim() == 3:
        allowed = allowed[:, None]
    scores = scores.masked_fill(~allowed, float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2)


def packed_allowed(position_ids, window=None):
    """Causal inside each document (a document starts where the position is 0), optional window."""
    b, s = position_ids.shape
    doc = (position_ids == 0).cumsum(1)
    i = torch.arange(s)
    causal = i[:, None] >= i[None, :]
    same = doc[:, :, None] == doc[:, None, :]
    allowed = causal & same
    if window:
        allowed &= (i[:, None] - i[None, :]) < window
    return allowed


def qkv(b=2, hq=4, hkv=2, s=11, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, hq, s, d, generator=g), torch.randn(b, hkv, s, d, generator=g),
            torch.randn(b, hkv, s, d, generator=g))


MODULE = SimpleNamespace(training=False, sliding_window=None)
POSITIONS = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4]])


@pytest.mark.parametrize("window", [None, 3])
def test_unpacked_is_causal_with_gqa_and_window(window):
    q, k, v = qkv()
    module = SimpleNamespace(training=False, sliding_window=window)
    out, weights = attention.sdpa_attention(module, q, k, v, None)
    i = torch.arange(q.shape[2])
    allowed = i[:, None] >= i[None, :]
    if window:
        allowed &= (i[:, None] - i[None, :]) < window
    assert weights is None
    torch.testing.assert_close(out, reference(q, k, v, allowed), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mask_max_bytes", [attention.PACKED_MASK_MAX_BYTES, 0], ids=["one-masked-call", "per-document"])
@pytest.mark.parametrize("window", [None, 2])
def test_packed_documents_do_not_attend_across(window, mask_max_bytes, monkeypatch):
    monkeypatch.setattr(attention, "PACKED_MASK_MAX_BYTES", mask_max_bytes)
    q, k, v = qkv()
    module = SimpleNamespace(training=False, sliding_window=window)
    out, _ = attention.sdpa_attention(module, q, k, v, None, position_ids=POSITIONS)
    torch.testing.assert_close(out, reference(q, k, v, packed_allowed(POSITIONS, window)), atol=1e-5, rtol=1e-5)
    # changing the first document leaves every later document's output untouched
    k2 = k.clone()
    k2[0, :, :4] += torch.randn(k2[0, :, :4].shape)
    out2, _ = attention.sdpa_attention(module, q, k2, v, None, position_ids=POSITIONS)
    torch.testing.assert_close(out2[0, 4:], out[0, 4:])
    assert not torch.allclose(out2[0, :4], out[0, :4])


def varlen_reference(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=None, causal=False,
                     window_size=(-1, -1)):
    """flash_attn_varlen_func's contract on (tokens, heads, dim) tensors, in plain torch."""
    assert cu_q.dtype == torch.int32 and torch.equal(cu_q, cu_k) and causal and dropout_p == 0.0
    assert max_q == max_k == int((cu_q[1:] - cu_q[:-1]).max())
    out = torch.empty_like(q)
    for a, b in zip(cu_q[:-1].tolist(), cu_q[1:].tolist(), strict=True):
        n = b - a
        i = torch.arange(n)
        allowed = i[:, None] >= i[None, :]
        if window_size[0] >= 0:
            allowed &= (i[:, None] - i[None, :]) <= window_size[0]
        seg = [t[a:b].transpose(0, 1)[None] for t in (q, k, v)]
        out[a:b] = reference(*seg, allowed)[0]
    return out


@pytest.mark.parametrize("window", [None, 2])
def test_packed_batches_use_flash_varlen_when_available(monkeypatch, window):
    calls = []

    def fake_varlen(*args, **kwargs):
        calls.append(args[3].tolist())
        return varlen_reference(*args, **kwargs)

    monkeypatch.setattr(attention, "_varlen_for", lambda query: fake_varlen)
    q, k, v = qkv()
    module = SimpleNamespace(training=False, sliding_window=window)
    out, _ = attention.sdpa_attention(module, q, k, v, None, position_ids=POSITIONS)
    assert calls == [[0, 4, 7, 11, 17, 22]]  # one launch, documents of both rows delimited
    torch.testing.assert_close(out, reference(q, k, v, packed_allowed(POSITIONS, window)), atol=1e-5, rtol=1e-5)


def test_varlen_is_only_chosen_for_cuda_half_precision():
    q = torch.zeros(1, 2, 3, 4, dtype=torch.bfloat16)
    assert attention._varlen_for(q) is None  # CPU: per-document SDPA
