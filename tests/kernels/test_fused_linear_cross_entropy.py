"""Fused linear + cross-entropy vs torch's linear + cross_entropy, and its memory."""

import math

import pytest
import torch
import torch.nn.functional as F

import swkernels
from swkernels.memtrack import LiveBytes
from swkernels.ops.fused_linear_cross_entropy import fused_linear_ce_fwd
from tests.utils import collect_each_op

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def torch_ce(h, w, y, label_smoothing=0.0, softcap=None, bias=None, reduction="mean"):
    logits = F.linear(h.float(), w.float(), None if bias is None else bias.float())
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(logits, y, ignore_index=-100, label_smoothing=label_smoothing, reduction=reduction)


def inputs(n, h, v, dtype, device, bias=False):
    hidden = torch.randn(n, h, device=device).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, device=device) / math.sqrt(h)).to(dtype).requires_grad_()
    b = torch.randn(v, device=device).to(dtype).requires_grad_() if bias else None
    y = torch.randint(0, v, (n,), device=device)
    y[1] = -100
    return hidden, weight, b, y


@pytest.mark.parametrize("backend", ["triton", "torch"])  # torch: the chunked CPU fallback
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("smoothing,softcap,bias,reduction", [(0.0, None, False, "mean"), (0.1, 30.0, True, "mean"),
                                                               (0.0, 5.0, False, "sum")])
def test_matches_torch_cross_entropy(backend, dtype, smoothing, softcap, bias, reduction, device):
    hidden, weight, b, y = inputs(37, 24, 301, dtype, device, bias)
    # a small chunk budget forces several chunks (and a ragged last one)
    with swkernels.force_backend(backend):
        loss = swkernels.fused_linear_cross_entropy(hidden, weight, y, label_smoothing=smoothing, softcap=softcap,
                                                    bias=b, reduction=reduction, max_chunk_bytes=8 * 301 * 4)
    params = [hidden, weight] + ([b] if bias else [])
    grads = torch.autograd.grad(loss * 0.7, params)
    ref = torch_ce(hidden, weight, y, smoothing, softcap, b, reduction)
    ref_grads = torch.autograd.grad(ref * 0.7, params)
    torch.testing.assert_close(loss, ref, rtol=TOL[dtype], atol=1e-5)
    for got, want in zip(grads, ref_grads, strict=True):
        assert got.dtype == want.dtype
        assert rel(got, want) < TOL[dtype]


@pytest.mark.parametrize("v", [32001, 151936])
def test_large_odd_vocabularies(v, device):
    hidden, weight, _, y = inputs(3, 8, v, torch.float32, device)
    loss = swkernels.fused_linear_cross_entropy(hidden, weight, y)
    (g,) = torch.autograd.grad(loss, hidden)
    ref = torch_ce(hidden, weight, y)
    (gr,) = torch.autograd.grad(ref, hidden)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    assert rel(g, gr) < 1e-4


def test_frozen_head_gets_no_gradient(device):
    hidden, weight, _, y = inputs(9, 16, 50, torch.float32, device)
    weight.requires_grad_(False)
    loss = swkernels.fused_linear_cross_entropy(hidden, weight, y)
    loss.backward()
    assert weight.grad is None and hidden.grad is not None


def test_bad_inputs_say_how_to_fix():
    h, w, _, y = inputs(4, 8, 20, torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"weight must be \(vocab, 8\)"):
        swkernels.fused_linear_cross_entropy(h, w.t(), y)
    with pytest.raises(ValueError, match="reduction"):
        swkernels.fused_linear_cross_entropy(h, w, y, reduction="none")


def test_custom_op_registration_is_consistent(device):
    with torch.device(device):  # the GPU when present: its kernels, its allocations
        h, w, b, y = inputs(6, 8, 40, torch.float32, device, bias=True)
        torch.library.opcheck(fused_linear_ce_fwd, (h, w, b, y, -100, 0.1, 0.0, 4, True, "mean", "triton"))


def test_fake_impl_allocates_what_the_real_chunks_allocate(device):
    with torch.device(device):  # the GPU when present: its kernels, its allocations
        from torch._subclasses.fake_tensor import FakeTensorMode

        def step():
            h = torch.randn(48, 32, dtype=torch.bfloat16, requires_grad=True)
            w = torch.randn(257, 32, dtype=torch.bfloat16)
            swkernels.fused_linear_cross_entropy(h, w, torch.randint(0, 257, (48,))).backward()

        with swkernels.force_backend("triton"), LiveBytes() as real, collect_each_op():
            step()
        with FakeTensorMode(), swkernels.force_backend("triton"), LiveBytes() as fake:
            step()
        assert fake.peak == real.peak > 0


def test_peak_memory_far_below_the_unfused_path_at_128k_vocab():
    """Fake tensors: BT = 4096 tokens, H = 4096, V = 128,256, bf16 (Llama-3-8B's head)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    n, h, v = 4096, 4096, 128_256
    with FakeTensorMode():
        hidden = torch.empty(n, h, dtype=torch.bfloat16, requires_grad=True)
        weight = torch.empty(v, h, dtype=torch.bfloat16)
        y = torch.zeros(n, dtype=torch.long)
        with LiveBytes() as unfused:  # what transformers does: bf16 logits, upcast, cross_entropy
            F.cross_entropy((hidden @ weight.t()).float(), y).backward()
        hidden.grad = None
        with swkernels.force_backend("triton"), LiveBytes() as fused:
            swkernels.fused_linear_cross_entropy(hidden, weight, y).backward()
    assert unfused.peak > 11.5 * n * v  # bf16 logits + fp32 copy + log-softmax + its gradient
    assert fused.peak < unfused.peak / 8, (fused.peak / 2**30, unfused.peak / 2**30)
