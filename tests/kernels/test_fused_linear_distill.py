"""Fused linear distillation vs unfused linear + loss, top-k teachers and padded vocabularies."""

import math

import pytest
import torch
import torch.nn.functional as F

import swkernels
from swkernels import reference
from swkernels.memtrack import LiveBytes
from swkernels.ops.fused_linear_distill import fused_linear_distill_bwd, fused_linear_distill_fwd
from tests.kernels.test_distill_loss import peer_divergence
from tests.utils import collect_each_op

TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def setup_models(n=29, h=16, vs=203, vt=203, dtype=torch.float32, device="cpu"):
    hs = torch.randn(n, h, device=device).to(dtype).requires_grad_()
    ws = (torch.randn(vs, h, device=device) / math.sqrt(h)).to(dtype).requires_grad_()
    ht = torch.randn(n, h, device=device).to(dtype)
    wt = (torch.randn(vt, h, device=device) * 2 / math.sqrt(h)).to(dtype)
    y = torch.randint(0, min(vs, vt), (n,), device=device)
    y[[0, 5]] = -100
    return hs, ws, ht, wt, y


@pytest.mark.parametrize("kind,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3)])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", ["triton", "torch"])  # torch: the chunked CPU fallback
def test_matches_unfused_linear_plus_loss(kind, beta, alpha, dtype, backend, device):
    hs, ws, ht, wt, y = setup_models(dtype=dtype, device=device)
    with swkernels.force_backend(backend):
        loss = swkernels.fused_linear_distill(hs, ws, ht, wt, y, kind, 2.0, beta, alpha, scale_by_t2=True,
                                             max_chunk_bytes=8 * 203 * 4)
    gh, gw = torch.autograd.grad(loss * 1.3, (hs, ws))
    ref = reference.linear_distill(hs, ws, ht, wt, y, kind, 2.0, beta, alpha, scale_by_t2=True)
    gh_r, gw_r = torch.autograd.grad(ref * 1.3, (hs, ws))
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(loss, ref, rtol=tol, atol=1e-5)
    assert rel(gh, gh_r) < tol and rel(gw, gw_r) < tol


def peer_linear_distill(hs, ws, ht, wt, y, kind, temperature, beta, alpha, t2, reduction, zeta, topk=None):
    """The peer, on materialised fp32 logits: (1−α)·(torch's cross_entropy + ζ·logsumexp² written
    out) + α·T²·(torch's kl_div), per token, 0 on ignored tokens, then reduced."""
    s = hs.reshape(-1, hs.shape[-1]).float() @ ws.float().t()
    valid = y != -100
    if topk is None:
        kd = peer_divergence(s, ht.float() @ wt.float().t(), kind, beta, temperature)
    else:  # the teacher's top-k support, both distributions renormalised over it
        kd = peer_divergence(s.gather(1, topk[1]), topk[0], kind, beta, temperature)
    per = alpha * (temperature**2 if t2 else 1.0) * kd
    if alpha < 1.0:
        ce = F.cross_entropy(s, y, reduction="none") + zeta * torch.logsumexp(s, dim=-1) ** 2
        per = per + (1 - alpha) * ce
    per = torch.where(valid, per, 0.0)
    return {"none": per, "sum": per.sum(), "mean": per.sum() / valid.sum()}[reduction]


