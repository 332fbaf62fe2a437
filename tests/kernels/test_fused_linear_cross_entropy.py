"""Fused linear + cross-entropy vs torch's linear + cross_entropy, and its memory."""

import functools
import math

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

import swkernels
from swkernels import reference
from swkernels.memtrack import LiveBytes
from swkernels.ops._loss_kernels import _capped
from swkernels.ops.fused_linear_cross_entropy import fused_linear_ce_bwd, fused_linear_ce_fwd
from tests.utils import collect_each_op

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def torch_ce(h, w, y, label_smoothing=0.0, softcap=None, bias=None, reduction="mean", lse_square_scale=0.0):
    """The peer: torch's cross_entropy on materialised fp32 logits, the z-loss ζ·lse² written out."""
    logits = F.linear(h.float(), w.float(), None if bias is None else bias.float())
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    if not lse_square_scale:
        return F.cross_entropy(logits, y, ignore_index=-100, label_smoothing=label_smoothing, reduction=reduction)
    valid = y != -100
    per = F.cross_entropy(logits, y, ignore_index=-100, label_smoothing=label_smoothing, reduction="none")
    per = per + torch.where(valid, lse_square_scale * torch.logsumexp(logits, dim=-1) ** 2, 0.0)
    return {"none": per, "sum": per.sum(), "mean": per.sum() / valid.sum()}[reduction]


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


def _reduction_case(reduction, dtype, trains, bias, zeta, softcap, smoothing, backend, device):
    """N=37 tokens (shaped (1, 37)), H=24, V=131, several ragged chunks; the forward and every
    gradient under a random upstream gradient (per token for "none") vs the reference and the peer."""
    hidden, weight, b, y = inputs(37, 24, 131, dtype, device, bias)
    y[[4, 20]] = -100
    weight.requires_grad_(trains)
    if b is not None:
        b.requires_grad_(trains)
    hidden3, y2 = hidden.reshape(1, 37, 24), y.reshape(1, 37)
    kw = dict(label_smoothing=smoothing, softcap=softcap, bias=b, reduction=reduction, lse_square_scale=zeta)
    with swkernels.force_backend(backend):
        loss = swkernels.fused_linear_cross_entropy(hidden3, weight, y2, max_chunk_bytes=8 * 131 * 4, **kw)
    assert loss.dtype == torch.float32 and loss.shape == (y2.shape if reduction == "none" else ())
    upstream = torch.randn(loss.shape, device=device) if reduction == "none" else torch.tensor(-0.7, device=device)
    params = [hidden] + ([weight] + ([b] if bias else []) if trains else [])
    grads = torch.autograd.grad(loss, params, upstream)
    ref = reference.linear_cross_entropy(hidden3, weight, y2, **kw)
    peer = torch_ce(hidden, weight, y, smoothing, softcap, b, reduction, zeta)
    tol = TOL[dtype]
    for want in (ref, peer.reshape(ref.shape)):
        torch.testing.assert_close(loss, want, rtol=tol, atol=tol * 1e-2)
        for got, want_g in zip(grads, torch.autograd.grad(want, params, upstream), strict=True):
            assert got.dtype == want_g.dtype and rel(got, want_g) < tol
    if reduction == "none":  # ignored tokens: exactly 0, loss and gradient
        assert torch.count_nonzero(loss[0, [4, 20]]) == 0 and torch.count_nonzero(grads[0][[4, 20]]) == 0


REDUCTION_CASES = [  # reduction, dtype, head trains, bias, z-loss ζ, softcap, label smoothing, backend
    ("none", torch.float32, True, True, 1e-3, None, 0.0, "triton"),
    ("none", torch.float32, False, False, 1e-4, 30.0, 0.1, "triton"),
    ("none", torch.bfloat16, True, False, 1e-4, 30.0, 0.1, "triton"),
    ("none", torch.float16, False, True, 1e-2, None, 0.0, "triton"),
    ("sum", torch.float16, True, True, 1e-4, 5.0, 0.0, "triton"),
    ("mean", torch.bfloat16, True, True, 1e-2, None, 0.1, "triton"),
    ("mean", torch.float32, False, False, 1e-3, 5.0, 0.0, "triton"),
    ("none", torch.float32, True, True, 1e-3, 5.0, 0.1, "torch"),  # the CPU fallback
    ("sum", torch.bfloat16, False, False, 1e-3, None, 0.0, "torch"),
]