def _reduction_case(kind, beta, alpha, reduction, dtype, trains, zeta, teacher, backend, device):
    """29 tokens (shaped (1, 29)), H=16, V=203, several ragged chunks, T = 2 with ×T²; the loss and
    every gradient under a random upstream gradient (per token for "none") vs the reference and
    the peer."""
    hs, ws, ht, wt, y = setup_models(dtype=dtype, device=device)
    ws.requires_grad_(trains)
    topk = F.log_softmax(ht.float() @ wt.float().t(), dim=-1).topk(8, dim=-1) if teacher == "topk" else None
    kw = dict(kind=kind, temperature=2.0, beta=beta, alpha=alpha, scale_by_t2=True, reduction=reduction)
    teacher_args = dict(teacher_topk=(topk[0].to(dtype), topk[1])) if topk is not None else dict(
        teacher_hidden=ht, teacher_head_weight=wt)
    with swkernels.force_backend(backend):
        loss = swkernels.fused_linear_distill(hs.reshape(1, 29, 16), ws, labels=y.reshape(1, 29), **teacher_args,
                                              max_chunk_bytes=8 * 203 * 4, lse_square_scale=zeta, **kw)
    assert loss.dtype == torch.float32 and loss.shape == ((1, 29) if reduction == "none" else ())
    loss = loss.reshape(-1) if reduction == "none" else loss
    upstream = torch.randn(loss.shape, device=device) if reduction == "none" else torch.tensor(1.3, device=device)
    params = (hs, ws) if trains else (hs,)
    grads = torch.autograd.grad(loss, params, upstream)
    wants = [peer_linear_distill(hs, ws, ht, wt, y, kind, 2.0, beta, alpha, True, reduction, zeta,
                                 None if topk is None else (topk[0].to(dtype), topk[1]))]
    if topk is None:
        wants.append(reference.linear_distill(hs, ws, ht, wt, y, lse_square_scale=zeta, **kw))
    tol = TOL[dtype]
    for want in wants:
        torch.testing.assert_close(loss, want, rtol=tol, atol=tol * 1e-2)
        for got, g_want in zip(grads, torch.autograd.grad(want, params, upstream), strict=True):
            assert got.dtype == g_want.dtype and rel(got, g_want) < tol
    if reduction == "none":  # ignored tokens: exactly 0, loss and gradient
        assert torch.count_nonzero(loss[[0, 5]]) == 0 and torch.count_nonzero(grads[0][[0, 5]]) == 0


REDUCTION_CASES = [  # kind, beta, alpha, reduction, dtype, head trains, z-loss ζ, teacher, backend
    ("jsd", 0.3, 0.5, "none", torch.float32, True, 1e-3, "full", "triton"),
    ("forward_kl", 0.5, 0.0, "none", torch.bfloat16, False, 1e-3, "full", "triton"),
    ("reverse_kl", 0.5, 1.0, "none", torch.float16, True, 0.0, "full", "triton"),
    ("forward_kl", 0.5, 0.5, "none", torch.float32, True, 1e-2, "topk", "triton"),
    ("forward_kl", 0.5, 0.5, "sum", torch.float32, True, 1e-3, "full", "triton"),
    ("reverse_kl", 0.5, 0.5, "mean", torch.bfloat16, True, 1e-2, "full", "triton"),
    ("jsd", 0.5, 0.5, "none", torch.float32, True, 1e-3, "full", "torch"),  # the CPU fallback
    ("forward_kl", 0.5, 0.5, "none", torch.float32, True, 1e-3, "topk", "torch"),
]


@pytest.mark.parametrize("kind,beta,alpha,reduction,dtype,trains,zeta,teacher,backend", REDUCTION_CASES)
def test_reductions_and_z_loss_match_reference_and_torch(kind, beta, alpha, reduction, dtype, trains, zeta, teacher,
                                                         backend, device):
    _reduction_case(kind, beta, alpha, reduction, dtype, trains, zeta, teacher, backend, device)


@pytest.mark.slow
@pytest.mark.parametrize("reduction,dtype", [("none", torch.bfloat16), ("sum", torch.float16), ("mean", torch.float32)],
                         ids=["none-bf16", "sum-fp16", "mean-fp32"])
def test_reductions_and_z_loss_more(reduction, dtype, device):  # the trained head: "none" recomputes
    _reduction_case("jsd", 0.3, 0.5, reduction, dtype, True, 1e-3, "full", "triton", device)


@pytest.mark.parametrize("reduction", [pytest.param("mean", marks=pytest.mark.slow), "none"])
def test_custom_ops_are_consistent(reduction, device):
    with torch.device(device):  # the GPU when present: its kernels, its allocations
        hs, ws, ht, wt, y = setup_models(n=6, h=8, vs=40, vt=40, device=device)
        args = (hs, ws, ht, wt, None, None, y, 2, 1.5, 0.4, 0.5, -100, 40, 4, True, True, "triton", reduction, 1e-3)
        torch.library.opcheck(fused_linear_distill_fwd, args)
        if reduction == "none":  # the trained head's backward: the chunk loop with per-row scales
            bwd = (hs.detach(), ws.detach(), ht, wt, None, None, y, torch.randn(6), 2, 1.5, 0.4, 0.5, -100, 40, 4,
                   True, "triton", 1e-3)
            torch.library.opcheck(fused_linear_distill_bwd, bwd)  # not differentiable itself: no double backward


@pytest.mark.parametrize("reduction", ["mean", "none"])  # none: the padding rows zeroed in the recomputation too
def test_padded_vocabularies_are_trimmed(reduction, device):
    hs, ws, ht, wt, y = setup_models(vs=203, vt=211, device=device)
    loss = swkernels.fused_linear_distill(hs, ws, ht, wt, y, vocab_size=200, reduction=reduction)
    upstream = torch.randn(loss.shape, device=device)
    gh, gw = torch.autograd.grad(loss, (hs, ws), upstream)
    ref = reference.linear_distill(hs, ws, ht, wt, y, vocab_size=200, reduction=reduction)
    gh_r, gw_r = torch.autograd.grad(ref, (hs, ws), upstream)
    torch.testing.assert_close(loss, ref, rtol=2e-5, atol=1e-6)
    assert rel(gh, gh_r) < 2e-5 and rel(gw, gw_r) < 2e-5
    assert torch.count_nonzero(gw[200:]) == 0  # padding rows of the student head get nothing


def test_different_vocabularies_without_vocab_size_is_a_clear_error():
    hs, ws, ht, wt, y = setup_models(vs=203, vt=211)
    with pytest.raises(ValueError, match="pass vocab_size="):
        swkernels.fused_linear_distill(hs, ws, ht, wt, y)
    with pytest.raises(ValueError, match="vocab_size=300 must be in 1..203"):
        swkernels.fused_linear_distill(hs, ws, ht, wt, y, vocab_size=300)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl"])
def test_topk_teacher(kind, device):
    hs, ws, ht, wt, y = setup_models(device=device)
    teacher_logprobs = F.log_softmax(ht.float() @ wt.float().t(), dim=-1)
    vals, idx = teacher_logprobs.topk(8, dim=-1)
    loss = swkernels.fused_linear_distill(hs, ws, labels=y, kind=kind, alpha=0.5, teacher_topk=(vals, idx))
    gh, gw = torch.autograd.grad(loss, (hs, ws))
    s = hs @ ws.t()
    valid = y != -100
    per = reference.topk_distill_per_token(s, vals, idx, kind, 1.0, 0.5)
    ref = 0.5 * F.cross_entropy(s, y) + 0.5 * (per * valid).sum() / valid.sum()
    gh_r, gw_r = torch.autograd.grad(ref, (hs, ws))
    torch.testing.assert_close(loss, ref, rtol=2e-5, atol=1e-6)
    assert rel(gh, gh_r) < 2e-5 and rel(gw, gw_r) < 2e-5


def test_without_grad_mode_only_the_logits_matmuls_run():
    hs, ws, ht, wt, y = setup_models()

    def run(grad: bool):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof, \
                torch.set_grad_enabled(grad):
            loss = swkernels.fused_linear_distill(hs, ws, ht, wt, y, "jsd", max_chunk_bytes=8 * 203 * 4)
        return loss, sum(e.count for e in prof.key_averages() if e.key in ("aten::mm", "aten::addmm", "aten::addmm_"))

    (with_grad, mm_grad), (without, mm) = run(True), run(False)
    chunks = 8
    assert mm_grad == 4 * chunks and mm == 2 * chunks  # student and teacher logits only: no ∂h, ∂W
    assert torch.equal(without, with_grad.detach())


def test_teacher_must_be_given_one_way():
    hs, ws, ht, wt, y = setup_models()
    with pytest.raises(ValueError, match="either"):
        swkernels.fused_linear_distill(hs, ws, ht, None, y)
    with pytest.raises(ValueError, match="reduction must be 'mean', 'sum' or 'none', got 'avg'"):
        swkernels.fused_linear_distill(hs, ws, ht, wt, y, reduction="avg")
    with pytest.raises(ValueError, match="lse_square_scale"):
        swkernels.fused_linear_distill(hs, ws, ht, wt, y, lse_square_scale=float("nan"))