@pytest.mark.parametrize("reduction,dtype,trains,bias,zeta,softcap,smoothing,backend", REDUCTION_CASES)
def test_reductions_and_z_loss_match_reference_and_torch(reduction, dtype, trains, bias, zeta, softcap, smoothing,
                                                         backend, device):
    _reduction_case(reduction, dtype, trains, bias, zeta, softcap, smoothing, backend, device)


@pytest.mark.slow
@pytest.mark.parametrize("reduction,dtype", [("none", torch.float16), ("sum", torch.float32), ("sum", torch.bfloat16),
                                             ("mean", torch.float32), ("mean", torch.float16)],
                         ids=["none-fp16", "sum-fp32", "sum-bf16", "mean-fp32", "mean-fp16"])
def test_reductions_and_z_loss_rest_of_the_matrix(reduction, dtype, device):  # trained head: "none" recomputes
    _reduction_case(reduction, dtype, True, True, 1e-3, 30.0, 0.1, "triton", device)


def _matmuls(fn) -> int:
    """aten matmuls run by fn, inside custom ops too (a dispatch mode would not see into them)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key in ("aten::mm", "aten::addmm", "aten::addmm_"))


@pytest.mark.parametrize("trains", [False, True])
def test_per_token_upstream_costs_no_matmul_for_a_frozen_head_and_one_per_chunk_when_it_trains(trains):
    hidden, weight, _, y = inputs(12, 8, 40, torch.float32, "cpu")
    weight.requires_grad_(trains)

    def step(reduction):
        loss = swkernels.fused_linear_cross_entropy(hidden, weight, y, reduction=reduction, max_chunk_bytes=4 * 40 * 4)
        loss.backward(torch.ones_like(loss))

    counts = {reduction: _matmuls(functools.partial(step, reduction)) for reduction in ("mean", "none")}
    chunks = 3
    assert counts["mean"] == chunks * (3 if trains else 2)  # logits, ∂h (and ∂W) per chunk
    assert counts["none"] == counts["mean"] + (chunks if trains else 0)  # the logits again in the backward


def test_without_grad_mode_only_the_logits_matmul_runs():
    hidden, weight, b, y = inputs(12, 8, 40, torch.float32, "cpu", bias=True)
    with_grad = swkernels.fused_linear_cross_entropy(hidden, weight, y, bias=b, max_chunk_bytes=4 * 40 * 4)
    out = []

    def step():
        with torch.no_grad():  # e.g. perplexity evaluation
            out.append(swkernels.fused_linear_cross_entropy(hidden, weight, y, bias=b, max_chunk_bytes=4 * 40 * 4))

    assert _matmuls(step) == 3  # one per chunk: no ∂h, ∂W
    assert torch.equal(out[0], with_grad.detach())


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
    with pytest.raises(ValueError, match="reduction must be 'mean', 'sum' or 'none', got 'avg'"):
        swkernels.fused_linear_cross_entropy(h, w, y, reduction="avg")
    with pytest.raises(ValueError, match="lse_square_scale"):
        swkernels.fused_linear_cross_entropy(h, w, y, lse_square_scale=-1e-4)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_custom_op_registration_is_consistent(reduction, device):
    with torch.device(device):  # the GPU when present: its kernels, its allocations
        h, w, b, y = inputs(6, 8, 40, torch.float32, device, bias=True)
        torch.library.opcheck(fused_linear_ce_fwd, (h, w, b, y, -100, 0.1, 0.0, 4, True, reduction, "triton", 1e-3))
        if reduction == "none":  # the trained head's backward: the chunk loop with per-row scales
            args = (h.detach(), w.detach(), b.detach(), y, torch.randn(6), -100, 0.1, 0.0, 1e-3, 4, "triton")
            torch.library.opcheck(fused_linear_ce_bwd, args)  # not differentiable itself: no double backward


def test_torch_compile_traces_per_token_losses_and_the_recomputing_backward():
    hidden, weight, b, y = inputs(9, 8, 13, torch.float32, "cpu", bias=True)
    fn = torch.compile(lambda h, w, b_, y_: swkernels.fused_linear_cross_entropy(h, w, y_, bias=b_, reduction="none",
                                                                               lse_square_scale=1e-3),
                       backend="aot_eager", fullgraph=True)
    loss = fn(hidden, weight, b, y)
    upstream = torch.randn(9)
    ref = torch_ce(hidden, weight, y, bias=b, reduction="none", lse_square_scale=1e-3)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for got, want in zip(torch.autograd.grad(loss, (hidden, weight, b), upstream),
                         torch.autograd.grad(ref, (hidden, weight, b), upstream), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n,v,reduction,trains", [(48, 257, "mean", False),
                                                  pytest.param(20, 67, "none", True, marks=pytest.mark.slow)])
def test_fake_impl_allocates_what_the_real_chunks_allocate(n, v, reduction, trains, device):
    with torch.device(device):  # the GPU when present: its kernels, its allocations
        from torch._subclasses.fake_tensor import FakeTensorMode

        def step():
            h = torch.randn(n, 32, dtype=torch.bfloat16, requires_grad=True)
            w = torch.randn(v, 32, dtype=torch.bfloat16, requires_grad=trains)
            loss = swkernels.fused_linear_cross_entropy(h, w, torch.randint(0, v, (n,)), reduction=reduction)
            loss.backward(torch.ones_like(loss))

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


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_vocab_row_masked_to_minus_inf_through_the_bias(backend, device):
    """A -inf bias entry (a vocabulary row masked out) gives torch's finite loss, not 0·inf = NaN."""
    hidden, weight, b, y = inputs(13, 16, 67, torch.float32, device, bias=True)
    with torch.no_grad():
        b[5] = -float("inf")
        y[y == 5] = 6
    with swkernels.force_backend(backend):
        loss = swkernels.fused_linear_cross_entropy(hidden, weight, y, bias=b, max_chunk_bytes=4 * 67 * 4)
    grads = torch.autograd.grad(loss, (hidden, weight, b))
    ref = torch_ce(hidden, weight, y, bias=b)
    ref_grads = torch.autograd.grad(ref, (hidden, weight, b))
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, ref_grads, strict=True):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("bad", [67, 1000, -1, -7])
def test_out_of_range_label_is_an_error(backend, bad):
    hidden, weight, _, y = inputs(5, 8, 67, torch.float32, "cpu")
    y[3] = bad
    with swkernels.force_backend(backend), pytest.raises(ValueError, match=f"label {bad} at position 3"):
        swkernels.fused_linear_cross_entropy(hidden, weight, y)
    y[3] = -100  # ignore_index stays allowed
    with swkernels.force_backend(backend):
        assert torch.isfinite(swkernels.fused_linear_cross_entropy(hidden, weight, y))