@pytest.mark.parametrize("n,reduction", [(40, "mean"), pytest.param(12, "none", marks=pytest.mark.slow)])
def test_fake_impl_allocates_what_the_real_chunks_allocate(n, reduction, device):
    with torch.device(device):  # the GPU when present: its kernels, its allocations
        from torch._subclasses.fake_tensor import FakeTensorMode

        def step():
            hs = torch.randn(n, 32, dtype=torch.bfloat16, requires_grad=True)
            ws = torch.randn(130, 32, dtype=torch.bfloat16, requires_grad=True)
            ht, wt = torch.randn(n, 32, dtype=torch.bfloat16), torch.randn(130, 32, dtype=torch.bfloat16)
            loss = swkernels.fused_linear_distill(hs, ws, ht, wt, torch.randint(0, 130, (n,)), "jsd",
                                                  reduction=reduction, lse_square_scale=1e-3)
            loss.backward(torch.ones_like(loss))

        with swkernels.force_backend("triton"), LiveBytes() as real, collect_each_op():
            step()
        with FakeTensorMode(), swkernels.force_backend("triton"), LiveBytes() as fake:
            step()
        assert fake.peak == real.peak > 0


def test_peak_memory_far_below_unfused_at_128k_vocab():
    from torch._subclasses.fake_tensor import FakeTensorMode

    n, h, v = 4096, 4096, 128_256
    with FakeTensorMode():
        hs = torch.empty(n, h, dtype=torch.bfloat16, requires_grad=True)
        ws = torch.empty(v, h, dtype=torch.bfloat16)
        ht, wt = torch.empty(n, h, dtype=torch.bfloat16), torch.empty(v, h, dtype=torch.bfloat16)
        y = torch.zeros(n, dtype=torch.long)
        with LiveBytes() as unfused:
            s = (hs @ ws.t()).float()
            t = (ht @ wt.t()).float()
            kd = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="batchmean")
            (0.5 * F.cross_entropy(s, y) + 0.5 * kd).backward()
            del s, t
        hs.grad = None
        with swkernels.force_backend("triton"), LiveBytes() as fused:
            swkernels.fused_linear_distill(hs, ws, ht, wt, y).backward()
    assert fused.peak < unfused.peak / 8, (fused.peak / 2**30, unfused.peak / 2**30)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("kind,beta", [("forward_kl", 0.5), ("jsd", 0.5)])
def test_topk_teacher_cache_with_zero_probabilities(kind, beta, backend, device):
    """A top-k cache padded with -inf log-probabilities (fewer than k candidates) stays finite."""
    hs, ws, ht, wt, y = setup_models(device=device)
    vals, idx = F.log_softmax(ht.float() @ wt.float().t(), dim=-1).topk(8, dim=-1)
    vals[:, 6:] = -float("inf")
    with swkernels.force_backend(backend):
        loss = swkernels.fused_linear_distill(hs, ws, labels=y, kind=kind, beta=beta, alpha=0.5,
                                              teacher_topk=(vals, idx))
    gh, gw = torch.autograd.grad(loss, (hs, ws))
    s = hs @ ws.t()
    lq, p = F.log_softmax(s.gather(1, idx), -1), F.softmax(vals, -1)
    if kind == "forward_kl":
        per = F.kl_div(lq, p, reduction="none").sum(-1)
    else:
        lm = (beta * p + (1 - beta) * lq.exp()).log()
        per = beta * F.kl_div(lm, p, reduction="none").sum(-1) + (1 - beta) * F.kl_div(lm, lq.exp(),
                                                                                         reduction="none").sum(-1)
    valid = y != -100
    ref = 0.5 * F.cross_entropy(s, y) + 0.5 * (per * valid).sum() / valid.sum()
    gh_r, gw_r = torch.autograd.grad(ref, (hs, ws))
    assert torch.isfinite(loss) and torch.isfinite(gh).all() and torch.isfinite(gw).all()
    torch.testing.assert_close(loss, ref, rtol=2e-5, atol=1e-6)
    assert rel(gh, gh_r) < 2e-5 and rel(gw, gw_r) < 2e-5


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_out_of_range_label_is_an_error(backend):
    hs, ws, ht, wt, y = setup_models()
    y[4] = 203
    with swkernels.force_backend(backend), pytest.raises(ValueError, match="label 203 at position 4"):
        swkernels.fused_linear_distill(hs, ws, ht, wt, y)