def test_out_of_range_label_gives_nan_rows_in_the_kernel_not_a_neighbours_logit(device):
    """Behind the public check, the kernel itself reads nothing outside its row for a bad label."""
    from swkernels.ops._loss_kernels import launch_ce_rows

    logits = torch.randn(3, 20, device=device)
    labels = torch.tensor([2, 20, -4], device=device)
    losses = torch.empty(3, device=device)
    launch_ce_rows(logits, labels, losses, torch.ones(1, device=device), -100, 0.0, None)
    assert torch.isfinite(losses[0]) and torch.isnan(losses[1:]).all()


def test_softcap_is_precise_near_zero(device):
    """c·tanh(x/c) with x/c ~ 1e-4: 2σ(2y)−1 in fp32 would be off by ~1e-3 relative."""
    hidden, weight, _, y = inputs(9, 16, 67, torch.float32, device)
    with swkernels.force_backend("triton"):
        loss = swkernels.fused_linear_cross_entropy(hidden, weight, y, softcap=1e4)
    (g,) = torch.autograd.grad(loss, hidden)
    ref = torch_ce(hidden, weight, y, softcap=1e4)
    (gr,) = torch.autograd.grad(ref, hidden)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    assert rel(g, gr) < 1e-5


@triton.jit
def _tanh_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, _capped(tl.load(x_ptr + offs, mask=offs < n), 1.0, True), mask=offs < n)


def test_kernel_tanh_matches_torch_tanh_in_fp32(device):
    x = torch.cat([torch.logspace(-8, 1.5, 500), -torch.logspace(-8, 1.5, 500), torch.zeros(1)]).to(device)
    out = torch.empty_like(x)
    _tanh_kernel[(triton.cdiv(x.numel(), 256),)](x, out, x.numel(), BLOCK=256)
    want = torch.tanh(x.double())
    assert ((out.double() - want).abs() / want.abs().clamp_min(1e-30)).max() < 5e-7
